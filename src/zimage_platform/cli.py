"""The ``zimage-platform`` command.

Errors the platform raises on purpose print as ``error [code]: message`` (plus the valid
choices) on stderr and exit 2 for a caller's mistake, 1 for anything else — never a trace.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from zimage_platform.config import PlatformConfig, load_config
from zimage_platform.errors import InvalidRequest, PlatformError

app = typer.Typer(help="Z-Image inference platform.", no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Checkpoints.", no_args_is_help=True)
engines_app = typer.Typer(help="Compiled engines: build, verify, list.", no_args_is_help=True)
billing_app = typer.Typer(help="Billing: reports, audits, monthly statements.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and API keys (audited; no HTTP endpoint does this).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(engines_app, name="engines")
app.add_typer(tenants_app, name="tenants")
app.add_typer(billing_app, name="billing")

F = TypeVar("F", bound=Callable[..., Any])
_state: dict[str, Any] = {}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("diffusers", "transformers", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def config() -> PlatformConfig:
    if "config" not in _state:
        from zimage_platform.serve.launcher import attach_embedded_s3

        _state["config"] = attach_embedded_s3(load_config(_state.get("config_path")))
    return _state["config"]


def fail(exc: PlatformError) -> None:
    line = f"error [{exc.code}]: {exc.message}"
    if exc.choices:
        line += f" (valid: {', '.join(map(str, exc.choices))})"
    typer.echo(line, err=True)
    raise typer.Exit(2 if isinstance(exc, InvalidRequest) else 1)


def reports_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PlatformError as exc:
            fail(exc)
        except (FileNotFoundError, ValueError) as exc:  # config files and values
            typer.echo(f"error [invalid_config]: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    config_path: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Platform config YAML (default: $ZIMAGE_CONFIG or ./zimage-platform.yaml)."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_libraries()
    _state.clear()
    _state["config_path"] = config_path


# -- models ---------------------------------------------------------------------------------


@models_app.command("init-tiny")
@reports_errors
def models_init_tiny(
    directory: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    force: Annotated[bool, typer.Option(help="Rebuild even if the folder holds a checkpoint.")] = False,
) -> None:
    """Build the tiny offline Z-Image checkpoint (deterministic: same bytes every time)."""
    from zimage_platform.pipeline.checkpoint import fingerprint
    from zimage_platform.pipeline.tiny import init_tiny_checkpoint

    path = init_tiny_checkpoint(directory, force=force)
    typer.echo(json.dumps({"checkpoint": str(path), "fingerprint": fingerprint(path)}))


@models_app.command("check")
@reports_errors
def models_check(directory: Annotated[Path, typer.Argument(help="Checkpoint folder.")]) -> None:
    """Validate a checkpoint folder (safetensors only, intact files) and print its fingerprint."""
    from zimage_platform.pipeline.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(directory)
    typer.echo(json.dumps({"checkpoint": str(info.path), "fingerprint": info.fingerprint}))


# -- engines --------------------------------------------------------------------------------


@engines_app.command("build")
@reports_errors
def engines_build(
    variant: Annotated[str, typer.Option(help="Variant (engines/<variant>.yaml).")] = "turbo",
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt.")] = "onnxruntime",
    bucket: Annotated[list[str] | None, typer.Option(help="Only these buckets (WxH); repeatable.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if an identical engine exists.")] = False,
    precision: Annotated[str | None, typer.Option(help="fp32, fp16, bf16 or fp8 (default: the variant's).")] = None,
) -> None:
    """Build a compiled engine and its manifest.json."""
    from zimage_platform.engines import build_engine, engine_folder

    manifest = build_engine(config(), variant, backend, buckets=bucket, force=force, precision=precision)
    typer.echo(
        json.dumps(
            {
                "engine": str(engine_folder(config(), variant, backend, manifest.precision)),
                "buckets": manifest.buckets,
                "files": manifest.files,
                "checkpoint_fingerprint": manifest.checkpoint_fingerprint,
            }
        )
    )


@engines_app.command("verify")
@reports_errors
def engines_verify(
    variant: Annotated[str, typer.Option()] = "turbo",
    backend: Annotated[str, typer.Option()] = "onnxruntime",
    bucket: Annotated[list[str] | None, typer.Option(help="Only these buckets (WxH); repeatable.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Max pixel difference (0-255).")] = None,
    precision: Annotated[str | None, typer.Option(help="The engine's precision (default: the variant's).")] = None,
    upload: Annotated[
        str | None, typer.Option(help="Once verified, upload the engine and its manifest to s3://bucket/prefix.")
    ] = None,
) -> None:
    """Compare a built engine with torch on fixed seeds; exit 1 above tolerance (nothing is uploaded)."""
    from zimage_platform.engines import verify_engine

    results = verify_engine(config(), variant, backend, buckets=bucket, tolerance=tolerance, precision=precision)
    for r in results:
        typer.echo(json.dumps(r.model_dump()))
    failed = [r.bucket for r in results if not r.passed]
    if failed:
        typer.echo(f"error [engine_verify_failed]: {backend} differs from torch beyond tolerance at {failed}", err=True)
        raise typer.Exit(1)
    if upload:
        from zimage_platform.engines.publish import publish_engine

        target = (variant, backend, precision or config().variant(variant).precision)
        written = publish_engine(config(), target, upload)
        typer.echo(json.dumps({"uploaded": upload, "engine": "/".join(target), "written": written}))


@engines_app.command("targets")
@reports_errors
def engines_targets(
    pool: Annotated[list[str] | None, typer.Option(help="Only engines these pools serve; repeatable.")] = None,
) -> None:
    """Print `variant backend precision` for every compiled engine the pools serve (for shell loops)."""
    from zimage_platform.engines.publish import engine_targets

    for target in engine_targets(config(), pool):
        typer.echo(" ".join(target))


@engines_app.command("pull")
@reports_errors
def engines_pull(
    uri: Annotated[str, typer.Argument(help="Where `engines verify --upload` put them: s3://bucket/prefix.")],
    pool: Annotated[list[str] | None, typer.Option(help="Only engines these pools serve; repeatable.")] = None,
) -> None:
    """Download the published engines the pools serve into the engine build folder (exit 1 if one is missing)."""
    from zimage_platform.engines.publish import engine_targets, pull_engine

    for target in engine_targets(config(), pool):
        typer.echo(json.dumps({"engine": "/".join(target), "pulled": pull_engine(config(), target, uri)}))


@engines_app.command("list")
@reports_errors
def engines_list() -> None:
    """Print every built engine and what it was built from."""
    from zimage_platform.engines import BACKENDS, engine_folder, read_manifest

    cfg = config()
    for variant in sorted(cfg.variants):
        for backend in sorted(BACKENDS):
            for precision in ("fp32", "fp16", "bf16", "fp8"):
                manifest = read_manifest(engine_folder(cfg, variant, backend, precision))
                if manifest is None:
                    continue
                typer.echo(
                    json.dumps(
                        {
                            "variant": variant,
                            "backend": backend,
                            "precision": manifest.precision,
                            "buckets": manifest.buckets,
                            "checkpoint_fingerprint": manifest.checkpoint_fingerprint,
                            "verified": {v.bucket: v.passed for v in manifest.verification},
                        }
                    )
                )


# -- tenants --------------------------------------------------------------------------------

Actor = Annotated[str, typer.Option(help="Who is doing this (recorded in the audit log).", envvar="ZIMAGE_ACTOR")]


def _admin(actor: str):
    from zimage_platform.serve.components import job_store, tenant_registry
    from zimage_platform.tenancy.admin import TenantAdmin
    from zimage_platform.tenancy.audit import AuditLog

    cfg = config()
    store = job_store(cfg, migrate=True)
    return TenantAdmin(tenant_registry(cfg), Path(cfg.tenancy.dirs[0]), AuditLog(store.engine), actor=actor)


def _expiry(expires_in_days: int | None):
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None


def _default_actor() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"


@tenants_app.command("add")
@reports_errors
def tenants_add(
    tenant_id: Annotated[str, typer.Argument(help="Slug: lowercase letters, digits, dashes.")],
    name: Annotated[str, typer.Option(help="Display name.")],
    plan: Annotated[str, typer.Option()] = "standard",
    priority: Annotated[str, typer.Option(help="realtime, standard or bulk.")] = "standard",
    requests_per_minute: Annotated[int, typer.Option()] = 600,
    images_per_minute: Annotated[int, typer.Option()] = 1200,
    concurrent_jobs: Annotated[int, typer.Option()] = 64,
    monthly_images: Annotated[int | None, typer.Option()] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Largest output in pixels (1048576 = 1024x1024).")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Allowed variant (repeatable; default all).")] = None,
    webhook_secret_ref: Annotated[str | None, typer.Option(help="env:VAR or file:/path")] = None,
    key_expires_in_days: Annotated[int | None, typer.Option()] = None,
    actor: Actor = "",
) -> None:
    """Create a tenant with one API key; the key is printed once and stored only as a hash."""
    from zimage_platform.tenancy import TenantLimits, TenantSpec

    spec = TenantSpec(
        id=tenant_id,
        display_name=name,
        plan=plan,
        priority_class=priority,
        webhook_secret_ref=webhook_secret_ref,
        limits=TenantLimits(
            requests_per_minute=requests_per_minute,
            images_per_minute=images_per_minute,
            concurrent_jobs=concurrent_jobs,
            monthly_images=monthly_images,
            max_pixels=max_pixels,
            allowed_variants=variant or [],
        ),
    )
    raw = _admin(actor or _default_actor()).add(spec, key_expires_at=_expiry(key_expires_in_days))
    typer.echo(json.dumps({"tenant": tenant_id, "api_key": raw, "note": "shown once; store it now"}))


@tenants_app.command("list")
@reports_errors
def tenants_list() -> None:
    """Tenants with their plan, class, status and keys (ids and dates, never secrets)."""
    from zimage_platform.serve.components import tenant_registry

    for spec in tenant_registry(config()).all():
        keys = [
            {
                "id": k.id,
                "label": k.label,
                "created_at": k.created_at.isoformat(),
                "expires_at": k.expires_at.isoformat() if k.expires_at else None,
                "revoked": k.revoked_at is not None,
            }
            for k in spec.api_keys
        ]
        typer.echo(
            json.dumps(
                {
                    "id": spec.id,
                    "name": spec.display_name,
                    "plan": spec.plan,
                    "priority_class": spec.priority_class,
                    "status": spec.status,
                    "keys": keys,
                }
            )
        )


@tenants_app.command("rotate-key")
@reports_errors
def tenants_rotate_key(
    tenant_id: str, expires_in_days: Annotated[int | None, typer.Option()] = None, actor: Actor = ""
) -> None:
    """Issue a new key; the old ones keep working until revoked (rotation without downtime)."""
    raw = _admin(actor or _default_actor()).rotate_key(tenant_id, expires_at=_expiry(expires_in_days))
    typer.echo(json.dumps({"tenant": tenant_id, "api_key": raw, "note": "shown once; store it now"}))


@tenants_app.command("revoke-key")
@reports_errors
def tenants_revoke_key(tenant_id: str, key_id: str, actor: Actor = "") -> None:
    """Revoke one key (by its id, as shown by ``tenants list``)."""
    _admin(actor or _default_actor()).revoke_key(tenant_id, key_id)
    typer.echo(json.dumps({"tenant": tenant_id, "revoked": key_id}))


@tenants_app.command("suspend")
@reports_errors
def tenants_suspend(
    tenant_id: str, reason: Annotated[str, typer.Option(help="Shown to the tenant's callers.")], actor: Actor = ""
) -> None:
    """Suspend a tenant: its requests get 403 ``tenant_suspended`` with the reason."""
    _admin(actor or _default_actor()).suspend(tenant_id, reason)
    typer.echo(json.dumps({"tenant": tenant_id, "status": "suspended"}))


@tenants_app.command("resume")
@reports_errors
def tenants_resume(tenant_id: str, actor: Actor = "") -> None:
    _admin(actor or _default_actor()).resume(tenant_id)
    typer.echo(json.dumps({"tenant": tenant_id, "status": "active"}))


@tenants_app.command("audit")
@reports_errors
def tenants_audit(
    tenant_id: Annotated[str | None, typer.Option("--tenant")] = None,
    limit: Annotated[int, typer.Option()] = 100,
) -> None:
    """The audit log (newest first), then a check of its hash chain; exit 1 if it was tampered with."""
    from zimage_platform.serve.components import job_store
    from zimage_platform.tenancy.audit import AuditLog

    log_ = AuditLog(job_store(config(), migrate=True).engine)
    for event in log_.events(tenant_id=tenant_id, limit=limit):
        typer.echo(
            json.dumps(
                {
                    "seq": event.seq,
                    "at": event.at.isoformat(),
                    "actor": event.actor,
                    "action": event.action,
                    "tenant": event.tenant_id,
                    "details": event.details,
                }
            )
        )
    findings = log_.verify()
    for finding in findings:
        typer.echo(f"audit chain: {finding}", err=True)
    if findings:
        raise typer.Exit(1)


# -- billing --------------------------------------------------------------------------------


def _parse_day(value: str, param: str):
    """``YYYY-MM-DD``, ``today``, ``yesterday`` or ``today-N`` (UTC): CronJobs need relative days."""
    from datetime import UTC, date, datetime, timedelta

    today = datetime.now(UTC).date()
    relative = {"today": today, "yesterday": today - timedelta(days=1)}
    if value in relative:
        return relative[value]
    if value.startswith("today-") and value[6:].isdigit():
        return today - timedelta(days=int(value[6:]))
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{param} must be a date (YYYY-MM-DD, today, yesterday or today-N): {value!r}",
            code="invalid_date",
            param=param,
            choices=["YYYY-MM-DD", "today", "yesterday", "today-N"],
        ) from None


@billing_app.command("report")
@reports_errors
def billing_report(
    start: Annotated[str, typer.Option("--from", help="First day (UTC), YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--to", help="Last day, inclusive.")],
    tenant: Annotated[str | None, typer.Option(help="One tenant (default: all).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or parquet.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File (required for parquet).")] = None,
) -> None:
    """Totals by day and variant: images, GPU-seconds, amount."""
    from zimage_platform.billing.report import render_csv, render_table, report_lines, write_parquet
    from zimage_platform.serve.components import job_store

    if fmt not in ("table", "csv", "parquet"):
        raise InvalidRequest(
            f"unknown format {fmt!r}", code="invalid_format", param="format", choices=["table", "csv", "parquet"]
        )
    lines, total = report_lines(
        job_store(config(), migrate=True).engine, tenant, _parse_day(start, "from"), _parse_day(end, "to")
    )
    if fmt == "parquet":
        if output is None:
            raise InvalidRequest("--format parquet needs --output FILE", code="output_required", param="output")
        write_parquet(lines, output)
        typer.echo(json.dumps({"written": str(output), "rows": len(lines)}))
        return
    text = render_table(lines, total) if fmt == "table" else render_csv(lines)
    if output is not None:
        output.write_text(text)
    else:
        typer.echo(text)


@billing_app.command("audit")
@reports_errors
def billing_audit(
    start: Annotated[str, typer.Option("--from")],
    end: Annotated[str, typer.Option("--to")],
    tenant: Annotated[str | None, typer.Option()] = None,
    deep: Annotated[bool, typer.Option(help="Download every image and hash it (slow).")] = False,
    pushgateway: Annotated[
        str | None,
        typer.Option(help="Push the outcome to this Prometheus Pushgateway (host:port or URL) for alerting."),
    ] = None,
) -> None:
    """Verify each tenant's hash chain and reconcile ledger ↔ S3 ↔ jobs; exit 1 on any finding."""
    from zimage_platform.billing import KINDS, audit
    from zimage_platform.serve.components import job_store, result_store
    from zimage_platform.telemetry.metrics import push_audit_outcome

    cfg = config()
    findings = audit(
        job_store(cfg, migrate=True).engine,
        result_store(cfg),
        tenant_id=tenant,
        start=_parse_day(start, "from"),
        end=_parse_day(end, "to"),
        deep=deep,
    )
    for finding in findings:
        typer.echo(json.dumps(finding.to_dict()))
    summary = {kind: sum(1 for f in findings if f.kind == kind) for kind in sorted({f.kind for f in findings})}
    typer.echo(json.dumps({"findings": len(findings), "by_kind": summary}), err=True)
    if pushgateway:
        push_audit_outcome(pushgateway, {kind: summary.get(kind, 0) for kind in KINDS})
    if findings:
        raise typer.Exit(1)


