"""ComfyUI's UI-format workflows ("Save", templates, the ``workflow`` PNG chunk) → API format.

The UI format is the editor's graph: nodes with positional ``widgets_values``, numbered links,
subgraphs (``definitions.subgraphs``), bypassed and muted nodes, reroutes, primitive nodes and
notes. ComfyUI's frontend turns it into the API format a server runs (``graphToPrompt``); this
module does the same conversion in Python, with the same rules:

- widget values are matched to input names in the order the node's inputs define widgets
  (``/object_info``: required, then optional); a ``control_after_generate`` input is followed by
  its UI-only control value, an ``image_upload`` combo by its upload button — both skipped;
  values missing at the end take the input's default;
- links are resolved to ``[source node id, output slot]``; a subgraph is expanded, its nodes
  getting ids ``"<instance id>:<inner id>"`` (nested: ``"a:b:c"``), its inputs followed out to
  the instance's links, or left to the inner widget's own value when the instance input is
  not linked;
- a bypassed node (mode 4) passes each consumer the input of the same type (the same slot
  first); a muted node (mode 2) is left out, and so are the inputs linking to it; a subgraph
  instance's mode applies to the nodes inside it;
- reroutes pass their input through; a primitive node's value is written into the widgets it
  feeds; notes are dropped;
- nodes are listed in the frontend's order (its topological order of the top-level graph,
  each subgraph's nodes in definition order), so a prompt with several unknown nodes names
  the same first one in ComfyUI's "node X does not exist".

Node classes the server does not describe are kept (``class_type`` = the node's type) with
their links, so the server answers them with ComfyUI's own error. The frontend's dynamic
prompts (``{a|b}`` picked at random per queueing) are not expanded: text is sent as written.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zimage_platform.errors import InvalidRequest

BYPASS, NEVER = 4, 2
#: Frontend-only nodes: never sent to the server.
VIRTUAL_NODES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
_WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
#: Combo options that add an upload button after the combo (its value is UI-only).
_UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
_SUBGRAPH_INPUT, _SUBGRAPH_OUTPUT = -10, -20


class WorkflowFormatError(InvalidRequest):
    """A UI-format workflow that cannot be converted (a dangling link, a missing subgraph ...)."""

    code = "invalid_workflow"


def is_ui_workflow(value: Any) -> bool:
    """The editor's format (``nodes`` is a list) rather than the API format (``{id: node}``)."""
    return isinstance(value, Mapping) and isinstance(value.get("nodes"), list) and "links" in value


@dataclass(frozen=True)
class _Link:
    id: int
    origin_id: int
    origin_slot: int
    target_id: int
    target_slot: int
    type: Any


def _links(raw: Any) -> dict[int, _Link]:
    links: dict[int, _Link] = {}
    for item in raw or []:
        if isinstance(item, Mapping):
            keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
            values = [item.get(k) for k in keys]
        elif isinstance(item, list | tuple) and len(item) >= 6:
            values = list(item[:6])
        else:
            raise WorkflowFormatError(f"a link is neither [id, from, slot, to, slot, type] nor an object: {item!r}")
        link = _Link(int(values[0]), int(values[1]), int(values[2]), int(values[3]), int(values[4]), values[5])
        links[link.id] = link
    return links


@dataclass
class _Graph:
    """The top-level graph or a subgraph definition."""

    nodes: list[dict[str, Any]]
    links: dict[int, _Link]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.nodes:
            if not isinstance(node, dict) or "id" not in node:
                raise WorkflowFormatError(f"a node is not an object with an id: {str(node)[:80]}")
            self.by_id.setdefault(str(node["id"]), node)

    def node(self, node_id: Any) -> dict[str, Any] | None:
        return self.by_id.get(str(node_id))


@dataclass
class _Scope:
    """One instance of a graph: the top level, or a subgraph inside ``instance`` of ``parent``."""

    graph: _Graph
    path: tuple[str, ...] = ()
    parent: _Scope | None = None
    instance: dict[str, Any] | None = None
    #: The enclosing instances' mode (muted or bypassed), inherited by the nodes inside.
    mode: int = 0

    def exec_id(self, node: Mapping[str, Any]) -> str:
        return ":".join((*self.path, str(node["id"])))


