"""Run engines in this process: the CLI's ``generate`` and ``demo``.

First use just works: the tiny checkpoint and a missing or stale compiled engine are built
on the spot (serving, by contrast, refuses a stale engine and says how to rebuild it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zimage_platform.config import PlatformConfig
from zimage_platform.console import build_log, library_output_to
from zimage_platform.engines import PipelineEngine, build_engine, get_backend
from zimage_platform.errors import EngineError, InvalidRequest
from zimage_platform.pipeline.images import decode_image
from zimage_platform.pipeline.params import GenerationParams, resolve_requests
from zimage_platform.pipeline.types import GenerationRequest, GenerationResult, StepEvent

_REBUILD = {"engine_not_built", "engine_checkpoint_mismatch", "engine_bucket_missing"}


def load_input_image(path: Path):
    if not path.is_file():
        raise InvalidRequest(f"input image {path} does not exist", code="image_missing", param="image")
    return decode_image(path.read_bytes())


def open_engine(
    config: PlatformConfig, variant: str, backend: str | None = None, *, checkpoint: Path | None = None
) -> PipelineEngine:
    """Load an engine, building its compiled artifacts first if they are missing or stale."""
    engine = PipelineEngine(config, variant, backend, checkpoint=checkpoint)
    try:
        engine.load()
    except EngineError as exc:
        if exc.code not in _REBUILD or not get_backend(engine.backend).compiled:
            raise
        log = build_log(config)
        print(f"building the {engine.backend} engine for {variant} ({exc.code}; details: {log})…", file=sys.stderr)
        with library_output_to(log):
            build_engine(config, variant, engine.backend, checkpoint=checkpoint)
        engine.load()
    return engine


class _ProgressBar:
    """A rich progress bar on stderr, one task per pass."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.progress.start()
        return self

    def __call__(self, event: StepEvent) -> None:
        if self.progress is None:
            return
        task = self.tasks.get(event.pass_name)
        if task is None:
            task = self.tasks[event.pass_name] = self.progress.add_task(
                f"denoise ({event.pass_name})", total=event.total
            )
        self.progress.update(task, completed=event.step)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def output_paths(output: Path, requests: list[GenerationRequest]) -> list[Path]:
    """``-o`` is a file for one image and a folder for several."""
    if len(requests) == 1 and output.suffix.lower() == ".png":
        return [output]
    if output.suffix.lower() == ".png":
        raise InvalidRequest(
            f"{len(requests)} images need a folder for -o, not a .png file", code="output_not_folder", param="output"
        )
    return [output / f"{i:04d}-seed{r.seed}.png" for i, r in enumerate(requests)]


def generate_images(
    config: PlatformConfig,
    variant: str,
    params: GenerationParams,
    output: Path,
    *,
    backend: str | None = None,
    checkpoint: Path | None = None,
    show_progress: bool = True,
) -> Iterator[dict[str, Any]]:
    spec = config.variant(variant)
    requests = resolve_requests(params, spec, config.buckets_for(variant))
    paths = output_paths(output, requests)
    engine = open_engine(config, variant, backend, checkpoint=checkpoint)
    results: list[GenerationResult] = []
    with _ProgressBar(show_progress) as bar:
        for start in range(0, len(requests), engine.max_batch(requests[0].size)):
            results += engine.run(requests[start : start + engine.max_batch(requests[0].size)], on_progress=bar)
    for path, result in zip(paths, results, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        assert result.png is not None
        path.write_bytes(result.png)
        yield {
            "path": str(path),
            "variant": variant,
            "backend": engine.backend,
            "seed": result.seed,
            "size": str(result.size),
            "total_s": round(result.total_s, 4),
            "timings": result.timings(),
        }


def run_demo(config: PlatformConfig, output: Path) -> Iterator[dict[str, Any]]:
    """Every capability once: Turbo (English, Chinese, n=2), Base with CFG, Edit, hires-fix."""
    backend = config.engine.backend
    yield from generate_images(
        config,
        "turbo",
        GenerationParams(prompt="a red fox in fresh snow, golden hour", seed=1, n=2),
        output / "turbo",
        backend=backend,
    )
    yield from generate_images(
        config,
        "turbo",
        GenerationParams(prompt="一只小猫坐在窗台上，阳光洒在它的毛发上", seed=7),
        output / "turbo-zh.png",
        backend=backend,
    )
    yield from generate_images(
        config,
        "base",
        GenerationParams(prompt="product shot of white sneakers", seed=3, steps=12),
        output / "base.png",
        backend=backend,
    )
    source = load_input_image(output / "turbo" / "0000-seed1.png")
    yield from generate_images(
        config,
        "edit",
        GenerationParams(prompt="make it night time", image=source, seed=5, steps=12),
        output / "edit.png",
        backend=backend,
    )
    yield from generate_images(
        config,
        "turbo",
        GenerationParams(prompt="a lighthouse on a cliff", size="512x512", hires_from="256x256", seed=9),
        output / "hires.png",
        backend=backend,
    )
