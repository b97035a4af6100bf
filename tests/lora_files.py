"""Small LoRAs for the tiny model, written in each format a user may bring.

One LoRA is drawn in the BFL module space (fused qkv, a single block's linear1) and then
written three ways that mean the same weights: kohya (`lora_unet_*`, lora_down/lora_up,
alpha), ComfyUI bare keys (`diffusion_model.*`, lora_A/lora_B, alpha) and PEFT/diffusers
(`transformer.*`, fused layers split into q, k, v [, mlp] sharing the down projection).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TARGETS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
           "double_blocks.0.img_mlp.0", "single_blocks.0.linear1", "single_blocks.0.linear2")
SPLITS = {  # BFL module -> diffusers modules its rows become
    "double_blocks.0.img_attn.qkv": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"),
    "double_blocks.0.txt_attn.qkv": ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"),
    "double_blocks.0.img_attn.proj": ("transformer_blocks.0.attn.to_out.0",),
    "double_blocks.0.img_mlp.0": ("transformer_blocks.0.ff.net.0.proj",),
    "single_blocks.0.linear1": ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"),
    "single_blocks.0.linear2": ("single_transformer_blocks.0.proj_out",),
}


def bfl_shapes(tiny_store) -> dict[str, tuple[int, int]]:
    with safe_open(str(tiny_store.resolve("diffusion_models", "flux1-dev.safetensors")), "pt") as f:
        return {t: tuple(f.get_slice(t + ".weight").get_shape()) for t in TARGETS}


def make_lora(tiny_store, seed: int, rank: int = 4, scale: float = 0.4) -> dict[str, tuple]:
    """BFL module -> (down [r, in], up [out, r])."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for target, (out_features, in_features) in bfl_shapes(tiny_store).items():
        down = torch.randn(rank, in_features, generator=generator) * scale
        up = torch.randn(out_features, rank, generator=generator) * scale
        lora[target] = (down, up)
    return lora


def write(lora: dict, fmt: str, path: Path, alpha: float | None = None) -> Path:
    tensors = {}
    for target, (down, up) in lora.items():
        rank = down.shape[0]
        if fmt == "kohya":
            base = "lora_unet_" + target.replace(".", "_")
            tensors[f"{base}.lora_down.weight"] = down
            tensors[f"{base}.lora_up.weight"] = up
            tensors[f"{base}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        elif fmt == "comfyui":
            base = "diffusion_model." + target
            tensors[f"{base}.lora_A.weight"] = down
            tensors[f"{base}.lora_B.weight"] = up
            if alpha is not None:
                tensors[f"{base}.alpha"] = torch.tensor(float(alpha))
        elif fmt == "peft":
            hidden = lora["double_blocks.0.img_attn.proj"][1].shape[0]
            names = SPLITS[target]
            if len(names) == 3:
                parts = up.chunk(3)
            elif len(names) == 4:
                parts = up.split((hidden, hidden, hidden, up.shape[0] - 3 * hidden))
            else:
                parts = (up,)
            for name, part in zip(names, parts):
                tensors[f"transformer.{name}.lora_A.weight"] = down.clone()
                tensors[f"transformer.{name}.lora_B.weight"] = part.clone()
        else:
            raise ValueError(fmt)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def store_with_loras(tiny_dir: Path, root: Path, loras: dict[str, tuple[int, tuple[str, ...]]], scale: float = 0.4):
    """A private copy of the tiny store with LoRAs written into loras/: for each name, one
    LoRA drawn from `seed`, written as `{name}-{fmt}.safetensors` in each of `formats`."""
    import shutil

    from ryla.models.store import ModelStore

    shutil.copytree(tiny_dir, root, dirs_exist_ok=True)
    store = ModelStore(root, tiny=True)
    (root / "loras").mkdir(exist_ok=True)
    for name, (seed, formats) in loras.items():
        lora = make_lora(store, seed, scale=scale)
        for fmt in formats:
            write(lora, fmt, root / "loras" / f"{name}-{fmt}.safetensors")
    return store
