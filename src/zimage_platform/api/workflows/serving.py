"""Saved workflows: a tenant's API-format graphs with named parameters, run as platform jobs.

A graph may also be PUT in ComfyUI's UI format (a saved workflow, a template): it is converted
to the API format as ComfyUI's frontend does (``workflows/ui_format.py``), and the API graph is
what is stored, shown and run (parameters name its node ids; a subgraph's are ``"57:3"``).

"Design once, run many times": a team keeps a ComfyUI workflow in git, PUTs it with the
inputs it wants to vary (``prompt`` → ``["6", "inputs", "text"]``, ``seed``, ``size`` ...), and
each run is one platform job — the same job ``POST /v1/jobs`` creates, compiled by the same
compiler the ComfyUI API uses.
"""

from __future__ import annotations

import asyncio
import copy
import re
from typing import Any

from zimage_platform.api.generation import job_view, request_hash, submit
from zimage_platform.api.graphs import NodeRejected, catalog_for, prepare_jobs
from zimage_platform.api.services import PlatformServices
from zimage_platform.api.workflows.protocol import ParameterSpec, WorkflowPut, WorkflowRun
from zimage_platform.errors import InvalidRequest, PlatformError
from zimage_platform.pipeline.buckets import Resolution
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.tenancy import TenantSpec
from zimage_platform.workflows import NODES, CompiledPrompt, PromptRejected, compile_prompt, object_info
from zimage_platform.workflows.models import WorkflowRow
from zimage_platform.workflows.store import ComfyStore, WorkflowNotFound, WorkflowStore
from zimage_platform.workflows.ui_format import is_ui_workflow, ui_to_api
from zimage_platform.workflows.validation import check_stored_size

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TYPES = {"INT": "int", "FLOAT": "float", "STRING": "string", "COMBO": "string", "BOOLEAN": "bool"}


class WorkflowMissing(PlatformError):
    code = "workflow_not_found"
    status = 404


class WorkflowInvalid(InvalidRequest):
    """The graph (or a run's values) does not compile; ``node_errors`` has ComfyUI's detail."""

    def __init__(self, message: str, *, code: str, param: str | None, choices=None, node_errors=None) -> None:
        super().__init__(message, code=code, param=param, choices=choices)
        self.node_errors = node_errors or {}


def _check_name(name: str) -> None:
    if not NAME.match(name):
        raise InvalidRequest(
            "a workflow name is 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit)",
            code="invalid_workflow_name",
            param="name",
        )


def _target_type(graph: dict[str, Any], name: str, path: list[str]) -> str:
    """The widget type at ``path``; refuses paths that do not name a widget input of the graph."""
    param = f"parameters.{name}"
    if len(path) != 3 or path[1] != "inputs":
        raise InvalidRequest(
            f"{param}: a path is [node_id, 'inputs', input_name]", code="invalid_parameter", param=param
        )
    node = graph.get(path[0])
    spec = NODES.get(node.get("class_type")) if isinstance(node, dict) else None
    item = spec.input(path[2]) if spec is not None else None
    if item is None or not item.is_widget:
        raise InvalidRequest(
            f"{param}: node {path[0]} has no widget input {path[2]!r}",
            code="invalid_parameter",
            param=param,
            choices=[i.name for i in spec.inputs if i.is_widget] if spec is not None else sorted(graph),
        )
    return _TYPES[item.type]


def check_parameters(graph: dict[str, Any], parameters: dict[str, ParameterSpec]) -> dict[str, dict[str, Any]]:
    """Every parameter names widget inputs of the graph; fills in each parameter's type."""
    checked = {}
    for name, spec in parameters.items():
        if spec.type == "size":
            if spec.width is None or spec.height is None:
                raise InvalidRequest(
                    f"parameters.{name}: a size parameter needs `width` and `height` paths",
                    code="invalid_parameter",
                    param=f"parameters.{name}",
                )
        elif not spec.targets():
            raise InvalidRequest(
                f"parameters.{name}: give `path` or `paths`", code="invalid_parameter", param=f"parameters.{name}"
            )
        types = {_target_type(graph, name, path) for path in spec.targets()}
        kind = spec.type or (types.pop() if len(types) == 1 else None)
        if kind is None or (spec.type == "size" and types != {"int"}):
            raise InvalidRequest(
                f"parameters.{name}: its inputs have different types; set `type`",
                code="invalid_parameter",
                param=f"parameters.{name}",
            )
        checked[name] = {**spec.model_dump(exclude_none=True), "type": kind}
    return checked


