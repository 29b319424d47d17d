"""``zimage-platform plan``: capacity planning by simulation (registered in ``zimage_platform.cli``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from zimage_platform.errors import InvalidRequest

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

DEFAULT_LATENCY = Path("ops/latency/h800-mig.yaml")


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values or []:
        name, sep, number = value.partition("=")
        if not sep or not name or not number:
            raise InvalidRequest(f"{option} takes NAME=VALUE, got {value!r}", code="invalid_option", param=option)
        pairs[name] = number
    return pairs


def _number(value: str, option: str, kind: type = float):
    try:
        return kind(value)
    except ValueError:
        raise InvalidRequest(f"{option}: {value!r} is not a number", code="invalid_option", param=option) from None


def _what_if(config: PlatformConfig, max_batch: dict[str, str], max_wait_ms: dict[str, str]) -> PlatformConfig:
    """The config with pool batch caps / merge waits replaced (``--max-batch``, ``--max-wait-ms``)."""
    pools = dict(config.pools)
    for option, values, field in (
        ("--max-batch", max_batch, "max_batch"),
        ("--max-wait-ms", max_wait_ms, "max_wait_ms"),
    ):
        for pool, value in values.items():
            if pool not in pools:
                raise InvalidRequest(
                    f"{option}: unknown pool {pool!r}", code="unknown_pool", param=option, choices=sorted(pools)
                )
            kind = int if field == "max_batch" else float
            pools[pool] = pools[pool].model_copy(update={field: {"default": _number(value, option, kind)}})
    return config.model_copy(update={"pools": pools})


def plan(
    profile: Annotated[Path | None, typer.Option(help="Load profile YAML (ops/profiles/*.yaml).")] = None,
    latency: Annotated[
        Path,
        typer.Option(
            help="Engine latency: compute-model parameters (ops/latency/*.yaml), a measured table, "
            "or a `bench engine --json-out` file."
        ),
    ] = DEFAULT_LATENCY,
    replicas: Annotated[
        list[str] | None, typer.Option(help="POOL=N or POOL/VARIANT=N: fixed replicas (repeatable).")
    ] = None,
    search: Annotated[bool, typer.Option(help="Find the fewest replicas meeting the profile's p95 SLOs.")] = False,
    autoscale: Annotated[bool, typer.Option(help="Autoscale deployments not fixed by --replicas.")] = True,
    tflops: Annotated[
        list[str] | None, typer.Option(help="PROFILE:PRECISION=TFLOPS achieved per slice (repeatable).")
    ] = None,
    max_batch: Annotated[list[str] | None, typer.Option(help="What-if: POOL=N batch cap (repeatable).")] = None,
    max_wait_ms: Annotated[list[str] | None, typer.Option(help="What-if: POOL=MS merge wait (repeatable).")] = None,
    latency_table: Annotated[bool, typer.Option(help="Print the engine latency table and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
) -> None:
    """Simulate a load profile on the platform's own scheduler: per-class p50/p95/p99, queue peaks,
    429s, GPU-hours and cost, and replicas per pool (``--search``: the fewest that meet the SLOs)."""
    from zimage_platform.cli import config
    from zimage_platform.scheduling.simulation import (
        ComputeModel,
        load_latency,
        load_profile,
        search_replicas,
        simulate,
    )
    from zimage_platform.scheduling.simulation.report import latency_table as table_of
    from zimage_platform.scheduling.simulation.report import render

    cfg = _what_if(config(), _pairs(max_batch, "--max-batch"), _pairs(max_wait_ms, "--max-wait-ms"))
    achieved: dict[str, dict[str, float]] = {}
    for name, value in _pairs(tflops, "--tflops").items():
        slice_, _, precision = name.partition(":")
        for p in [precision] if precision else ["bf16", "fp16", "fp8"]:
            achieved.setdefault(slice_, {})[p] = _number(value, "--tflops")
    model = load_latency(latency, cfg, achieved_tflops=achieved)
    if latency_table:
        if not isinstance(model, ComputeModel):
            raise InvalidRequest("--latency-table needs a compute-model file", code="invalid_option", param="latency")
        text, rows = table_of(model, cfg, cfg.buckets)
        typer.echo(json.dumps(rows, indent=2) if as_json else text)
        return
    if profile is None:
        raise InvalidRequest("--profile is required (ops/profiles/*.yaml)", code="missing_parameter", param="profile")
    load = load_profile(profile)
    fixed = cfg.deployment_counts(
        {k: _number(v, "--replicas", int) for k, v in _pairs(replicas, "--replicas").items()}, "--replicas"
    )
    if search:
        found = search_replicas(cfg, load, model)
        typer.echo(json.dumps(found.to_dict(), indent=2, default=str) if as_json else render(found.result, found))
        if not found.feasible:
            raise typer.Exit(1)
        return
    result = simulate(cfg, load, model, replicas=fixed, autoscale=autoscale)
    typer.echo(json.dumps(result.to_dict(), indent=2, default=str) if as_json else render(result))
