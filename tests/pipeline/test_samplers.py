"""Samplers and sigma schedules by ComfyUI name, checked against their published definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from zimage_platform.errors import InvalidRequest
from zimage_platform.pipeline.samplers import SAMPLERS, make_scheduler, set_schedule
from zimage_platform.pipeline.schedules import SCHEDULES, FlowModelSampling, beta_cdf, beta_ppf, flow_sigmas

SHIFT = 3.0


def shifted(t: float) -> float:
    return SHIFT * t / (1 + (SHIFT - 1) * t)


def test_res_multistep_is_exact_where_its_second_order_formula_is():
    """RES's multistep step interpolates the denoised estimate D linearly in t = −log σ, so on
    dx/dt = D(t) − x with D linear in t it follows the exact solution from its second step on
    (the first step is Euler). A wrong coefficient (b1, b2, c2, the phi functions) breaks this."""
    a, b = 0.3, -0.7

    def denoised(sigma: float) -> float:
        return a + b * -math.log(sigma)

    scheduler = make_scheduler("res_multistep", SHIFT, {"num_train_timesteps": 1000})
    sigmas = [1.0, 0.8, 0.55, 0.4, 0.25, 0.1]
    scheduler.set_timesteps(num_inference_steps=len(sigmas) - 1)
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    scheduler.timesteps = scheduler.sigmas[:-1] * 1000
    scheduler.set_begin_index(0)
    x = torch.tensor([0.9], dtype=torch.float64)
    trajectory = [x]
    for i, t in enumerate(scheduler.timesteps):
        velocity = (x - denoised(sigmas[i])) / sigmas[i]  # d = (x − D) / σ, what the pipeline passes
        x = scheduler.step(velocity, t, x, return_dict=False)[0]
        trajectory.append(x)
    # Exact solution through the point after the Euler step: x(t) = a + b(t − 1) + C·e^(−t).
    t1 = -math.log(sigmas[1])
    c = (float(trajectory[1]) - a - b * (t1 - 1)) * math.exp(t1)
    for sigma, value in zip(sigmas[2:], trajectory[2:], strict=True):
        t = -math.log(sigma)
        assert float(value) == pytest.approx(a + b * (t - 1) + c * math.exp(-t), abs=1e-9)
    # ... and the first step really is Euler.
    euler = 0.9 + (0.9 - denoised(1.0)) * (sigmas[1] - 1.0)
    assert float(trajectory[1]) == pytest.approx(euler, abs=1e-12)


def test_res_multistep_keeps_one_history_row_per_member():
    scheduler = make_scheduler("res_multistep", SHIFT, {"num_train_timesteps": 1000})
    timesteps = set_schedule(scheduler, 4, 64, torch.device("cpu"))
    scheduler.set_begin_index(0)
    x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    x = scheduler.step(torch.ones_like(x), timesteps[0], x, return_dict=False)[0]
    assert len(scheduler.model_outputs) == 1 and scheduler.model_outputs[0].shape[0] == 3


def test_simple_is_comfyuis_table_lookup_and_the_model_schedule():
    ms = FlowModelSampling(SHIFT)
    assert ms.sigma_max == 1.0 and ms.sigma_min == pytest.approx(shifted(0.001), rel=1e-6)
    sigmas = flow_sigmas("simple", 8, SHIFT)
    assert len(sigmas) == 9 and sigmas[-1] == 0.0
    # 1000 / 8 steps: exactly the shifted linear schedule ZImagePipeline uses.
    expected = [shifted(1 - i / 8) for i in range(8)]
    assert sigmas[:-1] == pytest.approx(expected, rel=1e-6)
    # 1000 / 3 is not whole: ComfyUI truncates the table index, so t = 1, 0.667, 0.334.
    assert flow_sigmas("simple", 3, SHIFT)[:-1] == pytest.approx([1.0, shifted(0.667), shifted(0.334)], rel=1e-6)


def test_normal_and_sgm_uniform_shift_twice_as_comfyui_does():
    """For flow models ComfyUI's timestep is the shifted sigma; mapping it back shifts again."""
    ms = FlowModelSampling(SHIFT)
    normal = flow_sigmas("normal", 4, SHIFT)
    line = [1.0 + (ms.sigma_min - 1.0) * i / 3 for i in range(4)]
    assert normal == pytest.approx([*(shifted(v) for v in line), 0.0], rel=1e-5)
    sgm = flow_sigmas("sgm_uniform", 4, SHIFT)
    line = [1.0 + (ms.sigma_min - 1.0) * i / 4 for i in range(4)]
    assert sgm == pytest.approx([*(shifted(v) for v in line), 0.0], rel=1e-5)


