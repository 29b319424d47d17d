"""ComfyUI round trip: what a ComfyUI client waits for one prompt on the platform, and how much
of it the ComfyUI layer adds, next to the real ComfyUI's recorded 7–12 ms.

How it measures, and why:

* The real Serve app (``build_app``: ingress, scheduler, a turbo engine deployment, SQLite, the
  embedded S3) on a local Ray, once with the default merge wait and once with none.
* One client on the same machine, sequential prompts, as ComfyUI's reference was measured:
  - ``comfy ws``: ``POST /comfy/<key>/prompt`` with the 3…9 example graph (64², 1 step, a new
    seed and prompt text each time), then the socket until ``executing`` with ``node: null``:
    the reference's definition of a round trip;
  - ``native sync``: the same generation as ``POST /v1/images/generations`` (answers once the
    image is in S3), the platform path without the ComfyUI layer.
* The engine's own time per image (``engine_s``, from the job rows) is subtracted to show what
  the path around the engine costs; ComfyUI's recorded trivial graph (EmptyImage → SaveImage)
  runs no model at all, so its whole round trip is such a cost.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from typing import Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    BENCH_TENANT,
    REPO,
    BenchCluster,
    ConfigPath,
    JsonOut,
    Render,
    add_tenant,
    fmt_num,
    log,
    markdown_table,
    percentile,
    read_job_times,
    read_json,
    run_meta,
    wait_all_ready,
    write_json,
)

#: The real ComfyUI's recorded round trip (the recordings the tests compare shapes with).
REFERENCE = REPO / "tests" / "fixtures" / "comfyui-reference" / "bench_roundtrip_emptyimage_saveimage.json"
APPS = {"platform": None, "nowait": {"default": 0.0}}


def graph(seed: int, size: int, steps: int) -> dict[str, Any]:
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "z_image_turbo.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": f"a lighthouse #{seed}", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench"}},
    }


def comfy_round_trip(http, ws, base: str, seed: int, size: int, steps: int) -> tuple[float, float, str]:
    """``(round trip s, POST /prompt s, prompt_id)``: POST, then the socket until node null."""
    client_id = ws.client_id  # type: ignore[attr-defined]
    start = time.perf_counter()
    answer = http.post(f"{base}/prompt", json={"prompt": graph(seed, size, steps), "client_id": client_id})
    posted = time.perf_counter() - start
    answer.raise_for_status()
    prompt_id = answer.json()["prompt_id"]
    while True:
        message = ws.recv()
        if isinstance(message, str):
            data = json.loads(message)
            if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == prompt_id:
                return time.perf_counter() - start, posted, prompt_id


def native_round_trip(http, url: str, key: str, seed: int, size: int, steps: int) -> tuple[float, str]:
    body = {"prompt": f"a lighthouse #{seed}", "size": f"{size}x{size}", "seed": seed, "steps": steps}
    start = time.perf_counter()
    response = http.post(f"{url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["job_id"]


def prompt_jobs(config, prompt_ids: list[str]) -> dict[str, str]:
    """prompt id → its job id, from the app's database."""
    from sqlalchemy import select

    from zimage_platform.db import create_db_engine, session_factory
    from zimage_platform.workflows.models import ComfyPromptRow

    engine = create_db_engine(config.database_url)
    try:
        with session_factory(engine)() as s:
            rows = s.scalars(select(ComfyPromptRow).where(ComfyPromptRow.prompt_id.in_(prompt_ids)))
            return {row.prompt_id: row.job_ids[0] for row in rows}
    finally:
        engine.dispose()


def run(base, *, rounds: int, block: int, warmup: int, size: int, steps: int) -> dict[str, Any]:
    import httpx
    import websocket

    samples: list[dict[str, Any]] = []
    with BenchCluster(base) as cluster:
        configs = {name: cluster.platform_config(name, f"/{name}", max_wait_ms=wait) for name, wait in APPS.items()}
        urls = {name: cluster.deploy_platform(config) for name, config in configs.items()}
        key = add_tenant(configs["platform"], BENCH_TENANT, limits=BENCH_LIMITS)
        log(f"waiting for {len(urls)} apps …")
        wait_all_ready(list(urls.values()))
        sockets = {}
        for name, url in urls.items():
            ws = websocket.WebSocket()
            ws.client_id = str(uuid.uuid4())  # type: ignore[attr-defined]
            ws.connect(f"{url.replace('http://', 'ws://')}/comfy/{key}/ws?clientId={ws.client_id}")
            ws.settimeout(120)
            sockets[name] = ws
        seed = 0
        with httpx.Client(timeout=120) as http:
            for round_ in range(-1, rounds):
                count = warmup if round_ < 0 else block
                for name, url in urls.items():
                    for kind in ("comfy ws", "native sync"):
                        for _ in range(count):
                            seed += 1
                            if kind == "comfy ws":
                                total, posted, pid = comfy_round_trip(
                                    http, sockets[name], f"{url}/comfy/{key}", seed, size, steps
                                )
                                sample = {"prompt_id": pid, "post_s": posted}
                            else:
                                total, job_id = native_round_trip(http, url, key, seed, size, steps)
                                sample = {"job_id": job_id}
                            if round_ >= 0:
                                samples.append({"app": name, "kind": kind, "round": round_, "s": total, **sample})
                if round_ >= 0:
                    log(f"round {round_ + 1}/{rounds} done")
        for ws in sockets.values():
            ws.close()
        for name, config in configs.items():
            mine = [s for s in samples if s["app"] == name]
            jobs = prompt_jobs(config, [s["prompt_id"] for s in mine if "prompt_id" in s])
            for sample in mine:
                sample.setdefault("job_id", jobs.get(sample.get("prompt_id", "")))
            times = read_job_times(config, [s["job_id"] for s in mine if s.get("job_id")])
            for sample in mine:
                job = times.get(sample.get("job_id") or "")
                sample["engine_s"] = job.engine_s if job else None
    return {"samples": samples}


