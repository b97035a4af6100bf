"""Key layouts of the real FLUX.1-dev files and their conversion to diffusers modules.

The files users download (and ComfyUI reads) use Black Forest Labs' key names for the
transformer (`double_blocks.0.img_attn.qkv.weight`, ...), the LDM layout for the VAE
(`encoder.down.0.block.0.conv1.weight`, ...) and Hugging Face transformers' names for CLIP-L
and T5-XXL. An all-in-one checkpoint such as `flux1-dev-fp8.safetensors` carries all four
under the prefixes below.

diffusers ships `convert_flux_transformer_checkpoint_to_diffusers`, but it hard-codes the
3072-wide FLUX.1-dev hidden size, so it cannot load any other width (our tiny model, or a
narrower InfuseNet-style ControlNet stored in the same layout). The transformer mapping is
therefore written here once, as a rule table used in both directions; the test suite checks it
against diffusers' own converter at full size on meta tensors. The VAE uses diffusers'
converter directly; only its inverse (used to write tiny files) is written here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Prefixes of the components inside a ComfyUI all-in-one Flux checkpoint.
CHECKPOINT_PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "vae.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}


def split_checkpoint(state_dict: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """The tensors of one component of an all-in-one checkpoint, prefix removed."""
    prefix = CHECKPOINT_PREFIXES[component]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# Prefixes a transformer's BFL keys may carry: all-in-one checkpoints and some exports
# (`model.diffusion_model.`), ComfyUI's LoRA files (`diffusion_model.`).
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_known_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split files sometimes keep the checkpoint prefix (`model.diffusion_model.` in
    transformer-only exports); ComfyUI strips it, so do we."""
    for prefix in BFL_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


