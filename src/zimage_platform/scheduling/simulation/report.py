"""Plain-text tables of a simulation (the ``--json`` output carries every number)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig
    from zimage_platform.scheduling.simulation.latency import ComputeModel
    from zimage_platform.scheduling.simulation.search import SearchResult
    from zimage_platform.scheduling.simulation.simulator import SimulationResult


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def render(result: SimulationResult, search: SearchResult | None = None) -> str:
    parts = [
        f"profile {result.profile}: {result.simulated_s:.0f} s simulated in {result.wall_s:.1f} s "
        f"({result.events:,} events)",
        "",
    ]
    rows = []
    for cls, c in result.classes.items():
        lat = c["latency_s"]
        slo = result.slo.get(cls)
        verdict = "-" if slo is None else ("met" if slo["met"] else "MISSED: " + ",".join(slo["problems"]))
        rows.append(
            [
                cls,
                f"{c['requests']:,}",
                f"{c['completed']:,}",
                f"{c['images_done']:,}",
                _s(lat["p50"]),
                _s(lat["p95"]),
                _s(lat["p99"]),
                f"{c['peak_queue']:,}",
                f"{c['rejected_total']:,}" + (f" {c['rejected']}" if c["rejected"] else ""),
                f"{c['timed_out']:,}",
                f"{c['unfinished']:,}",
                "-" if slo is None else f"{slo['p95_target_s']:g}",
                verdict,
            ]
        )
    parts.append(
        _table(
            [
                "class",
                "requests",
                "completed",
                "images",
                "p50 s",
                "p95 s",
                "p99 s",
                "peak queue",
                "429s",
                "timed out",
                "unfinished",
                "p95 SLO s",
                "SLO",
            ],
            rows,
        )
    )
    parts.append("")
    rows = []
    for pool, p in result.pools.items():
        for variant, d in p["deployments"].items():
            rows.append(
                [
                    f"{pool}/{variant}",
                    p["mig_profile"] or "-",
                    "fixed" if d["fixed"] else "autoscaled",
                    str(d["peak_replicas"]),
                    f"{d['mean_replicas']:.1f}",
                    "-" if d["mean_batch"] is None else f"{d['mean_batch']:.2f}",
                    "-" if d["utilisation"] is None else f"{d['utilisation']:.0%}",
                    f"{d['slice_hours']:.2f}",
                    f"{d['gpu_hours']:.2f}",
                ]
            )
    parts.append(
        _table(
            ["deployment", "slice", "replicas", "peak", "mean", "mean batch", "busy", "slice-h", "GPU-h"],
            rows,
        )
    )
    parts.append("")
    parts.append(f"GPU-hours {result.gpu_hours:.2f}, cost ${result.cost_usd:,.2f}")
    if search is not None:
        parts.append("")
        verdict = "meets every SLO" if search.feasible else "does NOT meet every SLO"
        parts.append(f"recommended replicas ({verdict}; {search.runs} simulations in {search.wall_s:.1f} s):")
        for name, n in search.replicas.items():
            parts.append(f"  {name}: {n}")
        parts += [f"  note: {n}" for n in search.notes]
    else:
        parts.append("recommended replicas (peak seen): " + _recommended(result))
    parts += [f"warning: {w}" for w in result.warnings]
    return "\n".join(parts)


def _recommended(result: SimulationResult) -> str:
    return ", ".join(
        f"{pool}/{v}={d['peak_replicas']}" for pool, p in result.pools.items() for v, d in p["deployments"].items()
    )


def latency_table(model: ComputeModel, config: PlatformConfig, buckets: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The compute model's seconds per batch for every pool × variant × bucket × batch size."""
    from zimage_platform.pipeline.buckets import Resolution
    from zimage_platform.scheduling.dispatcher import pool_policies
    from zimage_platform.scheduling.work import WorkKey

    policies = {p.name: p for p in pool_policies(config)}
    rows: list[dict[str, Any]] = []
    for pool in config.pools:
        for variant in config.pool_variants(pool):
            spec = config.variant(variant)
            served = set(config.buckets_for(variant).names)
            for size in buckets:
                if size not in served:
                    continue
                key = WorkKey(
                    variant,
                    size,
                    spec.defaults.steps,
                    spec.defaults.guidance > 0,
                    spec.defaults.sampler,
                    spec.defaults.shift,
                    None,
                    None,
                )
                cap = policies[pool].max_batch(key)
                for n in sorted({1, 2, 4, cap} & set(range(1, cap + 1))):
                    seconds = model.batch_seconds(pool, key, n)
                    rows.append(
                        {
                            "pool": pool,
                            "slice": model.slice_of(pool),
                            "precision": config.precision_in(pool, variant),
                            "tflops": round(model.tflops(pool, variant), 1),
                            "variant": variant,
                            "bucket": size,
                            "steps": key.steps,
                            "cfg": key.cfg,
                            "forward_tflop": round(model.forward_flops(size) / 1e12, 1),
                            "batch": n,
                            "seconds": round(seconds, 3),
                            "images_per_s": round(n / seconds, 3),
                            "megapixels": Resolution.parse(size).megapixels,
                        }
                    )
    headers = [
        "pool",
        "slice",
        "prec",
        "TFLOP/s",
        "variant",
        "bucket",
        "steps",
        "cfg",
        "TFLOP/fwd",
        "batch",
        "s/batch",
        "img/s",
    ]
    body = [
        [
            r["pool"],
            r["slice"],
            r["precision"],
            f"{r['tflops']:g}",
            r["variant"],
            r["bucket"],
            str(r["steps"]),
            "yes" if r["cfg"] else "no",
            f"{r['forward_tflop']:g}",
            str(r["batch"]),
            f"{r['seconds']:.3f}",
            f"{r['images_per_s']:.3f}",
        ]
        for r in rows
    ]
    return _table(headers, body), rows
