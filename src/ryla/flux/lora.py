"""Exact per-request application of LoRAs (converted by ryla.models.lora_format) to the FLUX
transformer and CLIP-L.

The weights of the targeted layers are patched in place,
W <- W + strength * (alpha / rank) * up @ down, computed in float32. The untouched originals
are kept (only for layers some LoRA has touched), so switching LoRAs or going back to the
base model restores the exact original bits: no drift over many swaps, strength 0 is the
base model exactly, and a compiled transformer keeps its graph (same tensors, new values).
One lock serialises patching and use, so concurrent requests cannot see each other's LoRAs.
"""

from __future__ import annotations

import torch

from ryla.speed.modes import FUSED_PROJECTION_ROWS


def linear_shapes(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of every linear layer (works on meta modules).
    Layers fused by fuse_qkv_projections are listed under their unfused names, which is
    what LoRA files target."""
    shapes = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) or hasattr(m, "weight_fp8"):
            shapes[name] = (m.out_features, m.in_features)
        if getattr(m, "fused_projections", False):
            for leaf, (fused_name, _) in FUSED_PROJECTION_ROWS.items():
                fused = getattr(m, fused_name, None)
                if fused is not None:
                    shapes[f"{name}.{leaf}"] = (fused.out_features // 3, fused.in_features)
    return shapes


class WeightPatcher:
    """Applies a set of (LoraWeights, strength) to one module's layers, restoring exactly."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.originals: dict[str, object] = {}
        self.applied_key: tuple = ()
        self.touched: set[str] = set()

    def _target(self, name: str) -> tuple[torch.nn.Module, slice]:
        """The layer holding `name`'s weights, and its rows. After fuse_qkv_projections, q, k
        and v are rows of one to_qkv (or to_added_qkv) layer."""
        parent_name, _, leaf = name.rpartition(".")
        parent = self.module.get_submodule(parent_name) if parent_name else self.module
        if getattr(parent, "fused_projections", False) and leaf in FUSED_PROJECTION_ROWS:
            fused_name, index = FUSED_PROJECTION_ROWS[leaf]
            fused = getattr(parent, fused_name)
            rows = fused.out_features // 3
            return fused, slice(index * rows, (index + 1) * rows)
        return self.module.get_submodule(name), slice(None)

    @torch.no_grad()
    def apply(self, key: tuple, patches: list[tuple[dict, float]]) -> None:
        """Make the module's weights base + the given patches. `key` identifies the set, so
        the same LoRAs on consecutive requests cost nothing."""
        if key == self.applied_key:
            return
        self.restore()
        for layers, strength in patches:
            if strength == 0:
                continue
            for name, (down, up, scale) in layers.items():
                layer, rows = self._target(name)
                if name not in self.originals:
                    self.originals[name] = _save_rows(layer, rows)
                device = _device(layer)
                delta = (up.to(device, torch.float32) @ down.to(device, torch.float32)) * (scale * strength)
                _add_to_rows(layer, rows, delta)
                self.touched.add(name)
        self.applied_key = key

    @torch.no_grad()
    def restore(self) -> None:
        for name in self.touched:
            layer, rows = self._target(name)
            _load_rows(layer, rows, self.originals[name])
        self.touched = set()
        self.applied_key = ()


# Row operations on a plain Linear, or on a layer that provides its own (Float8Linear).

def _device(layer) -> torch.device:
    return layer.weight_fp8.device if hasattr(layer, "weight_fp8") else layer.weight.device


def _save_rows(layer, rows: slice):
    if hasattr(layer, "save_rows"):
        return layer.save_rows(rows)
    return layer.weight[rows].detach().clone()


def _load_rows(layer, rows: slice, saved) -> None:
    if hasattr(layer, "load_rows"):
        layer.load_rows(rows, saved)
    else:
        layer.weight[rows] = saved


def _add_to_rows(layer, rows: slice, delta: torch.Tensor) -> None:
    if hasattr(layer, "add_to_rows"):
        layer.add_to_rows(rows, delta)
    else:
        weight = layer.weight
        weight[rows] = (weight[rows].float() + delta).to(weight.dtype)
