"""Speed modes for the FLUX transformer, chosen per server (`ryla serve --speed`).

    eager  as loaded (the default on CPUs)
    exact  lossless: fused QKV projections, the fastest available attention kernel, and
           torch.compile of the repeated blocks only (regional compilation: one compile per
           block type instead of the whole 57-block graph, which keeps cold start short)
    fast   exact + fp8 linear layers in the transformer blocks (torchao, dynamic activation
           scaling, per-row scales), for Hopper-class GPUs
    turbo  fast + first-block caching (diffusers FirstBlockCacheConfig): steps whose first
           block changes little reuse the rest of the network's last residual

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


def quantize_fp8(transformer) -> int:
    """fp8 (e4m3) weights with per-row scales and dynamically scaled fp8 activations for the
    Linear layers of the transformer blocks (not the embedders or the output layer)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = 0

    def in_blocks(module, fqn: str) -> bool:
        nonlocal count
        hit = isinstance(module, torch.nn.Linear) and "transformer_blocks." in fqn
        count += hit
        return hit

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=in_blocks)
    return count


def optimize_transformer(transformer, mode: str, compile: bool = True) -> dict:
    """Apply a speed mode in place; returns what was done (for logs and /health)."""
    if mode not in SPEED_MODES:
        raise ValueError(f"speed must be one of {', '.join(SPEED_MODES)}, got {mode!r}")
    info: dict = {"speed": mode}
    if mode == "eager":
        return info
    transformer.fuse_qkv_projections()
    info["fused_qkv"] = True
    info["attention"] = _attention_backend(transformer)
    if mode in ("fast", "turbo"):
        info["fp8_linear_layers"] = quantize_fp8(transformer)
    if mode == "turbo":
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=FIRST_BLOCK_CACHE_THRESHOLD))
        info["first_block_cache"] = FIRST_BLOCK_CACHE_THRESHOLD
    if compile and torch.cuda.is_available():
        transformer.compile_repeated_blocks(fullgraph=True)
        info["compiled"] = "repeated blocks"
    log.info("transformer speed mode: %s", info)
    return info