def _coerce(name: str, kind: str, value: Any) -> Any:
    param = f"parameters.{name}"
    bad = InvalidRequest(f"{param} must be a {kind}", code="invalid_parameter", param=param)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "string":
        if not isinstance(value, str):
            raise bad
    elif kind == "size":
        if not isinstance(value, str):
            raise bad
        size = Resolution.parse(value, param=param)
        return size.width, size.height
    return value


def apply_parameters(row: WorkflowRow, values: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """The graph with the run's values put in; also which (node, input) each parameter feeds."""
    unknown = sorted(set(values) - set(row.parameters))
    if unknown:
        raise InvalidRequest(
            f"unknown parameter {unknown[0]!r}",
            code="unknown_parameter",
            param=unknown[0],
            choices=sorted(row.parameters),
        )
    graph = copy.deepcopy(row.graph)
    fed: dict[tuple[str, str], str] = {}
    for name, spec in row.parameters.items():
        if name in values:
            value = _coerce(name, spec["type"], values[name])
        elif spec.get("default") is not None:
            value = _coerce(name, spec["type"], spec["default"])
        else:
            value = None
        if spec["type"] == "size":
            pairs = [(spec["width"], value[0] if value else None), (spec["height"], value[1] if value else None)]
        else:
            pairs = [(path, value) for path in [*([spec["path"]] if spec.get("path") else []), *spec.get("paths", [])]]
        for path, v in pairs:
            fed[(path[0], path[2])] = name
            if v is not None:
                graph[path[0]]["inputs"][path[2]] = v
    return graph, fed


def _invalid(
    node_errors: dict[str, Any], fed: dict[tuple[str, str], str], error: dict | None = None
) -> WorkflowInvalid:
    """A ComfyUI validation failure in the platform's error shape, naming the parameter if one fed it."""
    for node, entry in node_errors.items():
        for failure in entry["errors"]:
            info = failure.get("extra_info") or {}
            input_name = info.get("input_name")
            param = fed.get((node, input_name)) or (f"graph.{node}.inputs.{input_name}" if input_name else None)
            return WorkflowInvalid(
                f"node {node} ({entry['class_type']}): {failure['message']}: {failure['details']}",
                code=info.get("code") or failure["type"],
                param=param,
                choices=info.get("choices"),
                node_errors=node_errors,
            )
    error = error or {"type": "invalid_workflow", "message": "the graph does not compile", "details": ""}
    return WorkflowInvalid(f"{error['message']} {error['details']}".strip(), code=error["type"], param="graph")


def compile_one(services: PlatformServices, graph: dict[str, Any], catalog, fed) -> CompiledPrompt:
    """Compile a saved workflow's graph: every output must compile, into exactly one job."""
    try:
        compiled = compile_prompt(graph, catalog, services.config)
    except PromptRejected as exc:
        raise _invalid(exc.node_errors, fed, exc.error) from None
    if compiled.node_errors:
        raise _invalid(compiled.node_errors, fed)
    if len(compiled.jobs) != 1:
        raise InvalidRequest(
            f"a saved workflow runs as one job; this graph makes {len(compiled.jobs)} "
            "(its outputs come from different samplers): save each as its own workflow",
            code="workflow_multiple_jobs",
            param="graph",
        )
    return compiled


class WorkflowService:
    def __init__(self, services: PlatformServices) -> None:
        self.services = services
        self.store = WorkflowStore(services.store.engine)
        self.files = ComfyStore(services.store.engine)

    def view(self, row: WorkflowRow, versions: list[int]) -> dict[str, Any]:
        return {
            "object": "workflow",
            "name": row.name,
            "version": row.version,
            "versions": versions,
            "description": row.description,
            "graph": row.graph,
            "parameters": row.parameters,
            "created_at": row.created_at,
        }

    async def put(self, tenant: TenantSpec, name: str, body: WorkflowPut) -> tuple[dict[str, Any], bool]:
        """Validate (parameters name widget inputs; the graph compiles to one job), then version."""
        _check_name(name)
        limits = self.services.config.limits
        graph = body.graph
        check_stored_size(graph, param="graph", max_bytes=limits.max_graph_bytes)  # 413 graph_too_large
        catalog = await catalog_for(self.services, tenant, self.files)
        if is_ui_workflow(graph):  # as ComfyUI saves it: convert as its frontend does, keep the API graph
            graph = await asyncio.to_thread(ui_to_api, graph, object_info(catalog))
        check_stored_size(graph, param="graph", max_bytes=limits.max_graph_bytes, max_nodes=limits.max_graph_nodes)
        parameters = check_parameters(graph, body.parameters)
        fed = {(p[0], p[2]): n for n, spec in body.parameters.items() for p in spec.targets()}
        compile_one(self.services, graph, catalog, fed)
        row, created = await asyncio.to_thread(self.store.put, tenant.id, name, graph, parameters, body.description)
        return self.view(row, await asyncio.to_thread(self.store.versions, tenant.id, name)), created

    async def _row(self, tenant: TenantSpec, name: str, version: int | None = None) -> WorkflowRow:
        _check_name(name)
        try:
            return await asyncio.to_thread(self.store.get, tenant.id, name, version)
        except WorkflowNotFound:
            what = f"version {version} of workflow {name}" if version else f"workflow {name}"
            raise WorkflowMissing(f"no {what}", param="name") from None

    async def get(self, tenant: TenantSpec, name: str, version: int | None) -> dict[str, Any]:
        row = await self._row(tenant, name, version)
        return self.view(row, await asyncio.to_thread(self.store.versions, tenant.id, name))

    async def list(self, tenant: TenantSpec) -> list[dict[str, Any]]:
        rows = await asyncio.to_thread(self.store.latest, tenant.id)
        return [
            {
                "object": "workflow",
                "name": row.name,
                "version": row.version,
                "description": row.description,
                "parameters": sorted(row.parameters),
                "created_at": row.created_at,
            }
            for row in rows
        ]

    async def delete(self, tenant: TenantSpec, name: str) -> None:
        _check_name(name)
        if not await asyncio.to_thread(self.store.delete, tenant.id, name):
            raise WorkflowMissing(f"no workflow {name}", param="name")

    async def run(
        self, tenant: TenantSpec, name: str, body: WorkflowRun, *, idempotency_key: str | None, trace: RequestTrace
    ) -> tuple[dict[str, Any], bool]:
        """One platform job from the workflow and the run's values (202, or 200 for a replayed key)."""
        row = await self._row(tenant, name, body.version)
        graph, fed = apply_parameters(row, body.parameters)
        catalog = await catalog_for(self.services, tenant, self.files)
        compiled = compile_one(self.services, graph, catalog, fed)
        body_hash = request_hash({"workflow": row.id, **body.model_dump(mode="json")})
        (prepared,) = await prepare_jobs(
            self.services,
            tenant,
            self.files,
            compiled,
            source="workflow",
            trace=trace,
            idempotency_key=idempotency_key,
            body_hash=body_hash,
            webhook_url=body.webhook_url,
        )
        if isinstance(prepared, NodeRejected):
            exc = prepared.error
            param = fed.get((prepared.node, prepared.input_name)) or (
                f"graph.{prepared.node}.inputs.{prepared.input_name}"
            )
            raise WorkflowInvalid(
                exc.message,
                code=exc.code,
                param=param,
                choices=exc.choices,
                node_errors={
                    prepared.node: {
                        "errors": [prepared.comfy_error()],
                        "dependent_outputs": prepared.job.outputs,
                        "class_type": graph[prepared.node]["class_type"],
                    }
                },
            )
        job_row, created = await submit(self.services, tenant, prepared)
        return job_view(self.services, job_row), created
