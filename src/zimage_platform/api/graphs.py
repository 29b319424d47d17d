"""Compiled workflow graphs → durable platform jobs (the ComfyUI API and saved workflows).

The compiler says what to generate; this turns each planned job into a :class:`NewJob` through
the same :func:`~zimage_platform.api.generation.prepare_job` every endpoint uses, so sizes,
limits, content policy and variants are checked once, the same way. A platform refusal is
attributed to the ComfyUI node (and input) the offending value came from.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from zimage_platform.api.generation import image_limits, prepare_job, store_input_image
from zimage_platform.api.services import PlatformServices
from zimage_platform.errors import InvalidRequest, PlatformError
from zimage_platform.pipeline.images import ImageLimits, decode_image, encode_png
from zimage_platform.scheduling.store import NewJob
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.tenancy import TenantSpec
from zimage_platform.workflows import Catalog, CompiledPrompt, PlannedJob, build_catalog
from zimage_platform.workflows.compiler import ImageOp
from zimage_platform.workflows.imageops import apply
from zimage_platform.workflows.store import ComfyStore
from zimage_platform.workflows.validation import custom_error


@dataclass
class NodeRejected(Exception):
    """The platform refused a value; ``node``/``input_name`` say where in the graph it came from."""

    job: PlannedJob
    node: str
    input_name: str
    error: PlatformError

    def comfy_error(self) -> dict:
        return custom_error(self.input_name, self.error.message, code=self.error.code, choices=self.error.choices)


def split_image_name(name: str) -> tuple[str, str, str]:
    """LoadImage's ``sub/name.png [input]`` → (type, subfolder, filename)."""
    type_ = "input"
    for folder in ("input", "output", "temp"):
        if name.endswith(f" [{folder}]"):
            name, type_ = name[: -len(folder) - 3], folder
    subfolder, _, filename = name.rpartition("/")
    return type_, subfolder, filename


async def catalog_for(
    services: PlatformServices, tenant: TenantSpec, store: ComfyStore, graph: object = None
) -> Catalog:
    """Model names and the tenant's uploads; the uploads are only read when ``graph`` (if given)
    has a LoadImage node, to spare the common text-to-image prompt a query."""
    needs_images = graph is None or (
        isinstance(graph, dict)
        and any(isinstance(node, dict) and node.get("class_type") == "LoadImage" for node in graph.values())
    )
    images = await asyncio.to_thread(store.input_images, tenant.id) if needs_images else {}
    return build_catalog(services.config, tenant, images)


async def _input_image(services: PlatformServices, tenant: TenantSpec, store: ComfyStore, job: PlannedJob):
    """The job's init image: the upload's bytes from S3, checked, scaled as the graph says, stored."""
    assert job.image is not None
    type_, subfolder, filename = split_image_name(job.image.name)
    row = await asyncio.to_thread(store.file, tenant.id, type_, subfolder, filename)
    if row is None or row.s3_key is None:
        raise InvalidRequest(f"no uploaded image {job.image.name}", code="image_not_found", param="image")
    data = await asyncio.to_thread(services.results.get_bytes, row.s3_key)
    png = await asyncio.to_thread(_scaled_png, data, image_limits(services), job.image.ops)
    return await asyncio.to_thread(store_input_image, services, tenant, png)


def _scaled_png(data: bytes, limits: ImageLimits, ops: list[ImageOp]) -> bytes:
    """Decode, scale as the graph says, encode (Pillow: run in a worker thread, never on the
    event loop). Every size in ``ops`` was checked against the image limit at validation."""
    image = apply(decode_image(data, limits, param="image"), ops)
    return encode_png(image, 1)


async def prepare_jobs(
    services: PlatformServices,
    tenant: TenantSpec,
    store: ComfyStore,
    compiled: CompiledPrompt,
    *,
    source: str,
    trace: RequestTrace,
    idempotency_key: str | None = None,
    body_hash: str | None = None,
    webhook_url: str | None = None,
) -> list[NewJob | NodeRejected]:
    """One entry per planned job, in order: the job to submit, or why the platform refuses it."""
    prepared: list[NewJob | NodeRejected] = []
    for job in compiled.jobs:
        try:
            input_key = None
            if job.image is not None:
                job.params.image, input_key = await _input_image(services, tenant, store, job)
            prepared.append(
                await asyncio.to_thread(  # the content policy may write an audit row
                    prepare_job,
                    services,
                    tenant,
                    job.variant,
                    job.params,
                    source=source,
                    trace=trace,
                    input_key=input_key,
                    idempotency_key=idempotency_key,
                    body_hash=body_hash,
                    webhook_url=webhook_url,
                )
            )
        except PlatformError as exc:
            if exc.status >= 500:
                raise
            prepared.append(NodeRejected(job, *job.node_of(exc.param), exc))
    return prepared