def summary(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for app in APPS:
        for kind in ("comfy ws", "native sync"):
            mine = [s for s in samples if s["app"] == app and s["kind"] == kind]
            if not mine:
                continue
            total = [s["s"] * 1000 for s in mine]
            around = [(s["s"] - s["engine_s"]) * 1000 for s in mine if s.get("engine_s") is not None]
            engine = [s["engine_s"] * 1000 for s in mine if s.get("engine_s") is not None]
            posts = [s["post_s"] * 1000 for s in mine if "post_s" in s]
            rows.append(
                {
                    "app": app,
                    "kind": kind,
                    "n": len(mine),
                    "p50_ms": percentile(total, 50),
                    "p95_ms": percentile(total, 95),
                    "engine_p50_ms": statistics.median(engine) if engine else None,
                    "around_engine_p50_ms": statistics.median(around) if around else None,
                    "post_p50_ms": statistics.median(posts) if posts else None,
                }
            )
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    reference = json.loads(REFERENCE.read_text())["aggregate_5_runs"]["sequential_uncached"]
    table = [
        [
            f"{r['app']}, {r['kind']}",
            str(r["n"]),
            fmt_num(r["p50_ms"], ".1f"),
            fmt_num(r["p95_ms"], ".1f"),
            fmt_num(r["engine_p50_ms"], ".1f"),
            fmt_num(r["around_engine_p50_ms"], ".1f"),
            fmt_num(r["post_p50_ms"], ".1f"),
        ]
        for r in rows
    ]
    table.append(
        [
            "ComfyUI 0.3.64, EmptyImage → SaveImage (recorded)",
            str(reference["pooled_samples"]),
            fmt_num(reference["p50_ms"], ".1f"),
            fmt_num(reference["p95_ms"], ".1f"),
            "none (no model)",
            fmt_num(reference["p50_ms"], ".1f"),
            fmt_num(statistics.median(reference["post_prompt_response_p50_ms_per_run"]), ".1f"),
        ]
    )
    head = ["Path", "n", "p50 ms", "p95 ms", "engine p50 ms", "p50 around the engine ms", "POST /prompt p50 ms"]
    by = {(r["app"], r["kind"]): r for r in rows}
    lines = [markdown_table(head, table), ""]
    for app in APPS:
        comfy, native = by.get((app, "comfy ws")), by.get((app, "native sync"))
        if comfy and native and comfy["p50_ms"] is not None and native["p50_ms"] is not None:
            lines.append(
                f"- {app}: the ComfyUI layer adds {comfy['p50_ms'] - native['p50_ms']:+.1f} ms at p50 "
                "over the native synchronous call for the same generation."
            )
    lines.append(f"- source {meta.get('source', '?')}; {meta.get('machine', '')}")
    return "\n".join(lines)


def main(
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; each runs a block per path and app.")] = 5,
    block: Annotated[int, typer.Option(min=1, help="Sequential prompts per path, app and round.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Unmeasured prompts per path and app first.")] = 5,
    size: Annotated[int, typer.Option(help="Square size; a turbo bucket.")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="Sampler steps.")] = 1,
    json_out: JsonOut = None,
    config_path: ConfigPath = None,
    render: Render = None,
) -> None:
    """ComfyUI client round trip (POST /prompt → executing null) on the Serve app vs the native API."""
    if render is not None:
        data = read_json(render)
        print(markdown(data["meta"], data["summary"]))
        return
    from zimage_platform.config import load_config

    meta = run_meta(sys.argv[1:], size=size, steps=steps, rounds=rounds, block=block, warmup=warmup)
    result = run(load_config(config_path), rounds=rounds, block=block, warmup=warmup, size=size, steps=steps)
    rows = summary(result["samples"])
    print(markdown(meta, rows))
    write_json(json_out, {"meta": meta, "summary": rows, "samples": result["samples"]})
