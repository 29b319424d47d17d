"""Flow-matching samplers users ask for by ComfyUI name, on sigma schedules by ComfyUI name.

- ``euler`` (default) and ``ddim``: diffusers' ``FlowMatchEulerDiscreteScheduler`` — the same
  arithmetic as ComfyUI's (which runs ``ddim`` as Euler).
- ``res_multistep``: :class:`ResMultistepScheduler` below, the second-order multistep RES
  exponential integrator, with ComfyUI's coefficients in ComfyUI's (log σ) parameterization.
- ``dpmpp_2m``: diffusers' DPM-Solver++ 2M in the flow parameterization (λ = log((1−σ)/σ)) —
  the same method; ComfyUI steps it in log σ, so images differ from ComfyUI's.
- ``unipc``: diffusers' UniPC (B(h) variant 2) in the flow parameterization — what ComfyUI's
  ``uni_pc`` and ``uni_pc_bh2`` run here: the same method (ComfyUI steps it in its own VP
  conversion, and its ``uni_pc`` uses variant 1, which diffusers cannot take to σ = 0).

Sigma schedules: ``simple`` is the model's shifted linear schedule exactly as diffusers'
``ZImagePipeline`` sets it (the multistep schedulers use their own flow schedule for it); every
other ComfyUI schedule comes from :func:`zimage_platform.pipeline.schedules.flow_sigmas` and is
loaded into the scheduler as given.

A fresh scheduler is made per batch: diffusers schedulers keep per-run state (step index,
multistep history), so sharing one between concurrent batches would mix their histories.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from zimage_platform.errors import InvalidRequest
from zimage_platform.pipeline.schedules import flow_sigmas

if TYPE_CHECKING:  # torch and diffusers load only when a scheduler is made (not for validation)
    import torch

#: Platform sampler names (ComfyUI's, but ``unipc`` for UniPC).
SAMPLERS: tuple[str, ...] = ("euler", "res_multistep", "dpmpp_2m", "unipc", "ddim")

#: Scheduler attributes that hold one row per batch member (multistep history).
_BATCHED_STATE = ("model_outputs", "last_sample")


def check_sampler(name: str, *, param: str = "sampler") -> str:
    if name not in SAMPLERS:
        raise InvalidRequest(
            f"unknown sampler {name!r}", code="unsupported_sampler", param=param, choices=list(SAMPLERS)
        )
    return name


@functools.cache
def _res_multistep_class():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    class ResMultistepScheduler(FlowMatchEulerDiscreteScheduler):
        """ComfyUI's ``res_multistep``: the second-order multistep exponential integrator of
        "Refined Exponential Solver" (Zhang et al., arXiv 2308.02157), deterministic (η = 0).

        With the denoised estimate ``D = x − σ·d`` (``d`` the flow velocity the pipeline passes)
        and the log-sigma time ``t = −log σ``, step ``σ → σ'`` with ``h = t' − t``:
        the first step and the step to σ' = 0 are Euler; every other one is
        ``x' = e^{−h}·x + h·(b1·D + b2·D_prev)`` with ``c2 = (t_prev − t)/h``,
        ``b1 = φ1(−h) − φ2(−h)/c2``, ``b2 = φ2(−h)/c2``, ``φ1(z) = (e^z − 1)/z``,
        ``φ2(z) = (φ1(z) − 1)/z`` and ``D_prev`` the previous step's estimate — the coefficients
        ComfyUI uses, in the same (log σ) parameterization. Its history is one row per batch
        member (``model_outputs``), so a cancelled member is dropped like any multistep state.
        """

        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.model_outputs = []

        def step(self, model_output, timestep, sample, return_dict: bool = True, **_: Any):
            if self.step_index is None:
                self._init_step_index(timestep)
            index = self.step_index
            sample = sample.to(self.sigmas.dtype)
            sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
            denoised = sample - sigma * model_output
            history = getattr(self, "model_outputs", [])
            if sigma_next == 0 or not history:
                prev = sample + (sigma_next - sigma) * model_output
            else:
                sigma_prev = float(self.sigmas[index - 1])
                t, t_next, t_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
                h = t_next - t
                c2 = (t_prev - t) / h
                phi1 = math.expm1(-h) / -h
                phi2 = (phi1 - 1.0) / -h
                b1, b2 = phi1 - phi2 / c2, phi2 / c2
                prev = math.exp(-h) * sample + h * (b1 * denoised + b2 * history[0])
            self.model_outputs = [denoised]
            self._step_index += 1
            prev = prev.to(model_output.dtype)
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    return ResMultistepScheduler


def make_scheduler(name: str, shift: float, base_config: dict[str, Any]):
    """A new scheduler for one batch; ``base_config`` is the checkpoint's scheduler config."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    check_sampler(name)
    train_steps = int(base_config.get("num_train_timesteps", 1000))
    if name in ("euler", "ddim"):
        return FlowMatchEulerDiscreteScheduler.from_config(base_config, shift=shift)
    if name == "res_multistep":
        return _res_multistep_class().from_config(base_config, shift=shift)
    flow = {
        "num_train_timesteps": train_steps,
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": shift,
        "final_sigmas_type": "zero",
    }
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow)
    # B(h) variant 2: diffusers' variant 1 divides by an infinite step size on the final step to σ = 0.
    return UniPCMultistepScheduler(solver_order=2, solver_type="bh2", **flow)


def set_schedule(
    scheduler, steps: int, image_seq_len: int, device: torch.device, schedule: str = "simple"
) -> torch.Tensor:
    """Set the timesteps: ``simple`` exactly as ZImagePipeline does for its Euler scheduler (the
    multistep schedulers keep their own flow schedule for it); any other ComfyUI schedule as
    :func:`flow_sigmas` computes it for the scheduler's shift."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    euler = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    if schedule == "simple":
        if euler:
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
    shift = float(scheduler.config.get("shift", scheduler.config.get("flow_shift", 1.0)))
    sigmas = torch.tensor(flow_sigmas(schedule, steps, shift), dtype=torch.float32, device=device)
    count = len(sigmas) - 1  # ``beta`` may merge repeated steps
    if euler:
        scheduler.set_timesteps(num_inference_steps=count, device=device, mu=1.0)
    else:
        scheduler.set_timesteps(num_inference_steps=count, device=device)
    # Load the schedule as given: the scheduler's own shift must not apply to it a second time.
    train_steps = int(scheduler.config.num_train_timesteps)
    scheduler.sigmas = sigmas if euler else sigmas.cpu()
    scheduler.timesteps = (sigmas[:-1] * train_steps).to(device)
    scheduler.num_inference_steps = count
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
