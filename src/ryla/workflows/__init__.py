"""Workflow templates: real ComfyUI API-format graphs, filled from typed parameters.

Each template has bindings: which node inputs a typed parameter sets. The typed endpoints
and `ryla generate` fill a template and hand it to the same executor as /workflow.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Template:
    name: str
    bindings: dict[str, tuple[tuple[str, str], ...]]  # parameter -> (node id, input name)...

    @property
    def graph(self) -> dict:
        return _load(self.name)

    def fill(self, **params: Any) -> dict:
        """A copy of the graph with the given parameters set; unknown parameters are an error."""
        unknown = set(params) - set(self.bindings)
        if unknown:
            raise KeyError(f"template {self.name} has no parameters {sorted(unknown)}")
        graph = copy.deepcopy(self.graph)
        for param, value in params.items():
            if value is None:
                continue
            for node_id, input_name in self.bindings[param]:
                graph[node_id]["inputs"][input_name] = value
        return graph


@cache
def _load(name: str) -> dict:
    return json.loads(resources.files("ryla.workflows").joinpath(f"{name}.json").read_text())


FLUX_DEV = Template("flux_dev", {
    "checkpoint": (("1", "ckpt_name"),),
    "prompt": (("2", "text"),),
    "guidance": (("3", "guidance"),),
    "negative_prompt": (("4", "text"),),
    "width": (("5", "width"), ("6", "width")),
    "height": (("5", "height"), ("6", "height")),
    "batch_size": (("5", "batch_size"),),
    "seed": (("7", "seed"),),
    "steps": (("7", "steps"),),
    "cfg": (("7", "cfg"),),
    "scheduler": (("7", "scheduler"),),
    "denoise": (("7", "denoise"),),
    "filename_prefix": (("9", "filename_prefix"),),
})
