"""Wire shapes of ComfyUI's HTTP and WebSocket API (as recorded from ComfyUI 0.3.64).

Bodies are built as plain dicts, key for key, because ComfyUI clients index into them; the
recordings in ``tests/fixtures/comfyui-reference`` are the reference for every shape here.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from fastapi.responses import JSONResponse

from zimage_platform.errors import PlatformError

#: The ComfyUI release whose API this reproduces (``/system_stats`` reports it).
COMFYUI_API_VERSION = "0.3.64"


class ComfyJSONResponse(JSONResponse):
    media_type = "application/json; charset=utf-8"


class ComfyError(Exception):
    """A refusal in ComfyUI's ``{"error": {...}, "node_errors": {...}}`` shape."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("error", {}).get("message", ""))
        self.status = status
        self.body = body
        self.headers = headers or {}

    @classmethod
    def of(cls, status: int, type_: str, message: str, details: str = "", **extra: Any) -> ComfyError:
        return cls(status, error_body(type_, message, details, **extra))

    @classmethod
    def from_platform(cls, exc: PlatformError) -> ComfyError:
        """A platform refusal (auth, limits, admission) with its code, status and valid choices."""
        extra = {"choices": exc.choices} if exc.choices is not None else {}
        headers = dict(getattr(exc, "headers", None) or {})
        if getattr(exc, "retry_after_s", None) is not None:
            headers["Retry-After"] = str(exc.retry_after_s)  # type: ignore[attr-defined]
        status = exc.status if exc.status >= 400 else 500
        return cls(status, error_body(exc.code, exc.message, exc.param or "", **extra), headers)


def error_body(type_: str, message: str, details: str = "", **extra_info: Any) -> dict[str, Any]:
    return {
        "error": {"type": type_, "message": message, "details": details, "extra_info": extra_info},
        "node_errors": {},
    }


def now_ms() -> int:
    return int(time.time() * 1000)


def ms(when) -> int:
    return int(when.timestamp() * 1000) if when is not None else now_ms()


def number_of(value: float) -> int | float:
    """Queue numbers we hand out are integers; a client's own ``number`` stays as it was sent."""
    return int(value) if float(value).is_integer() else value


# -- HTTP bodies ----------------------------------------------------------------------------


def queue_info(remaining: int) -> dict[str, Any]:
    return {"exec_info": {"queue_remaining": remaining}}


def queue_item(number: float, prompt_id: str, graph: dict, extra_data: dict, outputs: list[str]) -> list[Any]:
    """ComfyUI's queue tuple: ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
    return [number_of(number), prompt_id, graph, extra_data, outputs]


def image_ref(filename: str, subfolder: str, type_: str) -> dict[str, str]:
    return {"filename": filename, "subfolder": subfolder, "type": type_}


def node_meta(node: str) -> dict[str, Any]:
    return {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}


def history_entry(
    item: list[Any], outputs: dict[str, Any], status_str: str, completed: bool, messages: list[list[Any]]
) -> dict[str, Any]:
    return {
        "prompt": item,
        "outputs": outputs,
        "status": {"status_str": status_str, "completed": completed, "messages": messages},
        "meta": {node: node_meta(node) for node in outputs},
    }


def content_disposition(name: str) -> str:
    """``/view``'s header as ComfyUI writes it (``filename="name"``); a name that is not plain
    ASCII gets an ASCII fallback and RFC 5987's ``filename*=UTF-8''...`` (headers are Latin-1)."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    if fallback == name:
        return f'filename="{name}"'
    return f'filename="{fallback}"; ' + "filename*=UTF-8''" + quote(name, safe="")


def upload_result(name: str, subfolder: str, type_: str) -> dict[str, str]:
    return {"name": name, "subfolder": subfolder, "type": type_}


# -- WebSocket messages ---------------------------------------------------------------------


def message(type_: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "data": data}


def status(remaining: int, sid: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"status": queue_info(remaining)}
    if sid is not None:
        data["sid"] = sid
    return message("status", data)


def execution_start(prompt_id: str, timestamp: int) -> dict[str, Any]:
    return message("execution_start", {"prompt_id": prompt_id, "timestamp": timestamp})


def execution_cached(prompt_id: str, timestamp: int) -> dict[str, Any]:
    # Nothing is served from a node cache here: every prompt's jobs really run.
    return message("execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": timestamp})


def executing(prompt_id: str, node: str | None) -> dict[str, Any]:
    if node is None:
        return message("executing", {"node": None, "prompt_id": prompt_id})
    return message("executing", {"node": node, "display_node": node, "prompt_id": prompt_id})