# --------------------------------------------------------------------------------------------
# Transformer: BFL <-> diffusers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One BFL module and the diffusers module(s) it becomes.

    kind: "same" (renamed), "qkv" (split in three equal parts), "linear1" (q, k, v and the
    MLP input of a single-stream block, split as h, h, h, rest), "swap" (BFL stores the
    final adaLN as shift, scale; diffusers as scale, shift).
    """

    bfl: str
    diffusers: tuple[str, ...]
    kind: str = "same"


def transformer_rules(num_double: int, num_single: int, has_guidance: bool = True) -> list[Rule]:
    rules = [
        Rule("img_in", ("x_embedder",)),
        Rule("txt_in", ("context_embedder",)),
        Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    ]
    if has_guidance:
        rules += [
            Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    for i in range(num_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rules += [
            Rule(b + "img_mod.lin", (d + "norm1.linear",)),
            Rule(b + "txt_mod.lin", (d + "norm1_context.linear",)),
            Rule(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), "qkv"),
            Rule(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"), "qkv"),
            Rule(b + "img_attn.norm.query_norm", (d + "attn.norm_q",)),
            Rule(b + "img_attn.norm.key_norm", (d + "attn.norm_k",)),
            Rule(b + "txt_attn.norm.query_norm", (d + "attn.norm_added_q",)),
            Rule(b + "txt_attn.norm.key_norm", (d + "attn.norm_added_k",)),
            Rule(b + "img_attn.proj", (d + "attn.to_out.0",)),
            Rule(b + "txt_attn.proj", (d + "attn.to_add_out",)),
            Rule(b + "img_mlp.0", (d + "ff.net.0.proj",)),
            Rule(b + "img_mlp.2", (d + "ff.net.2",)),
            Rule(b + "txt_mlp.0", (d + "ff_context.net.0.proj",)),
            Rule(b + "txt_mlp.2", (d + "ff_context.net.2",)),
        ]
    for i in range(num_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rules += [
            Rule(b + "modulation.lin", (d + "norm.linear",)),
            Rule(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"), "linear1"),
            Rule(b + "linear2", (d + "proj_out",)),
            Rule(b + "norm.query_norm", (d + "attn.norm_q",)),
            Rule(b + "norm.key_norm", (d + "attn.norm_k",)),
        ]
    return rules


def _block_counts(keys, double: str, single: str) -> tuple[int, int]:
    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        return max(indices) + 1 if indices else 0

    return count(double), count(single)


# BFL names the RMSNorm weight "scale"; diffusers calls it "weight".
_PARAM_NAMES = {"weight": "weight", "bias": "bias", "scale": "weight"}


def transformer_config_from_weights(config: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """FluxTransformer2DModel's config with what the BFL weights say about themselves: blocks,
    widths, input channels (64; FLUX.1 Fill's 384, Canny/Depth's 128) and whether there is a
    guidance embedding (FLUX.1-schnell has none), as comfy/model_detection.py reads them from a
    state dict. The rest (head width, rope axes) stays the given config's."""
    sd = strip_known_prefix(state_dict)
    if "img_in.weight" not in sd:
        return config
    out = dict(config)
    num_double, num_single = _block_counts(sd, "double_blocks", "single_blocks")
    hidden, in_channels = sd["img_in.weight"].shape
    out.update(in_channels=int(in_channels), num_layers=num_double, num_single_layers=num_single,
               guidance_embeds=any(k.startswith("guidance_in.") for k in sd))
    if "final_layer.linear.weight" in sd:
        out["out_channels"] = int(sd["final_layer.linear.weight"].shape[0])
    if "txt_in.weight" in sd:
        out["joint_attention_dim"] = int(sd["txt_in.weight"].shape[1])
    if "vector_in.in_layer.weight" in sd:
        out["pooled_projection_dim"] = int(sd["vector_in.in_layer.weight"].shape[1])
    head_dim = int(out.get("attention_head_dim", 128))
    if hidden % head_dim == 0:
        out["num_attention_heads"] = int(hidden // head_dim)
    return out


def is_diffusers_transformer(keys) -> bool:
    """FluxTransformer2DModel's own key names (a diffusers folder's shards, or a single file
    saved from one), bare or under `transformer.`, as comfy/model_detection.py's
    convert_diffusers_mmdit recognises them."""
    return any(k.removeprefix("transformer.") == "x_embedder.weight" for k in keys)


def transformer_config_from_diffusers_weights(config: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """FluxTransformer2DModel's config from diffusers-named weights (as
    transformer_config_from_weights reads BFL ones)."""
    out = dict(config)
    num_double, num_single = _block_counts(state_dict, "transformer_blocks", "single_transformer_blocks")
    hidden, in_channels = state_dict["x_embedder.weight"].shape
    out.update(in_channels=int(in_channels), num_layers=num_double, num_single_layers=num_single,
               guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in state_dict),
               out_channels=int(state_dict["proj_out.weight"].shape[0]),
               joint_attention_dim=int(state_dict["context_embedder.weight"].shape[1]),
               pooled_projection_dim=int(state_dict["time_text_embed.text_embedder.linear_1.weight"].shape[1]))
    head_dim = int(out.get("attention_head_dim", 128))
    if hidden % head_dim == 0:
        out["num_attention_heads"] = int(hidden // head_dim)
    return out


def flux_transformer_from_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL/ComfyUI transformer keys -> diffusers FluxTransformer2DModel keys (any width).

    Raises KeyError naming the first tensor that is neither converted nor expected, so a
    file of another architecture is refused instead of half-loaded.
    """
    sd = dict(strip_known_prefix(state_dict))
    num_double, num_single = _block_counts(sd, "double_blocks", "single_blocks")
    has_guidance = any(k.startswith("guidance_in.") for k in sd)
    hidden = sd["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for rule in transformer_rules(num_double, num_single, has_guidance):
        for bfl_param, diffusers_param in _PARAM_NAMES.items():
            key = f"{rule.bfl}.{bfl_param}"
            if key not in sd:
                continue
            tensor = sd.pop(key)
            for name, part in zip(rule.diffusers, split_fused(rule, tensor, hidden)):
                out[f"{name}.{diffusers_param}"] = part
    if sd:
        raise KeyError(f"unexpected tensors in a FLUX transformer file: {sorted(sd)[:5]}")
    return out


def split_fused(rule: Rule, tensor: torch.Tensor, hidden: int) -> list[torch.Tensor]:
    if rule.kind == "same":
        return [tensor]
    if rule.kind == "swap":
        shift, scale = tensor.chunk(2, dim=0)
        return [torch.cat([scale, shift], dim=0)]
    if rule.kind == "qkv":
        return list(torch.chunk(tensor, 3, dim=0))
    # linear1 stacks q, k, v (h rows each) and the MLP input (the rest) along dim 0.
    h = hidden
    return list(torch.split(tensor, (h, h, h, tensor.shape[0] - 3 * h), dim=0))


def flux_transformer_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys -> BFL keys: the inverse of the above, used to
    write files in the layout of the released flux1-dev.safetensors."""
    sd = dict(state_dict)
    num_double, num_single = _block_counts(sd, "transformer_blocks", "single_transformer_blocks")
    has_guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in sd)
    out: dict[str, torch.Tensor] = {}
    for rule in transformer_rules(num_double, num_single, has_guidance):
        for bfl_param, diffusers_param in _PARAM_NAMES.items():
            keys = [f"{name}.{diffusers_param}" for name in rule.diffusers]
            if not all(k in sd for k in keys):
                continue
            is_norm = rule.bfl.endswith("_norm")
            if (bfl_param == "scale") != is_norm:
                continue
            parts = [sd.pop(k) for k in keys]
            if rule.kind == "swap":
                scale, shift = parts[0].chunk(2, dim=0)
                parts = [torch.cat([shift, scale], dim=0)]
            out[f"{rule.bfl}.{bfl_param}"] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if sd:
        raise KeyError(f"diffusers tensors with no BFL name: {sorted(sd)[:5]}")
    return out


# --------------------------------------------------------------------------------------------
# VAE: diffusers -> LDM (the inverse of diffusers' convert_ldm_vae_checkpoint)
# --------------------------------------------------------------------------------------------

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            prefix, _, rest = new.partition(".mid_block.attentions.0.")
            module, _, param = rest.rpartition(".")
            new = f"{prefix}.mid.attn_1.{_VAE_ATTENTION[module]}.{param}"
            if tensor.ndim == 2:  # LDM stores these projections as 1x1 convolutions
                tensor = tensor[:, :, None, None]
        out[new] = tensor
    return out


# --------------------------------------------------------------------------------------------
# ComfyUI's scaled fp8 files, and what a file that is not FLUX is
# --------------------------------------------------------------------------------------------

# ComfyUI's "scaled fp8" layout (Comfy-Org's t5xxl_fp8_e4m3fn_scaled.safetensors, scaled
# diffusion models): a `scaled_fp8` marker tensor, each quantised Linear's weight in float8
# beside a float32 `<layer>.scale_weight` (and, for fp8 matmuls, `<layer>.scale_input`). The
# weight is the stored value times its scale, as comfy/quant_ops.py dequantises it
# (weight.to(dtype) * scale_weight); scale_input only matters to fp8 matmul kernels.
SCALED_FP8_MARKER = "scaled_fp8"


def is_scaled_fp8(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER) or k.endswith(".scale_weight")
               for k in state_dict)


