"""Validate and run ComfyUI API-format workflows.

A workflow is `{node_id: {"class_type": str, "inputs": {...}}}`; an input that is a
`[node_id, output_index]` pair is a link. The whole graph is validated before anything runs,
and failures are reported in ComfyUI's /prompt error shape (ComfyUI's server.py `post_prompt`
and execution.py `validate_prompt`), so clients written against ComfyUI parse them unchanged:

    {"error": {"type", "message", "details", "extra_info"},
     "node_errors": {node_id: {"errors": [...], "dependent_outputs": [...], "class_type": ...}}}

Only output nodes (SaveImage, PreviewImage) and their ancestors run; each node runs once per
run and its outputs are reused by every consumer.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ryla.flux.engine import Cancelled, IncompatibleInputs
from ryla.graph.registry import InputSpec, Node, NodeRegistry
from ryla.models.tensor_files import ModelFormatError

log = logging.getLogger(__name__)


def error_entry(type_: str, message: str, details: str = "", extra_info: dict | None = None) -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}}


class GraphValidationError(Exception):
    """The workflow is invalid; `body` is ComfyUI's 400 response body."""

    def __init__(self, error: dict, node_errors: dict | None = None):
        self.body = {"error": error, "node_errors": node_errors or {}}
        super().__init__(error["message"] + (f": {error['details']}" if error.get("details") else ""))

    def summary(self) -> str:
        """One line naming every failing node and input, for a terminal."""
        parts = []
        for node_id, entry in self.body["node_errors"].items():
            for err in entry["errors"]:
                parts.append(f"node {node_id} ({entry['class_type']}): {err['message']}"
                             + (f" [{err['details']}]" if err.get("details") else ""))
        return "; ".join(parts) or str(self)


class NodeUserError(Exception):
    """A node refused its input for a reason the client can fix (no face in the photo, an
    unknown LoRA...). Carries an error type and an HTTP status for the API."""

    def __init__(self, type_: str, message: str, status: int = 422, details: dict | None = None):
        self.type, self.message, self.status, self.details = type_, message, status, details or {}
        super().__init__(message)


def is_ui_format(body: Any) -> bool:
    """ComfyUI's UI (editor) format: {"nodes": [...], "links": [...], ...}, not a graph of nodes."""
    return isinstance(body, dict) and isinstance(body.get("nodes"), list) and isinstance(body.get("links"), list)


def unwrap_workflow(body: Any) -> tuple[Any, dict[str, str] | None]:
    """The graph in a request body, and the images that came with it ({name: base64}):
    a bare API-format graph; ComfyUI's /prompt body {"prompt": graph} (with ryla's "images");
    or RunPod's worker-comfyui body {"input": {"workflow": graph, "images": [{"name", "image"}]}}."""
    if not isinstance(body, dict):
        return body, None
    if isinstance(body.get("prompt"), dict):
        return body["prompt"], body.get("images")
    runpod = body.get("input")
    if set(body) == {"input"} and isinstance(runpod, dict) and isinstance(runpod.get("workflow"), dict):
        images = runpod.get("images")
        if isinstance(images, list):
            images = {item.get("name"): item.get("image") for item in images if isinstance(item, dict)}
        return runpod["workflow"], images
    return body, None


class CostLimitError(Exception):
    """The graph asks for more than the server allows (a protection limit, apart from the nodes'
    own bounds): `limit` names the setting."""

    def __init__(self, limit: str, value: float, maximum: float, node_id: str | None = None):
        self.limit, self.value, self.maximum, self.node_id = limit, value, maximum, node_id
        where = f" (node {node_id})" if node_id else ""
        super().__init__(f"the workflow needs {limit.removeprefix('max_')} {value:g}{where}, over this server's "
                         f"{limit} of {maximum:g}")


