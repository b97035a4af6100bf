"""ComfyUI's UI-format workflows (what its editor saves and embeds in PNGs: "nodes", "links",
"definitions.subgraphs") converted to the API format the executor runs, as ComfyUI's frontend
does it when it queues a graph (its graphToPrompt):

- widget values (`widgets_values`) go to the node's widget inputs in the order /object_info
  lists them, skipping the extra value the editor keeps after a seed (control_after_generate)
  and after LoadImage's image (its upload button);
- links become [node id, output slot]; Reroute nodes are followed to their source, a
  PrimitiveNode gives its value, a muted node (mode 2) is left out with its links, a bypassed
  node (mode 4) passes its input of the same type through;
- subgraphs are flattened, their nodes numbered "outer:inner" as ComfyUI numbers them; an
  input of the subgraph that is not connected outside keeps the inner widget's own value;
- notes are ignored. Every unknown node type is reported at once.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from ryla.graph.registry import NodeRegistry

# The editor's own nodes, never sent to a server (comfy_extras' PrimitiveInt etc. are real nodes).
VIRTUAL = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
MUTED, BYPASSED = 2, 4
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20


class UiFormatError(ValueError):
    """Not a UI-format workflow that can be converted; the message says why. `unknown_types`
    lists node types this server does not have."""

    def __init__(self, message: str, unknown_types: list[str] | None = None, node_ids: list[str] | None = None):
        super().__init__(message)
        self.unknown_types = unknown_types or []
        self.node_ids = node_ids or []


@dataclass
class _Scope:
    """One graph level: the top-level workflow, or one instance of a subgraph."""

    prefix: str  # "" at the top, "12:" inside instance 12, "12:5:" deeper
    nodes: dict[int, dict]
    links: dict[int, tuple[int, int, int, int, str]]  # id -> (origin, origin slot, target, target slot, type)
    definition: dict | None = None  # the subgraph's definition (its "inputs" and "outputs")
    parent: _Scope | None = None
    instance: dict | None = None  # the node in the parent that this scope expands
    children: dict[int, _Scope] = field(default_factory=dict)


def _links(raw: Any) -> dict[int, tuple[int, int, int, int, str]]:
    """Links as ComfyUI writes them: [id, origin, slot, target, slot, type] lists (format 0.4)
    or {"id", "origin_id", ...} objects (format 1 and subgraphs)."""
    out = {}
    for link in raw or []:
        if isinstance(link, list) and len(link) >= 5:
            out[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]), link[5] if len(link) > 5 else "")
        elif isinstance(link, dict):
            out[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]), int(link["target_id"]),
                                    int(link["target_slot"]), link.get("type", ""))
    return out


def _subgraphs(workflow: dict) -> dict[str, dict]:
    definitions = workflow.get("definitions") or {}
    return {sub["id"]: sub for sub in definitions.get("subgraphs") or [] if isinstance(sub, dict) and "id" in sub}


class _Converter:
    def __init__(self, workflow: dict, registry: NodeRegistry, context=None):
        self.registry, self.context = registry, context
        self.definitions = _subgraphs(workflow)
        self.unknown: dict[str, str] = {}  # api id -> type
        self.api: dict[str, dict] = {}
        self.root = self._scope("", workflow.get("nodes"), workflow.get("links"), None, None, None, depth=0)

    def _scope(self, prefix, nodes, links, definition, parent, instance, depth) -> _Scope:
        if depth > 32:
            raise UiFormatError("subgraphs nested more than 32 deep (or a subgraph that contains itself)")
        if not isinstance(nodes, list):
            raise UiFormatError("'nodes' must be a list of nodes")
        scope = _Scope(prefix, {int(node["id"]): node for node in nodes if isinstance(node, dict) and "id" in node},
                       _links(links), definition, parent, instance)
        for node_id, node in scope.nodes.items():
            sub = self.definitions.get(node.get("type"))
            if sub is not None and node.get("mode", 0) not in (MUTED,):
                scope.children[node_id] = self._scope(f"{prefix}{node_id}:", sub.get("nodes"), sub.get("links"), sub,
                                                      scope, node, depth + 1)
        return scope

    # ------------------------------------------------------------------ links

    def source(self, scope: _Scope, link_id: int | None, seen: frozenset = frozenset()):
        """Where a link's value comes from: ("node", api id, slot), ("value", literal),
        ("keep",) for an unconnected subgraph input (the inner widget keeps its value), or None
        (a muted or missing source: the input is left out)."""
        if link_id is None or link_id not in scope.links or (scope.prefix, link_id) in seen:
            return None
        seen = seen | {(scope.prefix, link_id)}
        origin, slot, *_ = scope.links[link_id]
        if origin == SUBGRAPH_INPUT and scope.instance is not None:
            name = (scope.definition.get("inputs") or [{}] * (slot + 1))[slot].get("name")
            outer = next((i for i in scope.instance.get("inputs") or [] if i.get("name") == name), None)
            if outer is None or outer.get("link") is None:
                return ("keep",)
            return self.source(scope.parent, outer["link"], seen)
        node = scope.nodes.get(origin)
        if node is None:
            return None
        kind, mode = node.get("type"), node.get("mode", 0)
        if mode == MUTED:
            return None
        if kind == "Reroute":
            inputs = node.get("inputs") or []
            return self.source(scope, inputs[0].get("link"), seen) if inputs else None
        if kind == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if mode == BYPASSED:
            return self.source(scope, self._bypass_input(node, slot), seen)
        if origin in scope.children:  # a subgraph instance: the inner link into its output slot
            child = scope.children[origin]
            inner = next((lid for lid, (_, _, target, target_slot, _) in child.links.items()
                          if target == SUBGRAPH_OUTPUT and target_slot == slot), None)
            return self.source(child, inner, seen)
        return ("node", f"{scope.prefix}{origin}", slot)

    @staticmethod
    def _bypass_input(node: dict, slot: int) -> int | None:
        """A bypassed node's output passes through its input of the same type: the one at the
        same index if it matches, else the first that does (ComfyUI's frontend rule)."""
        outputs, inputs = node.get("outputs") or [], node.get("inputs") or []
        kind = outputs[slot].get("type") if slot < len(outputs) else None
        if slot < len(inputs) and inputs[slot].get("type") == kind and inputs[slot].get("link") is not None:
            return inputs[slot]["link"]
        match = next((i for i in inputs if i.get("type") == kind and i.get("link") is not None), None)
        return match["link"] if match else None

    # ------------------------------------------------------------------ nodes

    def convert(self) -> dict[str, dict]:
        self._emit(self.root)
        if self.unknown:
            types = sorted(set(self.unknown.values()))
            raise UiFormatError(f"Cannot execute because node {', '.join(types)} does not exist.", types,
                                sorted(self.unknown))
        return self.api

    def _emit(self, scope: _Scope) -> None:
        for node_id, node in scope.nodes.items():
            kind, mode = node.get("type"), node.get("mode", 0)
            if mode in (MUTED, BYPASSED) or kind in VIRTUAL:
                continue
            if node_id in scope.children:
                self._emit(scope.children[node_id])
                continue
            api_id = f"{scope.prefix}{node_id}"
            cls = self.registry.get(kind) if isinstance(kind, str) else None
            if cls is None:
                self.unknown[api_id] = str(kind)
                continue
            inputs = self._widget_values(cls, node)
            for entry in node.get("inputs") or []:
                name = entry.get("name")
                if entry.get("link") is None or not name:
                    continue
                found = self.source(scope, entry["link"])
                if found is None:
                    inputs.pop(name, None)  # from a muted node: missing, as in ComfyUI
                elif found[0] == "node":
                    inputs[name] = [found[1], found[2]]
                elif found[0] == "value":
                    inputs[name] = found[1]
            title = node.get("title")
            self.api[api_id] = {"inputs": inputs, "class_type": kind,
                                "_meta": {"title": title or _display_name(cls)}}

    def _widget_values(self, cls, node: dict) -> dict[str, Any]:
        values = node.get("widgets_values")
        widgets = [spec for spec in cls.inputs if spec.is_widget]
        if isinstance(values, dict):
            return {spec.name: values[spec.name] for spec in widgets if spec.name in values}
        values = list(values or [])
        # The editor keeps one extra value after a seed (control_after_generate) and after an
        # image upload widget; files saved before those widgets existed do not have them.
        with_extras: list[str | None] = []
        for spec in widgets:
            with_extras.append(spec.name)
            if spec.control_after_generate or spec.upload:
                with_extras.append(None)
        names = [spec.name for spec in widgets] if len(values) == len(widgets) < len(with_extras) else with_extras
        return {name: value for name, value in zip(names, values) if name is not None}


def _display_name(cls) -> str:
    from ryla.graph.registry import DISPLAY_NAMES

    return DISPLAY_NAMES.get(cls.class_type, cls.class_type)


def to_api_format(workflow: dict, registry: NodeRegistry, context=None) -> dict[str, dict]:
    """The API-format graph of a UI-format workflow (see the module docstring)."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise UiFormatError("a UI-format workflow is an object with a 'nodes' list")
    try:
        return _Converter(workflow, registry, context).convert()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        if isinstance(exc, UiFormatError):
            raise
        raise UiFormatError(f"the UI-format workflow could not be read: {exc!r}") from exc


def workflow_from_png(data: bytes) -> dict:
    """The workflow ComfyUI embeds in its PNGs: the API-format "prompt" text chunk when there is
    one, else the UI-format "workflow" chunk (converted by the caller)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        chunks = dict(getattr(image, "text", {}) or image.info)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same answer
        raise UiFormatError(f"not a PNG with a workflow: {exc}") from exc
    for key in ("prompt", "workflow"):
        text = chunks.get(key)
        if isinstance(text, str) and text.strip():
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise UiFormatError(f"the PNG's {key!r} chunk is not JSON: {exc}") from exc
    raise UiFormatError("the PNG has no 'prompt' or 'workflow' text chunk (ComfyUI writes them in SaveImage's PNGs)")


def is_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n"