def dequantize_scaled_fp8(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A scaled-fp8 state dict as plain weights in `dtype` (tensor by tensor, so the peak is
    one layer in float32); other state dicts unchanged."""
    if not is_scaled_fp8(state_dict):
        return state_dict
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == SCALED_FP8_MARKER or key.endswith(("." + SCALED_FP8_MARKER, ".scale_weight", ".scale_input")):
            continue
        scale = state_dict.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            if scale.numel() != 1 and scale.shape[0] != tensor.shape[0]:
                raise KeyError(f"{key}: scale_weight of shape {tuple(scale.shape)} fits no per-tensor or per-row "
                               "scaling")
            scale = scale.float().reshape(-1, *([1] * (tensor.ndim - 1))) if scale.numel() != 1 else scale.float()
            tensor = (tensor.float() * scale).to(dtype)
        out[key] = tensor
    return out


# Key patterns of other model families' checkpoints, to name what a refused file is.
_OTHER_FAMILIES = (
    ("conditioner.embedders.1", "a Stable Diffusion XL checkpoint"),
    ("joint_blocks.0.", "a Stable Diffusion 3 checkpoint"),
    ("cond_stage_model.transformer.text_model", "a Stable Diffusion 1.x checkpoint"),
    ("cond_stage_model.model.transformer", "a Stable Diffusion 2.x checkpoint"),
    ("input_blocks.0.0.weight", "a Stable Diffusion (UNet) model"),
    ("lora_A", "a LoRA (it goes in loras/ and is applied with LoraLoader)"),
    ("lora_down", "a LoRA (it goes in loras/ and is applied with LoraLoader)"),
    ("encoder.block.0.layer.0.SelfAttention", "a T5 text encoder (it goes in text_encoders/)"),
    ("text_model.encoder.layers.0", "a CLIP text encoder (it goes in text_encoders/)"),
    ("encoder.down.0.block.0", "a VAE (it goes in vae/)"),
)


def describe_other_model(keys) -> str | None:
    """What a state dict that is not a FLUX transformer looks like, or None when unknown."""
    keys = list(keys)
    for pattern, description in _OTHER_FAMILIES:
        if any(pattern in key for key in keys):
            return description
    return None


# --------------------------------------------------------------------------------------------
# Single-file FLUX ControlNets: InstantX (and Shakker-Labs' Union), XLabs
# --------------------------------------------------------------------------------------------

# The layouts, told apart by their keys as comfy/controlnet.py load_controlnet_state_dict does:
# - InstantX / Shakker-Labs Union: diffusers' FluxControlNetModel keys (`controlnet_x_embedder`,
#   `transformer_blocks.*`, `controlnet_blocks.*`, `controlnet_single_blocks.*`; a Union file
#   also `controlnet_mode_embedder`). Its control image is VAE-encoded (a latent input).
# - XLabs-AI: BFL names for its double blocks (`double_blocks.0.img_attn.norm.key_norm.scale`),
#   `controlnet_blocks.*`, `pos_embed_input` and a pixel-space `input_hint_block` of eight
#   convolutions; no single blocks. diffusers' FluxControlNetModel builds the same network with
#   conditioning_embedding_channels=16 (its ControlNetConditioningEmbedding is that conv stack).
CONTROLNET_INSTANTX = "instantx"
CONTROLNET_XLABS = "xlabs"

# XLabs' names that are not BFL block names -> diffusers FluxControlNetModel's: its pos_embed_input
# is controlnet_x_embedder; its input_hint_block (an nn.Sequential: conv, SiLU, conv, ...) is
# ControlNetConditioningEmbedding's conv_in, blocks.0-5 and conv_out; controlnet_blocks keep theirs.
_XLABS_NAMES = {"pos_embed_input.": "controlnet_x_embedder.", "controlnet_blocks.": "controlnet_blocks.",
                **{f"input_hint_block.{2 * i}.": f"input_hint_block.{name}."
                   for i, name in enumerate(("conv_in", *(f"blocks.{b}" for b in range(6)), "conv_out"))}}


def _renamed(state_dict: dict[str, torch.Tensor], names: dict[str, str]) -> tuple[dict, dict]:
    """(the tensors whose key starts with one of `names`' prefixes, renamed; the others)."""
    renamed, rest = {}, {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        if prefix is None:
            rest[key] = tensor
        else:
            renamed[names[prefix] + key[len(prefix):]] = tensor
    return renamed, rest


def controlnet_layout(keys) -> str | None:
    keys = set(keys)
    if "controlnet_blocks.0.weight" in keys and "double_blocks.0.img_attn.norm.key_norm.scale" in keys:
        return CONTROLNET_XLABS
    if "controlnet_x_embedder.weight" in keys:
        return CONTROLNET_INSTANTX
    return None


def controlnet_from_xlabs(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs' keys -> diffusers FluxControlNetModel keys (conditioning_embedding_channels=16)."""
    out, blocks = _renamed(state_dict, _XLABS_NAMES)
    if any(k.startswith("input_hint_block.") for k in blocks):
        raise KeyError(f"unexpected XLabs hint layers {sorted(k for k in blocks if k.startswith('input_hint'))[:3]}")
    return {**out, **flux_transformer_from_bfl(blocks)}


def controlnet_to_xlabs(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse (writes the tiny XLabs file in its published layout)."""
    out, blocks = _renamed(state_dict, {v: k for k, v in _XLABS_NAMES.items()})
    return {**out, **flux_transformer_to_bfl(blocks)}


def controlnet_config_from_weights(config: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """FluxControlNetModel's config from diffusers-named weights: blocks, width, input and
    text widths, guidance, Union's modes, XLabs' pixel-space hint embedding. The head width and
    rope axes stay the given (FLUX.1-dev's, or a tiny file's own) config's."""
    out = {k: v for k, v in config.items() if k in ("attention_head_dim", "axes_dims_rope", "patch_size")}
    num_double, num_single = _block_counts(state_dict, "transformer_blocks", "single_transformer_blocks")
    hidden, in_channels = state_dict["x_embedder.weight"].shape
    head_dim = int(out.get("attention_head_dim", 128))
    out.update(in_channels=int(in_channels), num_layers=num_double, num_single_layers=num_single,
               num_attention_heads=int(hidden // head_dim),
               joint_attention_dim=int(state_dict["context_embedder.weight"].shape[1]),
               pooled_projection_dim=int(state_dict["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
               guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in state_dict))
    if "controlnet_mode_embedder.weight" in state_dict:
        out["num_mode"] = int(state_dict["controlnet_mode_embedder.weight"].shape[0])
    if "input_hint_block.conv_in.weight" in state_dict:
        out["conditioning_embedding_channels"] = int(state_dict["input_hint_block.conv_out.weight"].shape[0])
        # diffusers packs the hint block's output in patch_size x patch_size patches (its only use
        # of patch_size); XLabs packs 2x2, as the latent is (comfy/ldm/flux/controlnet.py rearrange)
        out["patch_size"] = 2
    return out


# --------------------------------------------------------------------------------------------
# Redux: the SigLIP image encoder (clip_vision/) and the Redux projection (style_models/)
# --------------------------------------------------------------------------------------------

# SigLIP so400m's heads are 72 wide (1152 = 16 x 72), whatever the width.
SIGLIP_HEAD_DIM = 72


def siglip_config_from_weights(config: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """SiglipVisionConfig from a vision tower's weights (transformers' key names under
    `vision_model.`, as Comfy-Org's sigclip_vision_patch14_384.safetensors has them), as
    comfy/clip_vision.py load_clipvision_from_sd tells the model from its layer count and
    positions: layers, widths, patch and image size. Heads come from the given config when the
    width is its own, else from SigLIP's head width."""
    out = dict(config)
    prefix = "vision_model."
    patch = state_dict[prefix + "embeddings.patch_embedding.weight"]
    positions = state_dict[prefix + "embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith(prefix + "encoder.layers."))
    hidden = int(patch.shape[0])
    side = round(positions ** 0.5)
    if side * side != positions:
        raise KeyError(f"{positions} position embeddings make no square grid of patches")
    if hidden != config.get("hidden_size"):
        out["num_attention_heads"] = max(1, hidden // SIGLIP_HEAD_DIM)
    patch_size = int(patch.shape[-1])
    # so400m-patch14-384 takes 384-pixel images in 27 x 27 patches of 14 (the last 6 pixels
    # are left out by the convolution's stride): the configured size stays where it fits
    image_size = int(config.get("image_size", 0))
    if image_size // patch_size != side:
        image_size = side * patch_size
    out.update(hidden_size=hidden, patch_size=patch_size, image_size=image_size,
               num_hidden_layers=layers,
               intermediate_size=int(state_dict[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
               vision_use_head=any(k.startswith(prefix + "head.") for k in state_dict))
    return out


def is_redux(keys) -> bool:
    """FLUX.1 Redux's projection (flux1-redux-dev.safetensors: redux_up, redux_down), as
    comfy/sd.py load_style_model recognises it."""
    return "redux_down.weight" in set(keys)


# --------------------------------------------------------------------------------------------
# What a file is, from its tensor names alone (for the loaders' file lists)
# --------------------------------------------------------------------------------------------

FLUX_TRANSFORMER_FILE = "flux_transformer"
FLUX_CHECKPOINT_FILE = "flux_checkpoint"
CLIP_L_FILE = "clip_l"
T5_FILE = "t5"
VAE_FILE = "vae"
CONTROLNET_FILE = "controlnet"
LORA_FILE = "lora"
CLIP_VISION_FILE = "clip_vision"
REDUX_FILE = "redux"


_LORA_DOWN = re.compile(r"\.(lora_A|lora_down)(\.default)?\.weight$")


def file_kind(keys) -> str | None:
    """Which of ryla's loaders can take a state dict with these tensor names, or None: a FLUX
    transformer (BFL keys, bare or under a checkpoint prefix alone), an all-in-one FLUX
    checkpoint, CLIP-L, T5, the FLUX VAE, a single-file ControlNet, a LoRA, a SigLIP vision
    tower, Redux. Keys only: shapes are checked when the file loads."""
    keys = set(keys)
    transformer_prefix = CHECKPOINT_PREFIXES["transformer"]
    if transformer_prefix + "img_in.weight" in keys and any(k.startswith(CHECKPOINT_PREFIXES["vae"]) for k in keys):
        return FLUX_CHECKPOINT_FILE
    if any(_LORA_DOWN.search(k) for k in keys):  # the pairs ryla.models.lora_format reads
        return LORA_FILE
    if controlnet_layout(keys) is not None:
        return CONTROLNET_FILE
    if any(prefix + "img_in.weight" in keys for prefix in ("", *BFL_PREFIXES)) or is_diffusers_transformer(keys):
        return FLUX_TRANSFORMER_FILE
    if any(k.startswith("text_model.") for k in keys):
        return CLIP_L_FILE
    if any(k.startswith("encoder.block.") for k in keys):
        return T5_FILE
    if "encoder.down.0.block.0.conv1.weight" in keys and "decoder.conv_in.weight" in keys:
        return VAE_FILE
    if "vision_model.embeddings.patch_embedding.weight" in keys:
        return CLIP_VISION_FILE
    if is_redux(keys):
        return REDUX_FILE
    return None


# The file kinds each model folder's loaders take (for GET /models/{folder})
FOLDER_FILE_KINDS = {
    "checkpoints": (FLUX_CHECKPOINT_FILE,), "diffusion_models": (FLUX_TRANSFORMER_FILE,),
    "text_encoders": (CLIP_L_FILE, T5_FILE), "vae": (VAE_FILE,), "loras": (LORA_FILE,),
    "controlnet": (CONTROLNET_FILE,), "clip_vision": (CLIP_VISION_FILE,), "style_models": (REDUX_FILE,),
}
