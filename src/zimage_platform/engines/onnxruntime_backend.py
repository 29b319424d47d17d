"""ONNX Runtime backend: the exported denoiser and VAE decoder (the text encoder stays torch).

One ONNX file per component serves every bucket (batch, caption length and size are dynamic).
Runs on the CPU here; with ``onnxruntime-gpu`` installed it picks the CUDA provider.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch

from zimage_platform.engines.export import export_decoder_onnx, export_denoiser_onnx, pad_captions
from zimage_platform.errors import EngineError

DENOISER_FILE = "denoiser.onnx"
DECODER_FILE = "vae_decoder.onnx"


_GLOBAL_POOL: int | None = None


def _shared_pool(threads: int) -> None:
    """One intra-op thread pool for every session in the process. With a pool per session, the
    denoiser's threads still spin while the decoder's start, and both fight for the same cores
    (measured: the VAE decode ran 2x slower)."""
    global _GLOBAL_POOL
    if _GLOBAL_POOL is None:
        import onnxruntime.capi._pybind_state as C

        C.set_global_thread_pool_sizes(threads or default_threads(), 1)
        _GLOBAL_POOL = threads


def default_threads() -> int:
    """``engine.threads: 0`` for ONNX Runtime: what torch takes in the same process, i.e.
    ``OMP_NUM_THREADS`` where it is set, else every core. Ray sets it to an actor's reserved
    CPUs (one for a fractional request), so a replica's pool matches its share of the machine.
    ONNX Runtime alone ignores the variable: on two cores its two spinning threads competed with
    the proxy, ingress and scheduler during every request (1-client p50 204 ms vs 173 ms with
    one thread, measured on the embedded default)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def make_session(path: Path, *, threads: int):
    import onnxruntime as ort

    _shared_pool(threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.use_per_session_threads = False
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise EngineError(f"cannot load {path}: {exc}", code="engine_corrupt") from exc


class OrtDenoiser:
    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, captions: list[torch.Tensor]) -> torch.Tensor:
        padded, lens = pad_captions([c.float() for c in captions])
        (velocity,) = self.session.run(
            ["velocity"],
            {
                "latents": latents.float().contiguous().numpy(),
                "timestep": timestep.float().contiguous().numpy(),
                "captions": padded.numpy(),
                "caption_lens": lens.numpy(),
            },
        )
        return torch.from_numpy(velocity)


class OrtDecoder:
    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        (images,) = self.session.run(["images"], {"latents": latents.float().contiguous().numpy()})
        return torch.from_numpy(images)


class OnnxRuntimeBackend:
    name: ClassVar[str] = "onnxruntime"
    compiled: ClassVar[bool] = True
    #: One dynamic ONNX serves any bucket and batch: profiles are advisory, not in the files.
    profiles_in_artifacts: ClassVar[bool] = False

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime)"
        return None

    def build(self, pipe, folder: Path, profiles, *, precision: str, dynamic=None) -> list[str]:
        if precision != "fp32":
            raise EngineError(
                f"the onnxruntime backend builds fp32 engines; {precision} is for tensorrt",
                code="precision_unsupported",
                param="precision",
                choices=["fp32"],
            )
        export_denoiser_onnx(pipe.transformer, folder / DENOISER_FILE)
        export_decoder_onnx(pipe.vae, folder / DECODER_FILE)
        return [DENOISER_FILE, DECODER_FILE]

    def load(self, pipe, folder: Path, manifest, *, threads: int):
        return (
            OrtDenoiser(make_session(folder / DENOISER_FILE, threads=threads)),
            OrtDecoder(make_session(folder / DECODER_FILE, threads=threads)),
        )