@billing_app.command("entries")
@reports_errors
def billing_entries(
    job: Annotated[str | None, typer.Option(help="A job id (from POST /v1/jobs).")] = None,
    trace: Annotated[str | None, typer.Option(help="A trace id (the x-trace-id response header).")] = None,
) -> None:
    """The ledger rows billed for one job or trace (JSON lines, with their hashes): a request's bill."""
    from zimage_platform.billing import entries_of
    from zimage_platform.serve.components import job_store

    if not (job or trace):
        raise InvalidRequest("name --job or --trace", code="missing_parameter", choices=["--job", "--trace"])
    rows = entries_of(job_store(config(), migrate=True).engine, job_id=job, trace_id=trace)
    for row in rows:
        typer.echo(json.dumps({**row.content(), "prev_hash": row.prev_hash, "hash": row.hash}))
    if not rows:
        typer.echo("no ledger rows (nothing delivered, or not billed yet)", err=True)
        raise typer.Exit(1)


@billing_app.command("statement")
@reports_errors
def billing_statement(
    tenant: Annotated[str, typer.Option()],
    month: Annotated[str, typer.Option(help="YYYY-MM")],
) -> None:
    """Write the month's statement (CSV + one-page HTML with a usage chart) to the tenant's S3 prefix."""
    from zimage_platform.billing.report import write_statement
    from zimage_platform.serve.components import job_store, result_store

    cfg = config()
    _parse_day(f"{month}-01", "month")
    csv_key, html_key, amount = write_statement(job_store(cfg, migrate=True).engine, result_store(cfg), tenant, month)
    typer.echo(json.dumps({"tenant": tenant, "month": month, "csv": csv_key, "html": html_key, "total": str(amount)}))


