"""Wire schemas of saved workflows (``/v1/workflows``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: ``[node_id, "inputs", input_name]``: where a parameter's value goes in the graph.
Path = list[str]


class ParameterSpec(BaseModel):
    """A named parameter of a workflow. Shorthand: a bare path, e.g. ``["6", "inputs", "text"]``."""

    model_config = ConfigDict(extra="forbid")
    path: Path | None = Field(None, description="One target input.")
    paths: list[Path] | None = Field(None, description="Several inputs that get the same value (e.g. two seeds).")
    type: Literal["string", "int", "float", "bool", "size"] | None = Field(
        None, description="Inferred from the target input; `size` takes WIDTHxHEIGHT into `width` and `height`."
    )
    width: Path | None = None
    height: Path | None = None
    default: Any = Field(None, description="Used when a run does not give the parameter (else the graph's value).")
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, list) else value

    def targets(self) -> list[Path]:
        if self.type == "size":
            return [p for p in (self.width, self.height) if p is not None]
        return ([self.path] if self.path else []) + list(self.paths or [])


class WorkflowPut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    graph: dict[str, Any] = Field(
        description="An API-format ComfyUI graph (node id → {class_type, inputs}), or a UI-format workflow "
        "(as ComfyUI saves it: nodes, links, subgraphs), converted to API format as ComfyUI's frontend does."
    )
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)
    description: str | None = Field(None, max_length=2000)


class Workflow(BaseModel):
    object: Literal["workflow"] = "workflow"
    name: str
    version: int
    versions: list[int]
    description: str | None
    graph: dict[str, Any]
    parameters: dict[str, Any]
    created_at: datetime


class WorkflowSummary(BaseModel):
    object: Literal["workflow"] = "workflow"
    name: str
    version: int
    description: str | None
    parameters: list[str]
    created_at: datetime


class WorkflowList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkflowSummary]


class WorkflowRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Values by parameter name.")
    version: int | None = Field(None, ge=1, description="Run this version (default: the latest).")
    webhook_url: str | None = Field(None, description="Receives job.* events, as for POST /v1/jobs.")
