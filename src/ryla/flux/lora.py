"""Exact per-request application of LoRAs (converted by ryla.models.lora_format) to the FLUX
transformer and CLIP-L.

The weights of the targeted layers are patched in place,
W <- W + strength * (alpha / rank) * up @ down, computed in float32 and rounded once. The untouched originals
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
        the same LoRAs on consecutive requests cost nothing.

        One pass over the layers a switch involves: a layer the new set targets is written
        straight from its saved original (original + the sum of its LoRAs' products, in
        float32, rounded once, as comfy/lora.py calculate_weight computes on a float32 copy);
        a layer only the previous set touched gets its original back. Nothing is restored
        first and patched after, so a switch reads and writes each weight once."""
        if key == self.applied_key:
            return
        terms: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for layers, strength in patches:
            if strength == 0:
                continue
            for name, (down, up, scale) in layers.items():
                terms.setdefault(name, []).append((down, up, scale * strength))
        for name in self.touched - terms.keys():
            layer, rows = self._target(name)
            _load_rows(layer, rows, self.originals[name])
        with _exact_tf32():
            for name, layer_terms in terms.items():
                layer, rows = self._target(name)
                if name not in self.originals:  # untouched until now: the weights are the original
                    self.originals[name] = _save_rows(layer, rows)
                _set_rows(layer, rows, self.originals[name], layer_terms)
        self.touched = set(terms)
        self.applied_key = key

    @torch.no_grad()
    def restore(self) -> None:
        for name in self.touched:
            layer, rows = self._target(name)
            _load_rows(layer, rows, self.originals[name])
        self.touched = set()
        self.applied_key = ()


class _exact_tf32:
    """TF32 for the LoRA products, on CUDA: a factor read from a 16-bit file (fp16's 10
    mantissa bits, bf16's 7) is exact in TF32's 10, so each product is exact and only the
    float32 accumulation rounds, as in full float32, at tensor-core speed. Restored after; the
    engine's lock keeps sampling out meanwhile. (bench/lora_patch.py: the whole switch of 494
    full-size layers takes 68 ms on an H200, against 183 ms computed in plain float32 with a
    restore pass first.)"""

    def __enter__(self):
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.before


def lora_delta(terms: list[tuple[torch.Tensor, torch.Tensor, float]], device: torch.device) -> tuple[torch.Tensor, float]:
    """The sum of scale * up @ down over a layer's LoRAs in float32, as (product, factor): one
    LoRA's scale is left to the caller to apply while adding (no extra pass over the product)."""
    (down, up, scale), *rest = terms
    delta = torch.mm(up.to(device, torch.float32), down.to(device, torch.float32))
    if not rest:
        return delta, scale
    delta.mul_(scale)
    for down, up, scale in rest:
        delta.addmm_(up.to(device, torch.float32), down.to(device, torch.float32), alpha=scale)
    return delta, 1.0


# Row operations on a plain Linear, or on a layer that provides its own (Float8Linear).

def _save_rows(layer, rows: slice):
    if hasattr(layer, "save_rows"):
        return layer.save_rows(rows)
    return layer.weight[rows].detach().clone()


def _load_rows(layer, rows: slice, saved) -> None:
    if hasattr(layer, "load_rows"):
        layer.load_rows(rows, saved)
    else:
        layer.weight[rows] = saved


def _set_rows(layer, rows: slice, original, terms) -> None:
    """rows <- original + sum of scale * up @ down, the sum in float32, rounded once into the
    weight's dtype (torch.add computes a bf16 + float32 sum in float32 and writes bf16)."""
    if hasattr(layer, "set_rows"):  # fp8 storage (ryla.speed.fp8.Float8Linear)
        delta, scale = lora_delta(terms, layer.weight_fp8.device)
        layer.set_rows(rows, original, delta, scale)
        return
    weight = layer.weight
    delta, scale = lora_delta(terms, weight.device)
    torch.add(original, delta, alpha=scale, out=weight[rows])