# -- generate -------------------------------------------------------------------------------


@app.command()
@reports_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw (any language).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="A .png file for one image, a folder for several.")],
    variant: Annotated[str, typer.Option(help="turbo, base or edit.")] = "turbo",
    size: Annotated[
        str | None, typer.Option(help="WIDTHxHEIGHT: a bucket, or any multiple of 16 within the variant's limits.")
    ] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    guidance: Annotated[float | None, typer.Option()] = None,
    negative: Annotated[str | None, typer.Option(help="Negative prompt (with guidance > 0).")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    n: Annotated[int, typer.Option("--n", help="Number of images (seeds seed, seed+1, ...).")] = 1,
    sampler: Annotated[str | None, typer.Option(help="euler, res_multistep, dpmpp_2m, unipc or ddim.")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Sigma schedule by ComfyUI name: simple (default), karras, beta, normal ...")
    ] = None,
    image: Annotated[Path | None, typer.Option(help="Input image for img2img / edit.")] = None,
    strength: Annotated[float | None, typer.Option(help="How much of the input image to redraw (0-1].")] = None,
    hires_from: Annotated[str | None, typer.Option(help="Hires-fix: draw at this bucket first, then refine.")] = None,
    hires_denoise: Annotated[float | None, typer.Option(help="Hires-fix refinement strength.")] = None,
    backend: Annotated[str | None, typer.Option(help="torch or onnxruntime (default: config).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint folder (default: the variant's).")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bar on stderr.")] = True,
) -> None:
    """Generate images from the CLI; prints one JSON line per image."""
    from zimage_platform.local import generate_images, load_input_image
    from zimage_platform.pipeline.params import GenerationParams

    params = GenerationParams(
        prompt=prompt,
        size=size,
        n=n,
        seed=seed,
        steps=steps,
        guidance=guidance,
        negative_prompt=negative,
        sampler=sampler,
        scheduler=scheduler,
        image=load_input_image(image) if image is not None else None,
        strength=strength,
        hires_from=hires_from,
        hires_denoise=hires_denoise,
    )
    for line in generate_images(
        config(), variant, params, output, backend=backend, checkpoint=checkpoint, show_progress=progress
    ):
        typer.echo(json.dumps(line))


@app.command()
@reports_errors
def serve(
    port: Annotated[int | None, typer.Option(help="HTTP port on 127.0.0.1 (default: config serve.port).")] = None,
) -> None:
    """Run the platform locally (Ray Serve, embedded S3, SQLite); prints the URL and a demo API key."""
    from zimage_platform.serve.launcher import run_forever

    cfg = config()
    if port is not None:
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": port})})
    run_forever(cfg)


@app.command()
@reports_errors
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo images.")] = Path("var/demo"),
) -> None:
    """The embedded default's main job: build the tiny checkpoint and engines, then draw samples."""
    from zimage_platform.local import run_demo

    for line in run_demo(config(), output):
        typer.echo(json.dumps(line))


# -- operations and capacity planning (commands live in k8s/ and scheduling/simulation/) -----

ops_app = typer.Typer(help="Kubernetes operations: MIG plan, tenant sync, promotion pre-scaling.", no_args_is_help=True)
app.add_typer(ops_app, name="ops")


def _register_ops() -> None:
    from zimage_platform.k8s import cli as ops
    from zimage_platform.scheduling.simulation.cli import plan

    ops_app.command("mig-plan")(reports_errors(ops.mig_plan))
    ops_app.command("tenants-sync")(reports_errors(ops.tenants_sync))
    ops_app.command("promo")(reports_errors(ops.promo))
    app.command("plan")(reports_errors(plan))


_register_ops()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
