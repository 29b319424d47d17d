"""Validating an API-format graph the way ComfyUI does, with ComfyUI's error shapes.

A rejected prompt answers ``{"error": {type, message, details, extra_info}, "node_errors":
{node_id: {"errors": [...], "dependent_outputs": [...], "class_type"}}}``. Only nodes an output
needs are validated; an output whose nodes fail is dropped, and the prompt is refused only when
no output survives (then ``prompt_outputs_failed_validation``), as in ComfyUI 0.3.64.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zimage_platform.errors import PlatformError
from zimage_platform.workflows.nodes import NODES, SCALAR_TYPES, Catalog, InputSpec, input_config


def comfy_error(type_: str, message: str, details: str = "", **extra_info: Any) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info}


def custom_error(input_name: str, reason: str, **extra: Any) -> dict[str, Any]:
    """A platform constraint (bucket sizes, step limits ...) in ComfyUI's VALIDATE_INPUTS shape,
    with the machine-readable ``code`` and valid ``choices`` in ``extra_info`` when there are some."""
    extra = {k: v for k, v in extra.items() if v is not None}
    return comfy_error(
        "custom_validation_failed",
        "Custom validation failed for node",
        f"{input_name} - {reason}",
        input_name=input_name,
        **extra,
    )


class PromptRejected(Exception):
    """The whole prompt is refused (HTTP 400 with ComfyUI's body)."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any] | None = None) -> None:
        super().__init__(error["message"])
        self.error = error
        self.node_errors = node_errors or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "node_errors": self.node_errors}


class StoredTooLarge(PlatformError):
    """A graph (or a prompt's ``extra_data``) over what the platform stores per prompt or workflow:
    it is kept, returned by ``/queue`` and ``/history`` and written into every PNG, so it is capped."""

    code = "graph_too_large"
    status = 413


def json_bytes(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (how it is stored and sent back)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode())


def check_stored_size(
    value: Any, *, param: str, max_bytes: int, max_nodes: int | None = None, code: str = "graph_too_large"
) -> None:
    """Refuse a graph with more than ``max_nodes`` nodes or a value over ``max_bytes`` of JSON."""
    if max_nodes is not None and isinstance(value, Mapping | list) and len(value) > max_nodes:
        raise StoredTooLarge(
            f"{param} has {len(value)} nodes; the limit is {max_nodes}", code="too_many_nodes", param=param
        )
    size = json_bytes(value)
    if size > max_bytes:
        raise StoredTooLarge(f"{param} is {size} bytes of JSON; the limit is {max_bytes}", code=code, param=param)