def _widgets(spec: Mapping[str, Any] | None) -> list[tuple[str | None, Any]]:
    """``(name, default)`` per widget slot of a node class, UI-only slots named ``None``."""
    if not spec:
        return []
    slots: list[tuple[str | None, Any]] = []
    sections = spec.get("input") or {}
    order = spec.get("input_order") or {s: list(v) for s, v in sections.items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            config = sections.get(section, {}).get(name)
            if not isinstance(config, list | tuple) or not config:
                continue
            kind = config[0]
            options = config[1] if len(config) > 1 and isinstance(config[1], Mapping) else {}
            choices = kind if isinstance(kind, list) else options.get("options")
            if not isinstance(kind, list) and (kind not in _WIDGET_TYPES or options.get("forceInput")):
                continue
            if "default" in options:
                default = options["default"]
            elif isinstance(kind, list) or kind == "COMBO":
                default = choices[0] if choices else None
            else:
                default = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)
            slots.append((name, default))
            if options.get("control_after_generate"):
                slots.append((None, None))
            if any(options.get(o) for o in _UPLOAD_OPTIONS):
                slots.append((None, None))
    return slots


class _Converter:
    def __init__(self, workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> None:
        self.info = object_info
        self.definitions: dict[str, _Graph] = {}
        self._collect_definitions(workflow)
        self.root = _Graph(list(workflow.get("nodes") or []), _links(workflow.get("links")))
        #: (exec id of a node, widget name) → a value a primitive node writes into it.
        self.primitive_values: dict[tuple[str, str], Any] = {}

    def _collect_definitions(self, container: Mapping[str, Any]) -> None:
        for sub in (container.get("definitions") or {}).get("subgraphs") or []:
            self.definitions[str(sub["id"])] = _Graph(
                list(sub.get("nodes") or []),
                _links(sub.get("links")),
                list(sub.get("inputs") or []),
                list(sub.get("outputs") or []),
            )
            self._collect_definitions(sub)

    # -- what a node is ----------------------------------------------------------------------

    def is_subgraph(self, node: Mapping[str, Any]) -> bool:
        return str(node.get("type")) in self.definitions

    def mode(self, scope: _Scope, node: Mapping[str, Any]) -> int:
        own = int(node.get("mode") or 0)
        return own if own in (BYPASS, NEVER) else scope.mode

    def inner_scope(self, scope: _Scope, instance: dict[str, Any]) -> _Scope:
        return _Scope(
            self.definitions[str(instance["type"])],
            (*scope.path, str(instance["id"])),
            scope,
            instance,
            self.mode(scope, instance),
        )

    # -- order ---------------------------------------------------------------------------

    def execution_order(self, graph: _Graph) -> list[dict[str, Any]]:
        """LiteGraph's ``computeExecutionOrder``: nodes without linked inputs first (graph order),
        then each node once all its input links are visited (Kahn); cycles at the end."""
        remaining: dict[str, int] = {}
        ready: list[dict[str, Any]] = []
        for node in graph.nodes:
            linked = sum(1 for i in node.get("inputs") or [] if i.get("link") is not None)
            if linked:
                remaining[str(node["id"])] = linked
            else:
                ready.append(node)
        order: list[dict[str, Any]] = []
        seen_links: set[int] = set()
        queue = deque(ready)
        while queue:
            node = queue.popleft()
            order.append(node)
            for output in node.get("outputs") or []:
                for link_id in output.get("links") or []:
                    link = graph.links.get(int(link_id))
                    if link is None or link.id in seen_links:
                        continue
                    seen_links.add(link.id)
                    target = graph.node(link.target_id)
                    key = str(link.target_id)
                    if target is None or key not in remaining:
                        continue
                    remaining[key] -= 1
                    if remaining[key] == 0:
                        queue.append(target)
        placed = {str(n["id"]) for n in order}
        return order + [n for n in graph.nodes if str(n["id"]) not in placed]

    def flatten(self) -> list[tuple[_Scope, dict[str, Any]]]:
        """Every executable node with its scope, in the order the frontend lists them."""
        out: list[tuple[_Scope, dict[str, Any]]] = []

        def inner(scope: _Scope, instance: dict[str, Any], depth: int) -> None:
            if depth > 32:
                raise WorkflowFormatError("subgraphs nest deeper than 32 levels (a subgraph inside itself?)")
            sub = self.inner_scope(scope, instance)
            for node in sub.graph.nodes:
                if self.is_subgraph(node):
                    inner(sub, node, depth + 1)
                else:
                    out.append((sub, node))

        top = _Scope(self.root)
        for node in self.execution_order(self.root):
            if self.is_subgraph(node):
                inner(top, node, 1)
            else:
                out.append((top, node))
        return out

    # -- links -------------------------------------------------------------------------------

    def resolve_input(self, scope: _Scope, node: dict[str, Any], index: int, depth: int = 0):
        """``("link", exec id, slot)``, ``("value", v)`` or ``None`` (nothing connected)."""
        if depth > 256:
            raise WorkflowFormatError(f"links around node {scope.exec_id(node)} form a loop")
        inputs = node.get("inputs") or []
        if not 0 <= index < len(inputs) or inputs[index].get("link") is None:
            return None
        link = scope.graph.links.get(int(inputs[index]["link"]))
        if link is None:
            raise WorkflowFormatError(
                f"node {scope.exec_id(node)} input {inputs[index].get('name')!r} names link "
                f"{inputs[index]['link']}, which does not exist"
            )
        if link.origin_id == _SUBGRAPH_INPUT and scope.parent is not None and scope.instance is not None:
            return self._from_instance_input(scope, link.origin_slot, depth)
        origin = scope.graph.node(link.origin_id)
        if origin is None:
            raise WorkflowFormatError(f"link {link.id} comes from node {link.origin_id}, which does not exist")
        return self.resolve_output(scope, origin, link.origin_slot, inputs[index].get("type"), depth + 1)

    def _from_instance_input(self, scope: _Scope, slot: int, depth: int):
        """A subgraph input: the instance's link, or (unlinked) the inner widget's own value."""
        assert scope.parent is not None and scope.instance is not None
        instance, parent = scope.instance, scope.parent
        definition = scope.graph.inputs
        if not 0 <= slot < len(definition):
            raise WorkflowFormatError(f"subgraph {instance.get('type')} has no input {slot}")
        name = definition[slot].get("name")
        outer = instance.get("inputs") or []
        index = next((i for i, item in enumerate(outer) if item.get("name") == name), None)
        if index is None or outer[index].get("link") is None:
            host = instance.get("widgets_values")
            promoted = [item.get("name") for item in outer if item.get("widget") is not None]
            if index is not None and isinstance(host, list) and name in promoted:
                position = promoted.index(name)
                if position < len(host) and host[position] is not None:
                    return ("value", host[position])
            return None
        return self.resolve_input(parent, instance, index, depth + 1)

    def resolve_output(self, scope: _Scope, node: dict[str, Any], slot: int, type_: Any, depth: int):
        if depth > 256:
            raise WorkflowFormatError(f"links around node {scope.exec_id(node)} form a loop")
        if self.mode(scope, node) == BYPASS:
            index = self._bypass_slot(node, slot, type_)
            return None if index is None else self.resolve_input(scope, node, index, depth + 1)
        if self.is_subgraph(node):
            sub = self.inner_scope(scope, node)
            outputs = sub.graph.outputs
            if not 0 <= slot < len(outputs) or not outputs[slot].get("linkIds"):
                return None
            inner_link = sub.graph.links.get(int(outputs[slot]["linkIds"][0]))
            if inner_link is None:
                return None
            if inner_link.origin_id == _SUBGRAPH_INPUT:
                return self._from_instance_input(sub, inner_link.origin_slot, depth + 1)
            origin = sub.graph.node(inner_link.origin_id)
            if origin is None:
                raise WorkflowFormatError(f"subgraph {node.get('type')} output {slot} comes from a missing node")
            return self.resolve_output(sub, origin, inner_link.origin_slot, type_, depth + 1)
        if node.get("type") in VIRTUAL_NODES:
            inputs = node.get("inputs") or []
            return self.resolve_input(scope, node, slot, depth + 1) if slot < len(inputs) else None
        return ("link", scope.exec_id(node), slot)

    @staticmethod
    def _bypass_slot(node: Mapping[str, Any], slot: int, type_: Any) -> int | None:
        """The frontend's choice of input a bypassed node passes on for output ``slot``."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else type_

        def fits(a: Any, b: Any) -> bool:
            return a == b or "*" in (a, b) or not a or not b

        if type_ in ("*", "", None):
            return slot if slot < len(inputs) else (0 if inputs else None)
        if slot < len(inputs) and fits(inputs[slot].get("type"), out_type) and fits(inputs[slot].get("type"), type_):
            return slot
        exact = next((i for i, item in enumerate(inputs) if item.get("type") == type_), None)
        if exact is not None:
            return exact
        return next(
            (i for i, item in enumerate(inputs) if fits(item.get("type"), out_type) and fits(item.get("type"), type_)),
            None,
        )

    # -- primitives ------------------------------------------------------------------------------

    def apply_primitives(self, scope: _Scope) -> None:
        """A primitive node's value goes into every widget its output feeds (``applyToGraph``)."""
        for node in scope.graph.nodes:
            if self.is_subgraph(node):
                self.apply_primitives(self.inner_scope(scope, node))
                continue
            if node.get("type") != "PrimitiveNode" or not node.get("widgets_values"):
                continue
            value = node["widgets_values"][0]
            for output in node.get("outputs") or []:
                for link_id in output.get("links") or []:
                    link = scope.graph.links.get(int(link_id))
                    target = scope.graph.node(link.target_id) if link else None
                    if link is None or target is None:
                        continue
                    inputs = target.get("inputs") or []
                    if link.target_slot < len(inputs):
                        item = inputs[link.target_slot]
                        widget = (item.get("widget") or {}).get("name") or item.get("name")
                        self.primitive_values[(scope.exec_id(target), widget)] = value

    # -- nodes -----------------------------------------------------------------------------------

    def widget_values(self, scope: _Scope, node: Mapping[str, Any]) -> dict[str, Any]:
        slots = _widgets(self.info.get(str(node.get("type"))))
        raw = node.get("widgets_values")
        values: dict[str, Any] = {}
        for position, (name, default) in enumerate(slots):
            if name is None:
                continue
            if isinstance(raw, Mapping):
                value = raw.get(name, default)
            elif isinstance(raw, list) and position < len(raw):
                value = raw[position]
            else:
                value = default
            value = self.primitive_values.get((scope.exec_id(node), name), value)
            values[name] = {"__value__": value} if isinstance(value, list) else value
        return values

    def convert(self) -> dict[str, dict[str, Any]]:
        self.apply_primitives(_Scope(self.root))
        prompt: dict[str, dict[str, Any]] = {}
        for scope, node in self.flatten():
            node_type = node.get("type")
            if node_type in VIRTUAL_NODES or self.mode(scope, node) in (BYPASS, NEVER):
                continue
            inputs = self.widget_values(scope, node)
            for index, item in enumerate(node.get("inputs") or []):
                resolved = self.resolve_input(scope, node, index)
                if resolved is None:
                    continue
                name = item.get("name")
                if resolved[0] == "value":
                    inputs[name] = {"__value__": resolved[1]} if isinstance(resolved[1], list) else resolved[1]
                else:
                    inputs[name] = [resolved[1], resolved[2]]
            info = self.info.get(str(node_type)) or {}
            prompt[scope.exec_id(node)] = {
                "inputs": inputs,
                "class_type": node_type,
                "_meta": {"title": node.get("title") or info.get("display_name") or node_type},
            }
        for entry in prompt.values():  # inputs linked to nodes that were left out (muted)
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                    del entry["inputs"][name]
        return prompt


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The API-format prompt ComfyUI's frontend sends for ``workflow`` (a UI-format graph), given
    the server's ``/object_info`` (what widgets each node class has). Raises
    :class:`WorkflowFormatError` for a graph that does not hold together."""
    if not is_ui_workflow(workflow):
        raise WorkflowFormatError("not a UI-format workflow (an object with 'nodes' and 'links')", param="workflow")
    try:
        return _Converter(workflow, object_info).convert()
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, InvalidRequest):
            raise
        raise WorkflowFormatError(f"the workflow is malformed: {exc!r}", param="workflow") from None
