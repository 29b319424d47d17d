"""Sigma schedules by ComfyUI name, for Z-Image's shifted flow-matching model sampling.

ComfyUI describes a flow model by a table of 1000 sigmas, ``σ(t) = shift·t / (1 + (shift−1)·t)``
for ``t = 1/1000 … 1`` (``ModelSamplingAuraFlow`` / ``ModelSamplingDiscreteFlow``), and each of
its schedulers picks ``steps`` sigmas from that model sampling. The functions here compute
the same lists (float32, a trailing 0) from the published definitions, so a workflow's
``scheduler`` means what it means in ComfyUI:

- ``simple``: every ``1000/steps``-th table entry (for the platform's samplers this is the
  model's linear flow schedule, see :func:`zimage_platform.pipeline.samplers.set_schedule`);
- ``normal`` / ``sgm_uniform``: evenly spaced "timesteps" between σ_max and σ_min, mapped
  back through σ(t). For flow models ComfyUI's timestep *is* the (shifted) sigma, so the
  shift applies twice — reproduced here on purpose, it is what ComfyUI samples;
- ``karras`` (ρ = 7), ``exponential``, ``kl_optimal``: closed forms between σ_min and σ_max;
- ``beta`` (α = β = 0.6): table entries at the quantiles of a Beta distribution;
- ``linear_quadratic`` (Mochi's: linear to 0.025, then quadratic) and ``ddim_uniform``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from zimage_platform.errors import InvalidRequest

if TYPE_CHECKING:  # torch loads only when a schedule is computed (not for validation)
    import torch

#: ComfyUI's scheduler names the platform runs, in ComfyUI's order.
SCHEDULES: tuple[str, ...] = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)
TRAIN_STEPS = 1000


def check_schedule(name: str, *, param: str = "scheduler") -> str:
    if name not in SCHEDULES:
        raise InvalidRequest(
            f"unknown scheduler {name!r}", code="unsupported_scheduler", param=param, choices=list(SCHEDULES)
        )
    return name


def _shifted(shift: float, t: torch.Tensor) -> torch.Tensor:
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


class FlowModelSampling:
    """ComfyUI's sigma table of a shifted flow model (float32, as ComfyUI holds it)."""

    def __init__(self, shift: float) -> None:
        import torch

        self.shift = shift
        self.sigmas = _shifted(shift, torch.arange(1, TRAIN_STEPS + 1, dtype=torch.float32) / TRAIN_STEPS)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """ComfyUI's flow ``timestep`` is in sigma units (multiplier 1): shift it."""
        return _shifted(self.shift, timestep)


def _simple(ms: FlowModelSampling, steps: int) -> list[float]:
    stride = len(ms.sigmas) / steps
    return [float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]


def _ddim_uniform(ms: FlowModelSampling, steps: int) -> list[float]:
    # The table's second entry is never 0 for a flow model, so a trailing 0 is always added.
    stride = max(len(ms.sigmas) // steps, 1)
    picked = [float(ms.sigmas[x]) for x in range(1, len(ms.sigmas), stride)]
    return [*reversed(picked), 0.0]


def _normal(ms: FlowModelSampling, steps: int, *, sgm: bool = False) -> list[float]:
    import torch

    start, end = ms.sigma_max, ms.sigma_min
    timesteps = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return [float(ms.sigma(t)) for t in timesteps] + [0.0]


def _karras(ms: FlowModelSampling, steps: int, rho: float = 7.0) -> list[float]:
    import torch

    ramp = torch.linspace(0, 1, steps)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** rho] + [0.0]


def _exponential(ms: FlowModelSampling, steps: int) -> list[float]:
    import torch

    values = torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps).exp()
    return [float(s) for s in values] + [0.0]


def _kl_optimal(ms: FlowModelSampling, steps: int) -> list[float]:
    import torch

    if steps == 1:
        return [ms.sigma_max, 0.0]
    frac = torch.arange(steps, dtype=torch.float32) / (steps - 1)
    values = (frac * math.atan(ms.sigma_min) + (1 - frac) * math.atan(ms.sigma_max)).tan()
    return [float(s) for s in values] + [0.0]


def _linear_quadratic(ms: FlowModelSampling, steps: int, threshold: float = 0.025) -> list[float]:
    import torch

    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        quadratic_steps = steps - linear_steps
        linear = [i * threshold / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold * steps
        a = step_diff / (linear_steps * quadratic_steps**2)
        b = threshold / linear_steps - 2 * step_diff / quadratic_steps**2
        c = a * linear_steps**2
        quadratic = [a * i**2 + b * i + c for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in [*linear, *quadratic, 1.0]]
    return [float(s) for s in torch.tensor(schedule, dtype=torch.float32) * ms.sigma_max]


def _beta(ms: FlowModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> list[float]:
    last = len(ms.sigmas) - 1
    quantiles = [1 - i / steps for i in range(steps)]
    picked: list[float] = []
    previous = None
    for q in quantiles:
        index = round(beta_ppf(q, alpha, beta) * last)  # numpy.rint: ties to even, as round()
        if index != previous:
            picked.append(float(ms.sigmas[index]))
        previous = index
    return [*picked, 0.0]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (float64)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta distribution's quantile function, by bisection on :func:`beta_cdf` (to 1e-15)."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return (lo + hi) / 2


_SCHEDULERS = {
    "simple": _simple,
    "sgm_uniform": lambda ms, steps: _normal(ms, steps, sgm=True),
    "karras": _karras,
    "exponential": _exponential,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "normal": _normal,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}


def flow_sigmas(schedule: str, steps: int, shift: float) -> list[float]:
    """``steps`` sigmas (high to low) and a trailing 0, as ComfyUI's ``schedule`` picks them.

    ``beta`` may merge repeated table entries (as ComfyUI does), giving fewer steps."""
    check_schedule(schedule)
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return _SCHEDULERS[schedule](FlowModelSampling(shift), steps)
