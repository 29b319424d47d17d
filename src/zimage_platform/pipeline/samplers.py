"""Flow-matching samplers users ask for by ComfyUI name, built from diffusers schedulers.

A fresh scheduler is made per batch: diffusers schedulers keep per-run state (step index,
multistep history), so sharing one between concurrent batches would mix their histories.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zimage_platform.errors import InvalidRequest

if TYPE_CHECKING:  # torch and diffusers load only when a scheduler is made (not for validation)
    import torch

SAMPLERS: tuple[str, ...] = ("euler", "dpmpp_2m", "unipc")

#: Scheduler attributes that hold one row per batch member (multistep history).
_BATCHED_STATE = ("model_outputs", "last_sample")


def check_sampler(name: str, *, param: str = "sampler") -> str:
    if name not in SAMPLERS:
        raise InvalidRequest(
            f"unknown sampler {name!r}", code="unsupported_sampler", param=param, choices=list(SAMPLERS)
        )
    return name


def make_scheduler(name: str, shift: float, base_config: dict[str, Any]):
    """A new scheduler for one batch; ``base_config`` is the checkpoint's scheduler config."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    check_sampler(name)
    train_steps = int(base_config.get("num_train_timesteps", 1000))
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base_config, shift=shift)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=train_steps,
            algorithm_type="dpmsolver++",
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            final_sigmas_type="zero",
        )
    return UniPCMultistepScheduler(
        num_train_timesteps=train_steps,
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",
    )


def set_schedule(scheduler, steps: int, image_seq_len: int, device: torch.device) -> torch.Tensor:
    """Set ``steps`` timesteps exactly as ZImagePipeline does for its Euler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        cfg = scheduler.config
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(steps), device=device, mu=mu)
    else:
        scheduler.set_timesteps(num_inference_steps=steps, device=device)
    return scheduler.timesteps


def noise_to(scheduler, image_latents: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Re-noise clean latents to ``timestep``: (1-σ)·x + σ·ε for every flow-matching sampler."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(image_latents, timestep, noise)
    return scheduler.add_noise(image_latents, noise, timestep.reshape(1))


def keep_rows(scheduler, keep: list[int]) -> None:
    """Drop cancelled members from a scheduler's per-member history (no-op for Euler)."""
    import torch

    index = torch.tensor(keep, dtype=torch.long)
    for attr in _BATCHED_STATE:
        value = getattr(scheduler, attr, None)
        if isinstance(value, torch.Tensor):
            setattr(scheduler, attr, value.index_select(0, index))
        elif isinstance(value, list):
            setattr(scheduler, attr, [v.index_select(0, index) if isinstance(v, torch.Tensor) else v for v in value])
