"""``zimage-platform ops``: the Kubernetes operations (registered in ``zimage_platform.cli``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from zimage_platform.errors import InvalidRequest, PlatformError

Kubeconfig = Annotated[str | None, typer.Option(help="kubeconfig file (default: in-cluster, else $KUBECONFIG).")]
Context = Annotated[str | None, typer.Option(help="kubeconfig context.")]
Namespace = Annotated[str | None, typer.Option(help="Namespace (default: the pod's, else the context's).")]


def _connect(kubeconfig: str | None, context: str | None, namespace: str | None = None):
    from kubernetes.config import ConfigException

    from zimage_platform.k8s.client import api_client, default_namespace

    try:
        return api_client(kubeconfig, context), namespace or default_namespace(kubeconfig, context)
    except ConfigException as exc:
        raise PlatformError(f"no Kubernetes API to talk to: {exc}", code="kubernetes_config") from None


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """An API refusal (403, 404, 409 on a changed resourceVersion) is an error line, not a trace."""
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        raise PlatformError(
            f"Kubernetes API: {exc.status} {exc.reason}: {exc.body or ''}".strip(), code="kubernetes_api"
        ) from None


def mig_plan(
    selector: Annotated[
        str | None, typer.Option(help="Node label selector (e.g. nvidia.com/gpu.present=true).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The inventory and plan as JSON.")] = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Read the nodes' MIG slices and labels; print pool sizes and Helm values that fit them."""
    from kubernetes.client import CoreV1Api

    from zimage_platform.cli import config
    from zimage_platform.k8s.mig import node_gpus, plan_pools, render_plan

    api, _ = _connect(kubeconfig, context)
    with _api_errors():
        nodes = CoreV1Api(api).list_node(label_selector=selector or "")
    plan = plan_pools(config(), [node_gpus(n) for n in api.sanitize_for_serialization(nodes)["items"]])
    typer.echo(json.dumps(plan.to_dict(), indent=2) if as_json else render_plan(plan).rstrip())


def tenants_sync(
    name: Annotated[str, typer.Option(help="The Secret/ConfigMap (the chart's: <release>-tenants).")],
    kind: Annotated[str, typer.Option(help="secret or configmap.")] = "secret",
    directory: Annotated[
        list[Path] | None, typer.Option("--dir", help="Tenant folders (default: the config's tenancy.dirs).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Say what would change; write nothing.")] = False,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Write the tenant definitions (key hashes only) to a Secret or ConfigMap: create, patch, or nothing."""
    from zimage_platform.cli import config
    from zimage_platform.k8s.tenants import sync_tenants, tenant_files

    if kind not in ("secret", "configmap"):
        raise InvalidRequest(
            f"--kind must be secret or configmap, not {kind!r}", code="invalid_option", choices=["secret", "configmap"]
        )
    files = tenant_files(list(directory or config().tenancy.dirs))
    api, ns = _connect(kubeconfig, context, namespace)
    with _api_errors():
        outcome = sync_tenants(api, ns, name, files, kind=kind, dry_run=dry_run)  # type: ignore[arg-type]
    typer.echo(json.dumps(outcome.to_dict()))


def promo(
    rayservice: Annotated[str, typer.Option(help="The RayService (the chart's: the release's full name).")],
    window: Annotated[
        str | None, typer.Option(help="START/END (ISO 8601 with offset): apply inside, restore after.")
    ] = None,
    min_replicas: Annotated[
        list[str] | None, typer.Option(help="POOL=N or POOL/VARIANT=N: engine replicas during the window (repeatable).")
    ] = None,
    restore: Annotated[bool, typer.Option(help="Restore the recorded originals now (window or not).")] = False,
    now: Annotated[str | None, typer.Option(help="Pretend it is this time (ISO 8601), for a dry run.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the patch; write nothing.")] = False,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Pre-scale the RayService for a promotion window (Serve minimums, worker-group minimums) and
    restore it afterwards; idempotent, for a CronJob that runs every few minutes."""
    from zimage_platform.k8s.promo import Window, promote

    if not restore and (window is None or not min_replicas):
        raise InvalidRequest("give --window and at least one --min-replicas, or --restore", code="missing_parameter")
    minimums: dict[str, int] = {}
    for value in min_replicas or []:
        pool, sep, n = value.partition("=")
        if not sep or not n.isdigit():
            raise InvalidRequest(f"--min-replicas takes POOL=N, got {value!r}", code="invalid_option")
        minimums[pool] = int(n)
    moment = datetime.fromisoformat(now) if now else datetime.now(UTC)
    if moment.tzinfo is None:
        raise InvalidRequest("--now needs a UTC offset", code="invalid_option")
    api, ns = _connect(kubeconfig, context, namespace)
    with _api_errors():
        outcome = promote(
            api,
            ns,
            rayservice,
            minimums,
            window=Window.parse(window) if window else None,
            now=moment,
            restore=restore,
            dry_run=dry_run,
        )
    typer.echo(json.dumps(outcome.to_dict(), default=str))