def test_closed_form_schedules_span_sigma_max_to_sigma_min():
    ms = FlowModelSampling(SHIFT)
    for name in ("karras", "exponential", "kl_optimal"):
        sigmas = flow_sigmas(name, 6, SHIFT)
        assert len(sigmas) == 7 and sigmas[-1] == 0.0, name
        assert sigmas[0] == pytest.approx(1.0, rel=1e-5) and sigmas[-2] == pytest.approx(ms.sigma_min, rel=1e-4)
        assert all(x > y for x, y in itertools.pairwise(sigmas)), name
    karras = flow_sigmas("karras", 6, SHIFT)
    rho, lo = 7.0, ms.sigma_min ** (1 / 7)
    assert karras[2] == pytest.approx((1 + 0.4 * (lo - 1)) ** rho, rel=1e-5)
    exponential = flow_sigmas("exponential", 6, SHIFT)
    assert exponential[3] == pytest.approx(math.exp(math.log(ms.sigma_min) * 0.6), rel=1e-5)


def test_linear_quadratic_and_ddim_uniform():
    lq = flow_sigmas("linear_quadratic", 4, SHIFT)  # linear to 0.025 over 2 steps, then quadratic to 1
    assert lq == pytest.approx([1.0, 0.9875, 0.975, 0.725, 0.0], abs=1e-6)
    ms = FlowModelSampling(SHIFT)
    ddim = flow_sigmas("ddim_uniform", 4, SHIFT)  # table entries 1, 251, 501, 751 from the top
    assert ddim == pytest.approx([float(ms.sigmas[i]) for i in (751, 501, 251, 1)] + [0.0], rel=1e-6)


def test_beta_quantiles_and_schedule():
    # The regularized incomplete beta against a midpoint-rule integral of the density.
    a = b = 0.6
    norm = math.gamma(a + b) / (math.gamma(a) * math.gamma(b))
    n = 200_000
    for x in (0.1, 0.37, 0.8):
        # substitute u = x·s^(1/a) to remove the endpoint singularity: ∫0^x = x^a/a ∫0^1 (1 − x s^(1/a))^(b−1) ds
        integral = (x**a / a) * sum((1 - x * ((k + 0.5) / n) ** (1 / a)) ** (b - 1) for k in range(n)) / n
        assert beta_cdf(x, a, b) == pytest.approx(norm * integral, abs=1e-5)
    assert beta_ppf(0.5, a, b) == pytest.approx(0.5, abs=1e-12)  # symmetric
    assert beta_cdf(beta_ppf(0.9, a, b), a, b) == pytest.approx(0.9, abs=1e-12)
    ms = FlowModelSampling(SHIFT)
    sigmas = flow_sigmas("beta", 5, SHIFT)
    picks = [round(beta_ppf(1 - i / 5, a, b) * 999) for i in range(5)]
    assert sigmas == pytest.approx([float(ms.sigmas[p]) for p in picks] + [0.0], rel=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "simple"])
def test_every_sampler_runs_the_schedule_it_is_given(sampler, schedule):
    scheduler = make_scheduler(sampler, SHIFT, {"num_train_timesteps": 1000})
    timesteps = set_schedule(scheduler, 6, 64, torch.device("cpu"), schedule)
    expected = torch.tensor(flow_sigmas(schedule, 6, SHIFT))
    assert torch.equal(scheduler.sigmas.cpu(), expected)
    assert torch.allclose(timesteps, expected[:-1] * 1000)


def test_unknown_schedules_are_refused_with_the_choices():
    with pytest.raises(InvalidRequest) as err:
        flow_sigmas("align_your_steps", 4, SHIFT)
    assert err.value.code == "unsupported_scheduler" and err.value.choices == list(SCHEDULES)