def progress(prompt_id: str, node: str, value: int, max_: int) -> dict[str, Any]:
    return message("progress", {"value": value, "max": max_, "prompt_id": prompt_id, "node": node})


def progress_state(prompt_id: str, nodes: dict[str, tuple[float, float, str]]) -> dict[str, Any]:
    return message(
        "progress_state",
        {
            "prompt_id": prompt_id,
            "nodes": {
                node: {
                    "value": value,
                    "max": max_,
                    "state": state,
                    "node_id": node,
                    "prompt_id": prompt_id,
                    "display_node_id": node,
                    "parent_node_id": None,
                    "real_node_id": node,
                }
                for node, (value, max_, state) in nodes.items()
            },
        },
    )


def executed(prompt_id: str, node: str, images: list[dict[str, str]]) -> dict[str, Any]:
    return message(
        "executed", {"node": node, "display_node": node, "output": {"images": images}, "prompt_id": prompt_id}
    )


def execution_success(prompt_id: str, timestamp: int) -> dict[str, Any]:
    return message("execution_success", {"prompt_id": prompt_id, "timestamp": timestamp})


def execution_error(
    prompt_id: str, node: str, node_type: str, executed_nodes: list[str], code: str, text: str, timestamp: int
) -> dict[str, Any]:
    """``exception_type`` carries the platform's reason code (there is no Python exception to name)."""
    return message(
        "execution_error",
        {
            "prompt_id": prompt_id,
            "node_id": node,
            "node_type": node_type,
            "executed": executed_nodes,
            "exception_message": text,
            "exception_type": code,
            "traceback": [],
            "current_inputs": {},
            "current_outputs": [],
            "timestamp": timestamp,
        },
    )


def execution_interrupted(
    prompt_id: str, node: str, node_type: str, executed_nodes: list[str], timestamp: int
) -> dict[str, Any]:
    return message(
        "execution_interrupted",
        {
            "prompt_id": prompt_id,
            "node_id": node,
            "node_type": node_type,
            "executed": executed_nodes,
            "timestamp": timestamp,
        },
    )


def history_message(msg: dict[str, Any]) -> list[Any]:
    """History keeps a prompt's lifecycle messages as ``[type, data]`` pairs."""
    return [msg["type"], msg["data"]]


# -- the jobs API (``/api/jobs``, what ComfyUI's frontend lists the queue and history with) ----

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
HISTORY_STATUSES = frozenset({"completed", "failed", "cancelled"})


def _workflow_id(extra_data: dict[str, Any]) -> str | None:
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra_data, dict) else None
    return workflow.get("id") if isinstance(workflow, dict) else None


def _pruned(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if v is not None}


def queued_job(item: list[Any], status: str, create_time: int, *, detail: bool = False) -> dict[str, Any]:
    """A running or pending prompt (a queue item) as a job."""
    number, prompt_id, graph, extra_data, _ = item
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "outputs_count": 0,
            "previewable_outputs_count": 0,
            "workflow_id": _workflow_id(extra_data),
        }
    )
    if detail:
        job["workflow"] = {"prompt": graph, "extra_data": extra_data}
    return job


def finished_job(entry: dict[str, Any], create_time: int, *, detail: bool = False) -> dict[str, Any]:
    """A history entry as a job: its outcome, times, output count and the image to preview."""
    number, prompt_id, graph, extra_data, _ = entry["prompt"]
    status, started, ended, error = "completed", None, None, None
    for name, data in entry["status"]["messages"]:
        if name == "execution_start":
            started = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            ended = data.get("timestamp")
            if name == "execution_error":
                status, error = "failed", data
            elif name == "execution_interrupted":
                status = "cancelled"
    if entry["status"]["status_str"] == "error" and status == "completed":
        status = "failed"
    images = [
        {**image, "nodeId": node, "mediaType": "images"}
        for node, output in entry["outputs"].items()
        for image in output.get("images", [])
    ]
    preview = next((i for i in images if i["type"] == "output"), images[0] if images else None)
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "execution_start_time": started,
            "execution_end_time": ended,
            "execution_error": error,
            "outputs_count": len(images),
            "previewable_outputs_count": len(images),
            "preview_output": preview,
            "workflow_id": _workflow_id(extra_data),
        }
    )
    if detail:
        job["outputs"] = entry["outputs"]
        job["execution_status"] = entry["status"]
        job["workflow"] = {"prompt": graph, "extra_data": extra_data}
    return job
