"""LoRA files for FLUX: format detection and conversion to the base model's module names.

Formats read:
  * PEFT / diffusers keys, as ostris/ai-toolkit writes them:
    `transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight` (+ optional `.alpha`)
    (diffusers' `FluxLoraLoaderMixin.lora_state_dict`)
  * kohya sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
    `.lora_up.weight`, `.alpha`; text encoder `lora_te1_...`
    (sd-scripts' `networks/lora_flux.py`)
  * ComfyUI's bare BFL keys: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`
    (ComfyUI's `comfy/lora.py` `model_lora_keys_unet`; diffusers has no converter for these)
Kohya and ComfyUI files name BFL modules, some of which are fused in diffusers terms (qkv, a
single block's linear1). Their up-projection is split with the same rule table that converts
the base weights (ryla.models.formats), so any model width works.

Used by the LoRA store (checked at upload) and by the engine (converted at use); applying the
converted weights is the engine's (ryla.flux.lora).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ryla.models import formats


class LoraFormatError(ValueError):
    """Not a FLUX LoRA for this base model; the message says why."""


@dataclass
class LoraWeights:
    """A LoRA converted to the base model's module names: name -> (down, up, scale)."""

    format: str
    transformer: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    text_encoder: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        ranks = [down.shape[0] for down, _, _ in (*self.transformer.values(), *self.text_encoder.values())]
        return max(ranks) if ranks else 0

    def targets(self) -> list[str]:
        return sorted(self.transformer) + sorted(f"text_encoder.{k}" for k in self.text_encoder)

    def to(self, device, dtype=torch.float32) -> LoraWeights:
        def move(d):
            return {k: (a.to(device, dtype), b.to(device, dtype), s) for k, (a, b, s) in d.items()}
        return LoraWeights(self.format, move(self.transformer), move(self.text_encoder))


_PAIR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")


def _group(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """module -> {"down", "up", "alpha"}; plus the keys that are none of these."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        if m := _PAIR.match(key):
            part = "down" if m["kind"] in ("lora_A", "lora_down") else "up"
            groups.setdefault(m["module"], {})[part] = tensor
        elif key.endswith(".alpha"):
            groups.setdefault(key[: -len(".alpha")], {})["alpha"] = tensor
        else:
            unknown.append(key)
    return groups, unknown


def detect_format(tensors: dict[str, torch.Tensor]) -> str:
    keys = list(tensors)
    if any(k.startswith(("lora_unet_", "lora_te1_", "lora_te_")) for k in keys):
        return "kohya"
    if any(k.startswith(formats.BFL_PREFIXES) for k in keys):
        return "comfyui"
    if any(k.startswith(("transformer.", "text_encoder.", "base_model.model.")) for k in keys):
        return "peft"
    raise LoraFormatError("no FLUX LoRA keys found (expected transformer.*, lora_unet_* or diffusion_model.*)")


def convert(tensors: dict[str, torch.Tensor], transformer_shapes: dict[str, tuple[int, int]],
            text_encoder_shapes: dict[str, tuple[int, int]] | None = None) -> LoraWeights:
    """Convert a LoRA file's tensors to the base model's modules, checking every name and
    shape against it. Raises LoraFormatError naming the first problem. Without
    text_encoder_shapes, the file's text-encoder layers are left out."""
    fmt = detect_format(tensors)
    groups, unknown = _group(tensors)
    if unknown:
        raise LoraFormatError(f"unexpected tensors (not LoRA weights): {sorted(unknown)[:3]}")
    skip_text_encoder = text_encoder_shapes is None  # LoraLoaderModelOnly: the file's CLIP part is unused
    text_encoder_shapes = text_encoder_shapes or {}
    te_prefix = "text_model." if not any(k.startswith("text_model.") for k in text_encoder_shapes) else ""
    hidden = transformer_shapes.get("x_embedder", (0, 0))[0]
    bfl_rules = _bfl_rules(transformer_shapes)
    kohya_te = {"lora_te1_" + ("text_model." + n if te_prefix else n).replace(".", "_"): n for n in text_encoder_shapes}
    kohya_unet = {"lora_unet_" + name.replace(".", "_"): name for name in bfl_rules}
    result = LoraWeights(fmt)
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoraFormatError(f"{module}: needs both a down (lora_A) and an up (lora_B) weight")
        down, up = parts["down"].float(), parts["up"].float()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraFormatError(f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair")
        rank = down.shape[0]
        if rank == 0:
            raise LoraFormatError(f"{module}: rank 0 (an empty LoRA pair)")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraFormatError(f"{module}: the weights hold NaN or infinite values")
        scale = 1.0
        if "alpha" in parts:
            alpha = parts["alpha"]
            if alpha.numel() != 1:
                raise LoraFormatError(f"{module}: alpha must be one number, got shape {tuple(alpha.shape)}")
            alpha = float(alpha.float())
            if not math.isfinite(alpha):
                raise LoraFormatError(f"{module}: alpha is {alpha}")
            scale = alpha / rank
        # Resolve the module name in the base model's terms.
        if module.startswith("base_model.model."):
            module = module[len("base_model.model."):]
        if module.startswith(("lora_te", "text_encoder.")) and skip_text_encoder:
            continue
        if module in kohya_te or module.startswith("text_encoder."):
            name = kohya_te.get(module) or module[len("text_encoder."):]
            if te_prefix and name.startswith(te_prefix):
                name = name[len(te_prefix):]
            _check(name, down, up, text_encoder_shapes, "text encoder")
            result.text_encoder[name] = (down, up, scale)
            continue
        if module.startswith("transformer."):
            name = module[len("transformer."):]
            _check(name, down, up, transformer_shapes, "transformer")
            result.transformer[name] = (down, up, scale)
            continue
        bfl = kohya_unet.get(module) or _strip_bfl_prefix(module)
        if bfl not in bfl_rules:
            raise LoraFormatError(f"{module}: not a layer of the FLUX transformer")
        rule = bfl_rules[bfl]
        for name, part in zip(rule.diffusers, formats.split_fused(rule, up, hidden)):
            _check(name, down, part, transformer_shapes, "transformer")
            result.transformer[name] = (down, part, scale)
    if not result.transformer and not result.text_encoder:
        raise LoraFormatError("the file has no LoRA weights")
    return result


def _strip_bfl_prefix(module: str) -> str:
    for prefix in formats.BFL_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    return module


def _bfl_rules(shapes: dict[str, tuple[int, int]]) -> dict:
    num_double = len({n.split(".")[1] for n in shapes if n.startswith("transformer_blocks.")})
    num_single = len({n.split(".")[1] for n in shapes if n.startswith("single_transformer_blocks.")})
    has_guidance = any(n.startswith("time_text_embed.guidance_embedder") for n in shapes)
    return {r.bfl: r for r in formats.transformer_rules(num_double, num_single, has_guidance)
            if not r.bfl.endswith("_norm")}


def _check(name: str, down: torch.Tensor, up: torch.Tensor, shapes: dict[str, tuple[int, int]], what: str):
    if name not in shapes:
        raise LoraFormatError(f"{name}: not a linear layer of the {what}")
    out_features, in_features = shapes[name]
    if down.shape[1] != in_features or up.shape[0] != out_features:
        raise LoraFormatError(
            f"{name}: LoRA maps {down.shape[1]} -> {up.shape[0]} features, the base model's layer "
            f"{in_features} -> {out_features} (a LoRA for another model?)")
