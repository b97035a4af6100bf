"""Speed modes for the FLUX transformer, chosen per server (`ryla serve --speed`).

    eager  as loaded (the default on CPUs)
    exact  lossless: fused QKV projections, the fastest available attention kernel
           (FlashAttention-3 where installed, else cuDNN's) with its inputs (Q/K norms, RoPE,
           layout) prepared by one kernel (ryla.speed.attention), GELU
           in the GEMM epilogue and no concatenation before single blocks' proj_out
           (ryla.speed.blocks), and torch.compile of the repeated blocks only (regional
           compilation: one compile per block type instead of the whole 57-block graph,
           which keeps cold start short), with one-pass LayerNorm reductions
           (ryla.speed.inductor_heuristics); the blocks' AdaLayerNorm modulations for all
           steps computed before sampling (ryla.speed.modulation)
    fast   exact + fp8 linear layers in the transformer blocks (per-row weight scales,
           dynamically scaled activations; ryla.speed.fp8) and fp8 attention (cuDNN's fp8
           flash attention; ryla.speed.fp8_attention), for Hopper-class GPUs
    turbo  fast + first-block caching (diffusers FirstBlockCacheConfig): steps whose first
           block changes little reuse the rest of the network's last residual

The compiled modes also give the VAE's GroupNorms a kernel that uses the whole GPU, with the
SiLU after them fused in (ryla.speed.vae_norms).

Compiled artifacts go to a cache folder (a Volume on Modal) so a new process reuses them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPEED_MODES = ("eager", "exact", "fast", "turbo")
FIRST_BLOCK_CACHE_THRESHOLD = 0.12


def check_speed_mode(mode: str) -> None:
    if mode not in SPEED_MODES:
        raise ValueError(f"speed must be one of {', '.join(SPEED_MODES)}, got {mode!r}")


def configure_compile_cache(cache_dir: Path | str) -> None:
    """Point Inductor's and Triton's on-disk caches at `cache_dir` (unless already set)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):  # older torch: the FX graph cache alone
        pass


def _attention_backend(transformer) -> str:
    """cuDNN's attention is the fastest kernel that ships inside PyTorch on Hopper; fall back
    to PyTorch's default SDPA dispatch elsewhere."""
    if torch.cuda.is_available() and hasattr(transformer, "set_attention_backend"):
        try:
            transformer.set_attention_backend("_native_cudnn")
            return "_native_cudnn"
        except Exception as exc:  # backend unavailable in this torch/diffusers build
            log.info("cuDNN attention unavailable (%s); using PyTorch SDPA", exc)
    return "native"


# Rows of the fused projections (diffusers' Attention.fuse_projections) that each unfused layer
# owns: LoRAs and shape listings still address q, k and v by their unfused names.
FUSED_PROJECTION_ROWS = {"to_q": ("to_qkv", 0), "to_k": ("to_qkv", 1), "to_v": ("to_qkv", 2),
                         "add_q_proj": ("to_added_qkv", 0), "add_k_proj": ("to_added_qkv", 1),
                         "add_v_proj": ("to_added_qkv", 2)}


def fuse_qkv(transformer) -> None:
    """Fuse q, k and v into one matmul per attention, and drop the unfused copies (diffusers
    keeps them for unfusing, which would cost ~4 GB at FLUX size). LoRAs still address
    q, k and v: they become rows of the fused layer (ryla.flux.lora)."""
    transformer.fuse_qkv_projections()

    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for leaf, (fused_name, _) in FUSED_PROJECTION_ROWS.items():
                if hasattr(module, fused_name) and isinstance(getattr(module, leaf, None), torch.nn.Module):
                    delattr(module, leaf)


def quantize_fp8(transformer) -> int:
    """fp8 weights and activations for the Linear layers inside the transformer blocks (not
    the embedders or the output layer, which are small and precision-sensitive)."""
    from ryla.speed.fp8 import quantize_linear_layers

    return quantize_linear_layers(transformer, lambda name: "transformer_blocks." in name)


def fp8_attention_kind() -> str:
    from ryla.speed.fp8_attention import cudnn_fp8_attention_available

    return "cudnn_fp8" if cudnn_fp8_attention_available() else "fp8 (PyTorch SDPA on dequantised fp8)"


def use_fp8(transformer) -> dict:
    """The fp8 part of `fast`: fp8 linear layers and fp8 attention."""
    from ryla.speed.fp8_attention import use_fp8_attention

    use_fp8_attention(transformer)
    return {"fp8_linear_layers": quantize_fp8(transformer), "attention": fp8_attention_kind()}


def use_wide_persistent_reductions() -> bool:
    """One-pass reductions for FLUX's 3072-wide LayerNorm rows in every compile of this process
    (ryla.speed.inductor_heuristics). Returns whether this PyTorch has the hook."""
    try:
        import torch._inductor.config as inductor_config
        from torch._inductor.virtualized import V

        from ryla.speed.inductor_heuristics import WideRowChoices
    except ImportError:
        return False
    if hasattr(inductor_config, "inductor_choices_class"):  # every thread's compiles (PyTorch >= 2.12)
        inductor_config.inductor_choices_class = WideRowChoices
    V.set_choices_handler(WideRowChoices())  # this thread's, which may have made its default already
    return True


