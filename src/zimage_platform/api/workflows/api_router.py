"""HTTP routes of saved workflows: PUT/GET/DELETE ``/v1/workflows/{name}``, list, and run."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from zimage_platform.api.body import StrictJSONRoute
from zimage_platform.api.deps import MAX_QUERY_INT, Tenant, Trace
from zimage_platform.api.errors import error_response
from zimage_platform.api.jobs.protocol import Job
from zimage_platform.api.workflows.protocol import Workflow, WorkflowList, WorkflowPut, WorkflowRun
from zimage_platform.api.workflows.serving import WorkflowInvalid, WorkflowService

router = APIRouter(prefix="/v1/workflows", tags=["workflows"], route_class=StrictJSONRoute)


def _service(request: Request) -> WorkflowService:
    service = getattr(request.app.state, "workflows", None)
    if service is None:
        service = request.app.state.workflows = WorkflowService(request.app.state.services)
    return service


def _invalid(exc: WorkflowInvalid) -> JSONResponse:
    """422 in the platform's shape, with ComfyUI's ``node_errors`` for the detail."""
    return error_response(422, exc.code, exc.message, exc.param, choices=exc.choices, node_errors=exc.node_errors)


@router.get("", response_model=WorkflowList)
async def list_workflows(request: Request, tenant: Tenant) -> dict:
    return {"object": "list", "data": await _service(request).list(tenant)}


@router.put("/{name}", response_model=Workflow, status_code=201, responses={200: {"description": "Unchanged"}})
async def put_workflow(name: str, body: WorkflowPut, request: Request, response: Response, tenant: Tenant):
    """Save a version (201); the same content as the latest version is not a new one (200)."""
    try:
        workflow, created = await _service(request).put(tenant, name, body)
    except WorkflowInvalid as exc:
        return _invalid(exc)
    response.status_code = 201 if created else 200
    return workflow


@router.get("/{name}", response_model=Workflow)
async def get_workflow(
    name: str, request: Request, tenant: Tenant, version: Annotated[int | None, Query(ge=1, le=MAX_QUERY_INT)] = None
) -> dict:
    return await _service(request).get(tenant, name, version)


@router.delete("/{name}", status_code=204)
async def delete_workflow(name: str, request: Request, tenant: Tenant) -> Response:
    """Every version goes; jobs already run keep their images."""
    await _service(request).delete(tenant, name)
    return Response(status_code=204)


@router.post("/{name}/run", response_model=Job, status_code=202)
async def run_workflow(
    name: str,
    body: WorkflowRun,
    request: Request,
    response: Response,
    tenant: Tenant,
    trace: Trace,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    """One job from the workflow with these parameter values: the same job as ``POST /v1/jobs``."""
    try:
        job, created = await _service(request).run(tenant, name, body, idempotency_key=idempotency_key, trace=trace)
    except WorkflowInvalid as exc:
        return _invalid(exc)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return job