class _LinkError(Exception):
    """A link to a node that does not exist (or an output slot it does not have)."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


@dataclass
class ValidatedGraph:
    prompt: dict[str, dict[str, Any]]
    #: Coerced widget values per node (primitive links already resolved to their values).
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Link inputs per node: input name → (source node id, output slot).
    links: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    good_outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def class_of(self, node: str) -> str:
        return self.prompt[node]["class_type"]

    def source(self, node: str, name: str) -> tuple[str, int] | None:
        return self.links.get(node, {}).get(name)

    def add_node_error(self, node: str, error: dict[str, Any], output: str) -> None:
        entry = self.node_errors.setdefault(
            node, {"errors": [], "dependent_outputs": [], "class_type": self.class_of(node)}
        )
        if error not in entry["errors"]:
            entry["errors"].append(error)
        if output not in entry["dependent_outputs"]:
            entry["dependent_outputs"].append(output)


def _check_nodes(prompt: Any) -> list[str]:
    if not isinstance(prompt, Mapping):
        raise PromptRejected(
            comfy_error("invalid_prompt", "Cannot execute because the prompt is not an object of nodes.", "")
        )
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping) or "class_type" not in node:
            raise PromptRejected(
                comfy_error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            )
        spec = NODES.get(node["class_type"]) if isinstance(node["class_type"], str) else None
        if spec is None:
            raise PromptRejected(
                comfy_error(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                )
            )
        if not isinstance(node.get("inputs", {}), Mapping):
            raise PromptRejected(
                comfy_error("invalid_prompt", "Cannot execute because a node's inputs are not an object.", "")
            )
        if spec.output_node:
            outputs.append(str(node_id))
    if not outputs:
        raise PromptRejected(comfy_error("prompt_no_outputs", "Prompt has no outputs"))
    return outputs


class _Validator:
    def __init__(self, graph: ValidatedGraph, catalog: Catalog) -> None:
        self.graph = graph
        self.catalog = catalog
        self.done: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        self.visiting: list[str] = []

    def node(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in self.done:
            return self.done[node_id]
        prompt = self.graph.prompt
        if node_id in self.visiting:
            cycle = [*self.visiting[self.visiting.index(node_id) :], node_id]
            path = " -> ".join(f"{n} ({prompt[n]['class_type']})" for n in cycle)
            error = comfy_error("dependency_cycle", "Dependency cycle detected", path, node_id=node_id)
            for member in cycle[:-1]:
                self.done[member] = (False, [error])
            return self.done[node_id]
        spec = NODES[prompt[node_id]["class_type"]]
        inputs = dict(prompt[node_id].get("inputs") or {})
        values: dict[str, Any] = {}
        links: dict[str, tuple[str, int]] = {}
        errors: list[dict[str, Any]] = []
        valid = True
        self.visiting.append(node_id)
        try:
            for item in spec.inputs:
                if item.name not in inputs:
                    if item.section == "required":
                        errors.append(
                            comfy_error(
                                "required_input_missing",
                                "Required input is missing",
                                item.name,
                                input_name=item.name,
                            )
                        )
                    continue
                value = inputs[item.name]
                if isinstance(value, list):
                    ok, error, resolved = self._link(node_id, item, value)
                    if error is not None:
                        errors.append(error)
                    if not ok:
                        valid = False
                        continue
                    links[item.name] = (str(value[0]), int(value[1]))
                    if resolved is not _UNSET:
                        values[item.name] = resolved
                    continue
                if not item.is_widget:
                    errors.append(
                        comfy_error(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            item.name,
                            input_name=item.name,
                            input_config=input_config(item, self.catalog),
                            received_value=value,
                        )
                    )
                    continue
                error, coerced = self._widget(spec.name, item, value)
                if error is not None:
                    errors.append(error)
                    continue
                values[item.name] = coerced
        finally:
            self.visiting.pop()
        if node_id in self.done:  # a cycle through this node was found below it
            valid, previous = self.done[node_id]
            errors = previous + [e for e in errors if e not in previous]
            valid = False
        self.graph.values[node_id] = values
        self.graph.links[node_id] = links
        self.done[node_id] = (valid and not errors, errors)
        return self.done[node_id]

    def _link(self, node_id: str, item: InputSpec, value: list) -> tuple[bool, dict | None, Any]:
        prompt = self.graph.prompt
        config = input_config(item, self.catalog)
        if len(value) != 2:
            return (
                False,
                comfy_error(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    item.name,
                    input_name=item.name,
                    input_config=config,
                    received_value=value,
                ),
                _UNSET,
            )
        source, slot = str(value[0]), value[1]
        if source not in prompt:
            raise _LinkError("KeyError", repr(source))
        outputs = NODES[prompt[source]["class_type"]].outputs
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise _LinkError("TypeError", f"tuple indices must be integers or slices, not {type(slot).__name__}")
        if not -len(outputs) <= slot < len(outputs):
            raise _LinkError("IndexError", "tuple index out of range")
        received = outputs[slot]
        expected = config[0]
        if received != expected:
            return (
                False,
                comfy_error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    f"{item.name}, received_type({received}) mismatch input_type({expected})",
                    input_name=item.name,
                    input_config=config,
                    received_type=received,
                    linked_node=value,
                ),
                _UNSET,
            )
        try:
            ok, _ = self.node(source)
        except _LinkError as exc:
            self.done[source] = (
                False,
                [
                    comfy_error(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        str(exc),
                        input_name=item.name,
                        input_config=config,
                        exception_message=str(exc),
                        exception_type=exc.exception_type,
                        traceback=[],
                        linked_node=value,
                    )
                ],
            )
            return False, None, _UNSET
        if not ok:
            return False, None, _UNSET
        source_spec = NODES[prompt[source]["class_type"]]
        if source_spec.evaluate is not None and item.type in SCALAR_TYPES:
            # A widget fed by a node the platform computes (a primitive, ResolutionSelector): the
            # value must pass the widget's own checks too.
            computed = source_spec.evaluate(self.graph.values[source])[slot]
            error, coerced = self._widget(prompt[node_id]["class_type"], item, computed)
            if error is not None:
                return False, error, _UNSET
            return True, None, coerced
        return True, None, _UNSET

    def _widget(self, class_type: str, item: InputSpec, value: Any) -> tuple[dict | None, Any]:
        config = input_config(item, self.catalog)
        if isinstance(value, Mapping) and "__value__" in value:
            value = value["__value__"]
        raw = value
        try:
            if item.type == "INT":
                value = int(value)
            elif item.type == "FLOAT":
                value = float(value)
            elif item.type == "STRING":
                value = str(value)
            elif item.type == "BOOLEAN":
                value = bool(value)
        except (TypeError, ValueError, OverflowError) as exc:
            return self._not_converted(item, config, raw, str(exc)), None
        if isinstance(value, float) and not math.isfinite(value):
            # ComfyUI would take it, and the job, /queue and /history could not be written as JSON.
            return self._not_converted(item, config, raw, "not a finite number", code="non_finite_number"), None
        spec = NODES[class_type]
        if item.name in spec.self_validated:
            return self._self_validated(item, value), value
        options = item.options
        if "min" in options and value < options["min"]:
            return (
                comfy_error(
                    "value_smaller_than_min",
                    f"Value {value} smaller than min of {options['min']}",
                    item.name,
                    input_name=item.name,
                    input_config=config,
                    received_value=value,
                ),
                None,
            )
        if "max" in options and value > options["max"]:
            return (
                comfy_error(
                    "value_bigger_than_max",
                    f"Value {value} bigger than max of {options['max']}",
                    item.name,
                    input_name=item.name,
                    input_config=config,
                    received_value=value,
                ),
                None,
            )
        if item.is_combo:
            choices = self.catalog.choices(item)
            if not isinstance(value, str | int | float) or value not in choices:
                listed = f"(list of length {len(choices)})" if len(choices) > 20 else str(choices)
                return (
                    comfy_error(
                        "value_not_in_list",
                        "Value not in list",
                        f"{item.name}: {value!r} not in {listed}",
                        input_name=item.name,
                        input_config=None if len(choices) > 20 else config,
                        received_value=value,
                    ),
                    None,
                )
        return None, value

    @staticmethod
    def _not_converted(item: InputSpec, config: Any, raw: Any, reason: str, **extra: Any) -> dict[str, Any]:
        shown = repr(raw) if isinstance(raw, float) and not math.isfinite(raw) else raw  # JSON has no NaN
        return comfy_error(
            "invalid_input_type",
            f"Failed to convert an input value to a {item.type} value",
            f"{item.name}, {shown}, {reason}",
            input_name=item.name,
            input_config=config,
            received_value=shown,
            exception_message=reason,
            **extra,
        )

    def _self_validated(self, item: InputSpec, value: Any) -> dict | None:
        if item.source == "input_images" and value not in self.catalog.images:
            return custom_error(item.name, f"Invalid image file: {value}", code="image_not_found")
        return None


_UNSET = object()


def validate_prompt(prompt: Any, catalog: Catalog) -> ValidatedGraph:
    """Check every node an output needs; raise :class:`PromptRejected` when no output survives."""
    outputs = _check_nodes(prompt)
    graph = ValidatedGraph(prompt={str(k): v for k, v in prompt.items()}, outputs=outputs)
    validator = _Validator(graph, catalog)
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    for output in outputs:
        try:
            ok, reasons = validator.node(output)
        except _LinkError as exc:
            ok = False
            reasons = [
                comfy_error(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(exc),
                    exception_type=exc.exception_type,
                    traceback=[],
                )
            ]
            validator.done[output] = (False, reasons)
        if ok:
            graph.good_outputs.append(output)
            continue
        failed.append((output, reasons))
        for node in _upstream(graph, output):
            node_ok, node_reasons = validator.done.get(node, (True, []))
            for reason in node_reasons if not node_ok else ():
                graph.add_node_error(node, reason, output)
    if not graph.good_outputs:
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        raise PromptRejected(
            comfy_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
            graph.node_errors,
        )
    return graph


def _upstream(graph: ValidatedGraph, output: str) -> list[str]:
    """``output`` and every node it links to (as far as the graph's links are well formed)."""
    seen: list[str] = []
    stack = [output]
    while stack:
        node = stack.pop()
        if node in seen or node not in graph.prompt:
            continue
        seen.append(node)
        for value in (graph.prompt[node].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph.prompt:
                stack.append(str(value[0]))
    return seen