# The FLUX block classes, shared by the transformer and InfuseNet (a FluxControlNetModel):
# compiled once per class and shape, so InfuseNet's blocks reuse the transformer's kernels.
REPEATED_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def compile_blocks(model, fullgraph: bool = True, mode: str | None = None, dynamic: bool | None = None) -> int:
    """Regional compilation: torch.compile each repeated block in place (diffusers'
    compile_repeated_blocks, which FluxControlNetModel does not declare blocks for)."""
    import torch._dynamo

    # Compiled graphs are kept per block class and input shape (InfuseNet's, each image
    # size's): more than dynamo's default of 8 before it falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = [m for m in model.modules() if type(m).__name__ in REPEATED_BLOCKS]
    for block in blocks:
        block.compile(fullgraph=fullgraph, mode=mode, dynamic=dynamic)
    return len(blocks)


def optimize_vae(vae, mode: str) -> dict:
    """The VAE's part of a speed mode (in place), on GPUs in compiled modes: fast GroupNorms,
    and the VAE in channels-last where that layout's kernel passes its start-up check.

    In NCHW, cuDNN runs the decoder's 1024x1024 convolutions on NHWC copies of their inputs and
    outputs, and the decode's peak is the image's peak. In channels-last (H200, runs 18b-19 in
    bench/results/README.md) the peak was 0.87 GiB lower (23.87 vs 24.75 GiB) and the decode
    6 ms faster (37 vs 43 ms), with the same latents."""
    check_speed_mode(mode)
    from ryla.speed.vae_norms import channels_last_group_norm_available, fast_group_norm_available, use_fast_group_norms

    if mode == "eager" or not fast_group_norm_available():
        return {}
    info = {"vae_fast_group_norms": use_fast_group_norms(vae)}
    if channels_last_group_norm_available():
        vae.to(memory_format=torch.channels_last)
        info["vae_memory_format"] = "channels_last"
    log.info("%s speed mode: %s", type(vae).__name__, info)
    return info


def optimize_transformer(transformer, mode: str, compile: bool = True, compile_mode: str | None = None,
                         controlnet: bool = False) -> dict:
    """Apply a speed mode in place; returns what was done (for logs and /health).

    With `controlnet` (InfuseNet, a FluxControlNetModel beside the transformer): no first-block
    cache (the transformer's cache decides for both), and blocks compiled for static shapes.
    Its blocks are the transformer's classes, whose compiled graphs dynamo keeps in one list
    per class; InfuseNet's text is 8 identity tokens, not 512, and a dynamic-shape graph made
    for it would otherwise be picked for the transformer's calls too."""
    check_speed_mode(mode)
    info: dict = {"speed": mode}
    if mode == "eager":
        return info
    fuse_qkv(transformer)
    info["fused_qkv"] = True
    info["attention"] = _attention_backend(transformer)
    if mode in ("fast", "turbo"):
        info.update(use_fp8(transformer))
    else:
        from ryla.speed.attention import (
            flash_attention_3_available,
            fused_attention_inputs_available,
            use_fused_attention_inputs,
        )

        use_fused_attention_inputs(transformer)
        info["attention_inputs"] = "fused kernel" if fused_attention_inputs_available() else "PyTorch"
        if not controlnet:
            from ryla.speed.modulation import use_precomputed_modulation

            info["precomputed_modulation_layers"] = use_precomputed_modulation(transformer)
        if flash_attention_3_available():
            info["attention"] = "flash_attention_3"
    from ryla.speed.blocks import use_lean_forwards

    caching = mode == "turbo" and not controlnet
    # ControlNet residuals added inside the blocks in exact mode only: there the adds join the
    # blocks' kernels (identity on the H200: 34 ms less GPU time a request); in fast mode Inductor
    # then fuses the blocks' fp8 quantisations worse (70 ms more, bench/results/README.md), and
    # first-block caching (turbo) skips blocks through hooks.
    info["lean_forwards"] = use_lean_forwards(transformer, block_residuals=mode == "exact")
    if caching:
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=FIRST_BLOCK_CACHE_THRESHOLD))
        info["first_block_cache"] = FIRST_BLOCK_CACHE_THRESHOLD
    if compile and torch.cuda.is_available():
        # First-block caching decides per step outside the graph (a compiler-disabled
        # function), so turbo compiles with graph breaks allowed.
        compile_mode = compile_mode or os.environ.get("RYLA_COMPILE_MODE") or None
        compile_blocks(transformer, fullgraph=not caching, mode=compile_mode, dynamic=False if controlnet else None)
        info["compiled"] = f"repeated blocks ({compile_mode or 'default'})"
        if use_wide_persistent_reductions():
            from ryla.speed.inductor_heuristics import PERSISTENT_ROW_LIMIT

            info["persistent_row_reductions"] = PERSISTENT_ROW_LIMIT
    log.info("%s speed mode: %s", type(transformer).__name__, info)
    return info