@dataclass(frozen=True)
class Limits:
    """What one graph may cost, checked from its validated inputs before it queues.

    pixels: the largest latent batch (width x height x batch) any node makes; steps: model
    evaluations summed over samplers; schedule: the longest sigma schedule a sampler builds
    (steps / denoise, as ComfyUI's KSampler does for denoise < 1); nodes: the graph's size."""

    max_nodes: int = 10_000
    max_pixels: int = 4096 * 4096
    max_steps: int = 1_000
    max_schedule: int = 10_000


class ExecutionError(Exception):
    """A node failed while running. `user_error` is set when the client can fix it."""

    def __init__(self, node_id: str, class_type: str, cause: BaseException):
        self.node_id, self.class_type, self.cause = node_id, class_type, cause
        self.user_error = cause if isinstance(cause, NodeUserError) else None
        super().__init__(f"node {node_id} ({class_type}) failed: {cause}")


@dataclass(frozen=True)
class Link:
    node_id: str
    output_index: int


@dataclass
class SavedImages:
    node_id: str
    filename_prefix: str
    images: Any  # IMAGE tensor [B, H, W, 3] in 0..1


@dataclass
class RunContext:
    """What nodes may use during one run: the engine, the request's uploaded images,
    progress and cancellation. Nothing here is shared between runs except the engine."""

    engine: Any
    request_images: dict[str, bytes] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[str, int, int], None] | None = None
    # Called with each node's id as it starts (ComfyUI's "executing" message).
    on_executing: Callable[[str], None] | None = None
    # The server's input folder (uploads LoadImage reads by name); None outside a server.
    input_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    # For the running node: each linked input's source, "node 5 (EmptyLatentImage)".
    input_sources: dict[str, str] = field(default_factory=dict)
    request_id: str = "-"
    outputs: list[SavedImages] = field(default_factory=list)
    # Response annotations a node wants the API to pass on (e.g. faces found).
    annotations: dict[str, Any] = field(default_factory=dict)
    current_node: str = ""
    node_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def store(self):
        return self.engine.store

    def progress(self, value: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(self.current_node, value, total)

    def check_pixels(self, pixels: float) -> None:
        """The size of an image or latent batch a node is about to make, where it is known only
        at run time (scaled from a linked input, say), against the server's max_pixels: a 422
        naming the limit, before the tensor is allocated. Latents count their image's pixels."""
        if pixels > self.limits.max_pixels:
            error = CostLimitError("max_pixels", pixels, self.limits.max_pixels, self.current_node)
            raise NodeUserError("limit_exceeded", str(error), details={
                "limit": error.limit, "value": error.value, "maximum": error.maximum, "node_id": error.node_id})

    def check_cancelled(self) -> None:
        """Stop a long loop inside a node when the request is interrupted or timed out."""
        if self.cancel.is_set():
            raise Cancelled()


@dataclass
class ValidatedGraph:
    nodes: dict[str, tuple[type[Node], dict[str, Any]]]  # id -> (class, inputs: literal | Link)
    outputs: list[str]
    prompt: dict | None = None  # the API-format graph (converted, when a UI-format file came)


class Executor:
    def __init__(self, registry: NodeRegistry):
        self.registry = registry

    # ------------------------------------------------------------------ validation

    def from_ui_format(self, workflow: dict, context: RunContext | None = None) -> dict:
        """A UI-format workflow (what ComfyUI's editor saves) as the API graph it queues."""
        from ryla.graph.ui_format import UiFormatError, to_api_format

        if len(workflow.get("nodes") or []) > (context.limits.max_nodes if context else Limits().max_nodes):
            raise CostLimitError("max_nodes", len(workflow["nodes"]), context.limits.max_nodes if context else
                                 Limits().max_nodes)
        try:
            return to_api_format(workflow, self.registry, context)
        except UiFormatError as exc:
            extra = {"unknown_node_types": exc.unknown_types} if exc.unknown_types else {}
            details = ", ".join(f"Node ID '#{node_id}'" for node_id in exc.node_ids) or (
                "Send ComfyUI's UI-format file as saved, or its API format ('Export (API)')")
            raise GraphValidationError(error_entry("invalid_prompt", str(exc), details, extra)) from exc

    def validate(self, prompt: Any, context: RunContext) -> ValidatedGraph:
        if is_ui_format(prompt):
            prompt = self.from_ui_format(prompt, context)
        if not isinstance(prompt, dict) or not prompt:
            raise GraphValidationError(error_entry(
                "invalid_prompt", "Workflow must be a non-empty object of nodes in ComfyUI API format"))
        prompt = {str(k): v for k, v in prompt.items()}
        if len(prompt) > context.limits.max_nodes:
            raise CostLimitError("max_nodes", len(prompt), context.limits.max_nodes)
        for node_id, entry in prompt.items():
            if not isinstance(entry, dict) or "class_type" not in entry:
                raise GraphValidationError(error_entry(
                    "invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'"))
            if not isinstance(entry["class_type"], str):
                raise GraphValidationError(error_entry(
                    "invalid_prompt", "class_type must be a string naming a node type",
                    f"Node ID '#{node_id}'"))
        unknown = {node_id: entry["class_type"] for node_id, entry in prompt.items()
                   if entry["class_type"] not in self.registry}
        if unknown:  # every unknown type at once, so one round trip shows what is missing
            types = sorted(set(unknown.values()))
            raise GraphValidationError(error_entry(
                "invalid_prompt", f"Cannot execute because node {', '.join(types)} does not exist.",
                ", ".join(f"Node ID '#{node_id}'" for node_id in sorted(unknown, key=_id_order)),
                {"unknown_node_types": types}))
        outputs = sorted((nid for nid, e in prompt.items() if self.registry.get(e["class_type"]).output_node),
                         key=_id_order)
        if not outputs:
            raise GraphValidationError(error_entry("prompt_no_outputs", "Prompt has no outputs"))

        state = _Validation(prompt, self.registry, context)
        for output_id in outputs:
            # Ancestors first, found without recursion (a 5,000-node chain is an ordinary graph),
            # so each node's links point at nodes validated already.
            for node_id in state.ancestors_first(output_id):
                state.visit(node_id, output_id, ())
        if state.node_errors:
            raise GraphValidationError(
                error_entry("prompt_outputs_failed_validation", "Prompt outputs failed validation"),
                state.node_errors)
        check_cost(state.resolved, context.limits)
        return ValidatedGraph(state.resolved, outputs, prompt)

    # ------------------------------------------------------------------ execution

    def run(self, prompt: Any, context: RunContext) -> list[SavedImages]:
        graph = self.validate(prompt, context)
        return self.execute(graph, context)

    def execute(self, graph: ValidatedGraph, context: RunContext) -> list[SavedImages]:
        results: dict[str, tuple] = {}
        for node_id in _execution_order(graph):
            cls, inputs = graph.nodes[node_id]
            values = {name: results[v.node_id][v.output_index] if isinstance(v, Link) else v
                      for name, v in inputs.items()}
            context.current_node = node_id
            if context.cancel.is_set():  # interrupted or timed out between nodes
                raise ExecutionError(node_id, cls.class_type, Cancelled())
            if context.on_executing is not None:
                context.on_executing(node_id)
            context.input_sources = {name: f"node {v.node_id} ({graph.nodes[v.node_id][0].class_type})"
                                     for name, v in inputs.items() if isinstance(v, Link)}
            start = time.perf_counter()
            try:
                out = cls().run(context, **values)
            except ExecutionError:
                raise
            except RuntimeError as exc:
                if _SHAPE_MISMATCH.search(str(exc)):
                    # Two nodes' tensors that do not fit (a latent of another model, say): the
                    # client's graph, not the server, so a 422 naming both ends.
                    sources = ", ".join(f"{name} from {source}" for name, source in context.input_sources.items())
                    raise ExecutionError(node_id, cls.class_type, NodeUserError(
                        "shape_mismatch", f"node {node_id} ({cls.class_type}) cannot use its inputs ({sources}): "
                        f"{str(exc).splitlines()[0]}", details={"node_id": node_id,
                                                                 "inputs": context.input_sources})) from exc
                raise ExecutionError(node_id, cls.class_type, exc) from exc
            except IncompatibleInputs as exc:
                raise ExecutionError(node_id, cls.class_type, NodeUserError(
                    "incompatible_inputs", f"node {node_id} ({cls.class_type}): {exc}",
                    details={"node_id": node_id})) from exc
            except ModelFormatError as exc:
                # A file in the store that is not what the loader loads (another model family,
                # truncated, not safetensors): the client chose it, so a 422 naming it.
                raise ExecutionError(node_id, cls.class_type, NodeUserError(
                    "invalid_model_file", f"node {node_id} ({cls.class_type}): {exc}",
                    details={"node_id": node_id})) from exc
            except Exception as exc:
                raise ExecutionError(node_id, cls.class_type, exc) from exc
            context.node_seconds[node_id] = time.perf_counter() - start
            results[node_id] = tuple(out) if out is not None else ()
        return context.outputs


_SHAPE_MISMATCH = re.compile(r"size of tensor|shapes? cannot be multiplied|must match the size|expected input"
                             r"|to have \d+ channels|mat1 and mat2|shape .* is invalid|Sizes of tensors must match")


def check_cost(nodes: dict, limits: Limits) -> None:
    """Refuse a graph whose nodes (by their literal inputs) ask for more than `limits`."""
    steps = 0
    for node_id, (cls, inputs) in nodes.items():
        literals = {name: value for name, value in inputs.items() if not isinstance(value, Link)}
        cost = cls().cost(**literals)
        if cost.get("pixels", 0) > limits.max_pixels:
            raise CostLimitError("max_pixels", cost["pixels"], limits.max_pixels, node_id)
        if cost.get("schedule", 0) > limits.max_schedule:
            raise CostLimitError("max_schedule", cost["schedule"], limits.max_schedule, node_id)
        steps += cost.get("steps", 0)
        if steps > limits.max_steps:
            raise CostLimitError("max_steps", steps, limits.max_steps, node_id)


def _id_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _execution_order(graph: ValidatedGraph) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()
    for output_id in graph.outputs:
        for node_id in _post_order(output_id, lambda n: [v.node_id for v in graph.nodes[n][1].values()
                                                         if isinstance(v, Link)], seen):
            order.append(node_id)
    return order


def _post_order(root: str, dependencies, seen: set[str], on_cycle=None) -> list[str]:
    """Nodes reachable from `root`, each after its dependencies, skipping `seen` (updated);
    iterative depth-first search. `on_cycle(path)` is told of each link back into the path."""
    order: list[str] = []
    if root in seen:
        return order
    seen.add(root)
    path = [root]
    stack = [(root, iter(dependencies(root)))]
    on_path = {root}
    while stack:
        node_id, children = stack[-1]
        for child in children:
            if child in on_path:
                if on_cycle is not None:
                    on_cycle(path[path.index(child):] + [child])
                continue
            if child in seen:
                continue
            seen.add(child)
            path.append(child)
            on_path.add(child)
            stack.append((child, iter(dependencies(child))))
            break
        else:
            stack.pop()
            path.pop()
            on_path.discard(node_id)
            order.append(node_id)
    return order


class _Validation:
    """One pass of ComfyUI's validate_inputs over the ancestors of each output."""

    def __init__(self, prompt: dict, registry: NodeRegistry, context: RunContext):
        self.prompt, self.registry, self.context = prompt, registry, context
        self.resolved: dict[str, tuple[type[Node], dict[str, Any]]] = {}
        self.valid: dict[str, bool] = {}
        self.node_errors: dict[str, dict] = {}

    def fail(self, node_id: str, output_id: str, err: dict) -> None:
        entry = self.node_errors.setdefault(node_id, {
            "errors": [], "dependent_outputs": [], "class_type": self.prompt[node_id]["class_type"]})
        if err not in entry["errors"]:
            entry["errors"].append(err)
        if output_id not in entry["dependent_outputs"]:
            entry["dependent_outputs"].append(output_id)

    def links(self, node_id: str) -> list[str]:
        """The ids of the existing nodes that `node_id`'s inputs link to."""
        inputs = self.prompt[node_id].get("inputs")
        if not isinstance(inputs, dict):
            return []
        return [str(value[0]) for value in inputs.values()
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
                and not isinstance(value[0], bool) and str(value[0]) in self.prompt]

    def ancestors_first(self, output_id: str) -> list[str]:
        """`output_id` and its ancestors, dependencies first; nodes on a cycle are marked
        invalid with ComfyUI's dependency_cycle error."""

        def cycle(members: list[str]) -> None:
            for member in members[:-1]:
                self.fail(member, output_id, error_entry(
                    "dependency_cycle", "Dependency cycle detected", f"Node ID '#{member}' links back to itself",
                    {"cycle": members}))
                self.valid[member] = False

        return _post_order(output_id, self.links, set(), cycle)

    def visit(self, node_id: str, output_id: str, path: tuple[str, ...]) -> bool:
        if node_id in path:
            for member in path[path.index(node_id):]:
                self.fail(member, output_id, error_entry(
                    "dependency_cycle", "Dependency cycle detected", f"Node ID '#{member}' links back to itself",
                    {"cycle": list(path[path.index(node_id):]) + [node_id]}))
            return False
        if node_id in self.valid:
            if not self.valid[node_id] and node_id in self.node_errors:
                entry = self.node_errors[node_id]
                if output_id not in entry["dependent_outputs"]:
                    entry["dependent_outputs"].append(output_id)
            return self.valid[node_id]
        path = path + (node_id,)
        entry = self.prompt[node_id]
        cls = self.registry.get(entry["class_type"])
        raw_inputs = entry.get("inputs", {})
        ok = True
        if not isinstance(raw_inputs, dict):
            self.fail(node_id, output_id, error_entry("invalid_input_type", "inputs must be an object"))
            raw_inputs, ok = {}, False
        resolved: dict[str, Any] = {}
        literals: dict[str, Any] = {}
        for spec in cls.inputs:
            if spec.name not in raw_inputs or raw_inputs[spec.name] is None:
                if spec.optional:
                    resolved[spec.name] = spec.default
                    continue
                self.fail(node_id, output_id, error_entry(
                    "required_input_missing", "Required input is missing", spec.name, {"input_name": spec.name}))
                ok = False
                continue
            value = raw_inputs[spec.name]
            if isinstance(value, dict) and set(value) == {"__value__"}:
                value = value["__value__"]  # ComfyUI wraps array literals this way
            elif isinstance(value, list):
                link_ok, link = self.check_link(node_id, output_id, spec, value, path)
                ok &= link_ok
                if link_ok:
                    resolved[spec.name] = link
                continue
            err, converted = self.check_literal(spec, value)
            if err is not None:
                self.fail(node_id, output_id, err)
                ok = False
            else:
                resolved[spec.name] = literals[spec.name] = converted
        if ok:
            message = cls().validate(self.context, **literals)
            if message:
                self.fail(node_id, output_id, error_entry(
                    "custom_validation_failed", "Custom validation failed for node", message))
                ok = False
        self.valid[node_id] = ok
        if ok:
            self.resolved[node_id] = (cls, resolved)
        return ok

    def check_link(self, node_id: str, output_id: str, spec: InputSpec, value: list, path) -> tuple[bool, Link | None]:
        if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
            self.fail(node_id, output_id, error_entry(
                "bad_linked_input", "Bad linked input, must be a length-2 list of [string, int]", spec.name,
                {"input_name": spec.name, "input_config": spec.type, "received_value": value}))
            return False, None
        source_id = str(value[0])
        if source_id not in self.prompt:
            self.fail(node_id, output_id, error_entry(
                "bad_linked_input", f"Bad linked input, node {source_id} does not exist", spec.name,
                {"input_name": spec.name, "received_value": value}))
            return False, None
        source_cls = self.registry.get(self.prompt[source_id]["class_type"])
        if not 0 <= value[1] < len(source_cls.outputs):
            self.fail(node_id, output_id, error_entry(
                "bad_linked_input", f"Bad linked input, node {source_id} has no output {value[1]}", spec.name,
                {"input_name": spec.name, "received_value": value}))
            return False, None
        received = source_cls.outputs[value[1]].type
        if received != spec.type and not (spec.type == "COMBO" and received == "STRING"):
            self.fail(node_id, output_id, error_entry(
                "return_type_mismatch", "Return type mismatch between linked nodes",
                f"{spec.name}, received_type({received}) mismatch input_type({spec.type})",
                {"input_name": spec.name, "input_config": spec.type, "received_type": received,
                 "linked_node": value}))
            return False, None
        if not self.visit(source_id, output_id, path):
            return False, None
        return True, Link(source_id, value[1])

    def check_literal(self, spec: InputSpec, value: Any) -> tuple[dict | None, Any]:
        extra = {"input_name": spec.name, "input_config": spec.type, "received_value": value}
        if not spec.is_widget:
            return error_entry("invalid_input_type", f"Input {spec.name} must be a link to a {spec.type} output",
                               spec.name, extra), None
        if spec.type == "COMBO":
            options = spec.options(self.context)
            if not isinstance(value, str) or value not in options:
                return error_entry("value_not_in_list", "Value not in list",
                                   f"{spec.name}: '{value}' not in {options}", extra), None
            return None, value
        if spec.type in ("INT", "FLOAT") and isinstance(value, float) and not math.isfinite(value):
            return error_entry("invalid_input_type", f"{spec.name} must be a finite number, got {value!r}"
                               .replace("nan", "NaN"), f"{spec.name}, {value!r}", extra), None
        if spec.type in ("INT", "FLOAT") and isinstance(value, bool):
            return error_entry("invalid_input_type", f"{spec.name} must be a number, got the boolean "
                               f"{str(value).lower()}", f"{spec.name}, {value!r}", extra), None
        try:
            if spec.type == "INT":
                converted: Any = int(value)
            elif spec.type == "FLOAT":
                converted = float(value)
            elif spec.type == "BOOLEAN":
                if not isinstance(value, bool):
                    raise ValueError(value)
                converted = value
            else:
                if not isinstance(value, (str, int, float)):
                    raise ValueError(value)
                converted = str(value)
        except (TypeError, ValueError):
            return error_entry("invalid_input_type", f"Failed to convert an input value to a {spec.type} value",
                               f"{spec.name}, {value!r}", extra), None
        if spec.type == "STRING":
            if spec.max is not None and len(converted) > spec.max:
                return error_entry("value_bigger_than_max", f"Value is longer than the max of {spec.max:g} characters",
                                   f"{spec.name}, length {len(converted)}", extra), None
            return None, converted
        if spec.type in ("INT", "FLOAT"):
            if spec.min is not None and converted < spec.min:
                return error_entry("value_smaller_than_min", f"Value {converted} smaller than min of {spec.min:g}",
                                   f"{spec.name}", extra), None
            if spec.max is not None and converted > spec.max:
                return error_entry("value_bigger_than_max", f"Value {converted} bigger than max of {spec.max:g}",
                                   f"{spec.name}", extra), None
            if spec.multiple_of and converted % spec.multiple_of:
                return error_entry("custom_validation_failed",
                                   f"Value {converted} is not a multiple of {spec.multiple_of}",
                                   f"{spec.name}", extra), None
        return None, converted
