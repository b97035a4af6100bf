"""The supported ComfyUI nodes, one module per family."""

from __future__ import annotations

from ryla.graph.nodes import (conditioning, controlnet, edit, identity, image, latent, loaders, lora, mask, sampling,
                              style)
from ryla.graph.registry import NodeRegistry

NODE_MODULES = (loaders, lora, conditioning, controlnet, style, edit, latent, sampling, image, mask, identity)


def default_registry() -> NodeRegistry:
    registry = NodeRegistry()
    for module in NODE_MODULES:
        registry.register_all(module.NODES)
    return registry
