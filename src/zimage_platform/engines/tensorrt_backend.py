"""TensorRT backend: plans built from the same ONNX export, one optimisation profile per bucket.

TensorRT cannot be installed on the CPU machines this project is developed on, so ``tensorrt``
is imported lazily and every entry point says so plainly when it is missing. The build and
runtime below follow TensorRT 11's Python API; profile generation, manifests and the refusal
paths are tested here, the GPU paths only on a GPU.

Precision: TensorRT 11 builds strongly typed networks only (the FP16/BF16/FP8 builder flags
are gone), so precision is decided in the ONNX before building, with NVIDIA ModelOpt:
``fp16``/``bf16`` through AutoCast (mixed precision, fp32 I/O kept), ``fp8`` through ONNX
post-training quantisation (Q/DQ around GEMMs, calibrated on real caption embeddings). FP8
needs compute capability 8.9+ (Ada, Hopper); that is checked before building.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from zimage_platform.engines.export import export_decoder_onnx, export_denoiser_onnx, pad_captions
from zimage_platform.engines.manifest import BucketProfile, DynamicProfile
from zimage_platform.errors import BackendUnavailable, EngineError

DENOISER_ONNX = "denoiser.onnx"
DECODER_ONNX = "vae_decoder.onnx"
DENOISER_PLAN = "denoiser.plan"
DECODER_PLAN = "vae_decoder.plan"
WORKSPACE_BYTES = 8 << 30
#: Typical e-commerce and poster prompts (both languages) for FP8 activation ranges.
CALIBRATION_PROMPTS = (
    "product photo of white sneakers on a clean studio background",
    "一幅中国山水画，远山如黛，近处有小桥流水",
    "portrait of an old fisherman, cinematic lighting, film grain",
    "夏日促销海报：醒目的字体，明亮的色彩，沙滩遮阳伞",
)
#: Minimum compute capability per precision (fp8 tensor cores arrived with Ada / Hopper).
MIN_CAPABILITY = {"fp32": (7, 0), "fp16": (7, 0), "bf16": (8, 0), "fp8": (8, 9)}

_MISSING = (
    "TensorRT is not installed on this machine. It needs an NVIDIA GPU and the 'tensorrt' wheel "
    "(pip install 'zimage-platform[tensorrt]' inside the CUDA image, deploy/Dockerfile.gpu). "
    "Use --backend onnxruntime or torch on CPU machines."
)


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(_MISSING, code="tensorrt_unavailable") from exc
    return trt


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shapes of one input in one optimisation profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


#: A bucket's profile fixes the size; the dynamic profile spans a range of sizes.
Profile = BucketProfile | DynamicProfile


def _latent(size: str) -> tuple[int, int]:
    width, height = (int(x) for x in size.split("x"))
    return height // 8, width // 8


def latent_range(profile: Profile) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(min, opt, max) latent (height, width) of a profile."""
    if isinstance(profile, DynamicProfile):
        return _latent(profile.min_size), _latent(profile.opt_size), _latent(profile.max_size)
    fixed = _latent(profile.bucket)
    return fixed, fixed, fixed


def denoiser_shapes(profile: Profile, *, latent_channels: int, caption_dim: int) -> list[ShapeRange]:
    """The denoiser inputs' ranges for one profile: batch and caption length vary; the size is
    fixed for a bucket and ranges over the allowed sizes for the dynamic profile."""
    (hmin, wmin), (hopt, wopt), (hmax, wmax) = latent_range(profile)
    bmin, bopt, bmax = profile.denoiser_batch
    cmin, copt, cmax = profile.caption_len
    c = latent_channels
    return [
        ShapeRange("latents", (bmin, c, hmin, wmin), (bopt, c, hopt, wopt), (bmax, c, hmax, wmax)),
        ShapeRange("timestep", (bmin,), (bopt,), (bmax,)),
        ShapeRange("captions", (bmin, cmin, caption_dim), (bopt, copt, caption_dim), (bmax, cmax, caption_dim)),
        ShapeRange("caption_lens", (bmin,), (bopt,), (bmax,)),
    ]


def decoder_shapes(profile: Profile, *, latent_channels: int) -> list[ShapeRange]:
    (hmin, wmin), (hopt, wopt), (hmax, wmax) = latent_range(profile)
    # The decoder sees only the batch's own rows: up to max_batch, never the CFG doubling.
    b, c = profile.max_batch, latent_channels
    return [ShapeRange("latents", (1, c, hmin, wmin), (b, c, hopt, wopt), (b, c, hmax, wmax))]


def plan_profiles(profiles: list[BucketProfile], dynamic: DynamicProfile | None) -> list[Profile]:
    """The plan's optimisation profiles in index order: one per bucket, then the dynamic one."""
    return [*profiles, *([dynamic] if dynamic is not None else [])]


def check_precision_supported(precision: str) -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT engines need a CUDA GPU; none is visible here", code="gpu_unavailable")
    capability = torch.cuda.get_device_capability()
    need = MIN_CAPABILITY[precision]
    if capability < need:
        raise EngineError(
            f"{precision} needs compute capability {need[0]}.{need[1]}+, this GPU has {capability[0]}.{capability[1]}",
            code="precision_unsupported",
            param="precision",
            choices=[p for p, cap in MIN_CAPABILITY.items() if capability >= cap],
        )


def build_plan(onnx_path: Path, plan_path: Path, profiles: list[list[ShapeRange]]) -> None:
    """Parse ``onnx_path`` (precision already in its types) into a plan, one profile per entry."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # strongly typed: the ONNX decides each tensor's type
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}", code="engine_build_failed")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for ranges in profiles:
        profile = builder.create_optimization_profile()
        for r in ranges:
            profile.set_shape(r.name, r.min, r.opt, r.max)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {plan_path.name} (see the log above)", code="engine_build_failed")
    plan_path.write_bytes(bytes(serialized))


def _modelopt(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            "reduced-precision TensorRT engines need NVIDIA ModelOpt (pip install 'zimage-platform[tensorrt]')",
            code="modelopt_unavailable",
        ) from exc


def lower_precision(onnx_path: Path, out_path: Path, precision: str, calibration: dict | None = None) -> Path:
    """Write ``onnx_path`` at ``precision`` (fp32: unchanged) and return the path to build from."""
    if precision == "fp32":
        return onnx_path
    if precision in ("fp16", "bf16"):
        import onnx

        autocast = _modelopt("modelopt.onnx.autocast")
        model = autocast.convert_to_mixed_precision(
            onnx_path=str(onnx_path), low_precision_type=precision, keep_io_types=True
        )
        onnx.save(model, str(out_path))
        return out_path
    quantization = _modelopt("modelopt.onnx.quantization")
    quantization.quantize(
        onnx_path=str(onnx_path),
        quantize_mode="fp8",
        calibration_data=calibration,
        calibration_method="max",
        high_precision_dtype="bf16",
        output_path=str(out_path),
    )
    return out_path


def fp8_calibration(pipe, profiles: list[BucketProfile], prompts: list[str]) -> dict:
    """Denoiser inputs for FP8 calibration: real caption embeddings, noisy latents, all times."""
    import numpy as np

    captions_list, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False)
    captions, lens = pad_captions([c.float().cpu() for c in captions_list])
    width, height = (int(x) for x in profiles[0].bucket.split("x"))
    gen = torch.Generator().manual_seed(0)
    n = len(prompts)
    return {
        "latents": torch.randn(n, pipe.transformer.config.in_channels, height // 8, width // 8, generator=gen).numpy(),
        "timestep": np.linspace(0.05, 0.95, n, dtype=np.float32),
        "captions": captions.numpy(),
        "caption_lens": lens.numpy(),
    }


#: The execution context of the dynamic-shape profile (sizes outside the buckets).
DYNAMIC = "dynamic"


class _PlanRunner:
    """One deserialized plan with an execution context per optimisation profile (bucket, and
    :data:`DYNAMIC` for every other size when the plan has that profile)."""

    def __init__(self, plan: Path, buckets: list[str]) -> None:
        trt = _trt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"cannot deserialize {plan}", code="engine_corrupt")
        self.stream = torch.cuda.Stream()
        self.contexts = {}
        for index, bucket in enumerate(buckets):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts[bucket] = context

    def run(self, bucket: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        trt = _trt()
        context = self.contexts[bucket] if bucket in self.contexts else self.contexts.get(DYNAMIC)
        if context is None:
            raise EngineError(
                f"no TensorRT profile for size {bucket} (the plan was built without a dynamic-shape profile: "
                "rebuild it with `engines build --force`)",
                code="engine_bucket_missing",
                choices=sorted(self.contexts),
            )
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        dtype = {trt.DataType.FLOAT: torch.float32, trt.DataType.UINT8: torch.uint8}[
            self.engine.get_tensor_dtype(output)
        ]
        out = torch.empty(tuple(context.get_tensor_shape(output)), dtype=dtype, device="cuda")
        context.set_tensor_address(output, out.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"TensorRT execution failed for bucket {bucket}", code="engine_failed")
        self.stream.synchronize()
        return out


def _bucket_of(latents: torch.Tensor) -> str:
    return f"{latents.shape[3] * 8}x{latents.shape[2] * 8}"


class TrtDenoiser:
    def __init__(self, runner: _PlanRunner) -> None:
        self.runner = runner

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, captions: list[torch.Tensor]) -> torch.Tensor:
        padded, lens = pad_captions([c.float() for c in captions])
        inputs = {
            "latents": latents.float().cuda().contiguous(),
            "timestep": timestep.float().cuda().contiguous(),
            "captions": padded.cuda().contiguous(),
            "caption_lens": lens.cuda().contiguous(),
        }
        return self.runner.run(_bucket_of(latents), inputs, "velocity").to(latents.device)


class TrtDecoder:
    def __init__(self, runner: _PlanRunner) -> None:
        self.runner = runner

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.runner.run(_bucket_of(latents), {"latents": latents.float().cuda().contiguous()}, "images")
        return out.to(latents.device)


class TensorRTBackend:
    name: ClassVar[str] = "tensorrt"
    compiled: ClassVar[bool] = True
    #: Plans hold their optimisation profiles: a new bucket means a new build.
    profiles_in_artifacts: ClassVar[bool] = True

    def unavailable_reason(self) -> str | None:
        try:
            _trt()
        except BackendUnavailable as exc:
            return exc.message
        if not torch.cuda.is_available():
            return "TensorRT is installed but no CUDA GPU is visible"
        return None

    def build(
        self,
        pipe,
        folder: Path,
        profiles: list[BucketProfile],
        *,
        precision: str,
        dynamic: DynamicProfile | None = None,
    ) -> list[str]:
        _trt()
        check_precision_supported(precision)
        export_denoiser_onnx(pipe.transformer, folder / DENOISER_ONNX)
        export_decoder_onnx(pipe.vae, folder / DECODER_ONNX)
        calibration = fp8_calibration(pipe, profiles, list(CALIBRATION_PROMPTS)) if precision == "fp8" else None
        denoiser = lower_precision(
            folder / DENOISER_ONNX, folder / f"denoiser.{precision}.onnx", precision, calibration
        )
        # The VAE stays out of fp8: its convolutions gain little and lose visible quality.
        vae_precision = "bf16" if precision == "fp8" else precision
        decoder = lower_precision(folder / DECODER_ONNX, folder / f"vae_decoder.{vae_precision}.onnx", vae_precision)
        channels = pipe.transformer.config.in_channels
        caption_dim = pipe.transformer.config.cap_feat_dim
        every = plan_profiles(profiles, dynamic)
        build_plan(
            denoiser,
            folder / DENOISER_PLAN,
            [denoiser_shapes(p, latent_channels=channels, caption_dim=caption_dim) for p in every],
        )
        build_plan(decoder, folder / DECODER_PLAN, [decoder_shapes(p, latent_channels=channels) for p in every])
        return sorted({DENOISER_ONNX, DECODER_ONNX, denoiser.name, decoder.name, DENOISER_PLAN, DECODER_PLAN})

    def load(self, pipe, folder: Path, manifest, *, threads: int):
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailable(reason, code="tensorrt_unavailable")
        names = manifest.buckets + ([DYNAMIC] if manifest.dynamic_profile is not None else [])
        return (
            TrtDenoiser(_PlanRunner(folder / DENOISER_PLAN, names)),
            TrtDecoder(_PlanRunner(folder / DECODER_PLAN, names)),
        )
