"""The VAE's GroupNorms, spread over the whole GPU (compiled speed modes).

PyTorch's GroupNorm kernel gives each (image, group) pair one thread block: the FLUX VAE's
decoder normalises 32 groups of up to 16M values at 1024x1024, on 32 of the H200's 132
multiprocessors, 0.046 s of a 0.09 s decode (bench/results/README.md). ryla.speed.kernels'
group_norm splits every group into chunks and applies the SiLU that follows most of these
norms in the same pass. Every norm in the decoder's and encoder's ResNet blocks, and their
output norms, get it, in NCHW or channels-last (the layout ryla.speed.modes.optimize_vae
gives the VAE where that path's start-up check passes); elsewhere (CPUs, float32, other
layouts) PyTorch's GroupNorm runs.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def fast_group_norm_available() -> bool:
    """Triton on a GPU, and the kernel agrees with PyTorch's GroupNorm here (a start-up check,
    so that a kernel that fails to build or run on this GPU is never used for requests)."""
    from ryla.speed.probes import triton_kernels_available

    if not triton_kernels_available():
        return False
    try:
        from ryla.speed.kernels import group_norm
    except ImportError:  # a Triton too old for the kernels' language features
        return False
    return _agrees_with_pytorch(group_norm, "cuda")


def _agrees_with_pytorch(group_norm, device: str, channels_last: bool = False) -> bool:
    from ryla.speed.probes import agrees_with_pytorch

    generator = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(1, 64, 48, 48, generator=generator, device=device) * 3 + 2).to(torch.bfloat16)
    weight = torch.rand(64, generator=generator, device=device).to(torch.bfloat16) + 0.5
    bias = torch.randn(64, generator=generator, device=device).to(torch.bfloat16)
    layout = "channels-last" if channels_last else "NCHW"
    given = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return agrees_with_pytorch(
        f"fast GroupNorm ({layout})", lambda: group_norm(given, 32, weight, bias, 1e-6, silu=True),
        lambda: F.silu(F.group_norm(x.float(), 32, weight.float(), bias.float(), 1e-6)),
        f"{layout} tensors keep PyTorch's")


@functools.cache
def channels_last_group_norm_available() -> bool:
    """The channels-last path's own start-up check (its kernels are not the NCHW ones): where
    it fails, the VAE stays NCHW, with the NCHW kernel."""
    if not fast_group_norm_available():
        return False
    from ryla.speed.kernels import group_norm

    return _agrees_with_pytorch(group_norm, "cuda", channels_last=True)


def _fast_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.GroupNorm.forward, then SiLU where `self.fused_silu` (the block's own SiLU is removed).
    The kernel takes NCHW and channels-last tensors; other layouts run PyTorch's."""
    if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and self.affine
            and (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                       and channels_last_group_norm_available()))):
        from ryla.speed.kernels import group_norm

        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.fused_silu)
    x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    return F.silu(x) if self.fused_silu else x


def _speed_up(norm: nn.GroupNorm, fused_silu: bool) -> None:
    norm.fused_silu = fused_silu
    norm.forward = types.MethodType(_fast_norm_forward, norm)


def use_fast_group_norms(vae: nn.Module) -> int:
    """Give the VAE's GroupNorms the kernel above (in place); returns how many. In ResNet
    blocks without a time embedding (the VAE's: each norm is then followed by the block's SiLU,
    which is used for nothing else) and before the decoder's and encoder's output convolutions,
    the SiLU moves into the norm."""
    from diffusers.models.resnet import ResnetBlock2D

    changed = set()
    for module in vae.modules():
        if (isinstance(module, ResnetBlock2D) and isinstance(module.nonlinearity, nn.SiLU)
                and module.time_emb_proj is None and module.time_embedding_norm in ("default", "group")
                and isinstance(module.norm1, nn.GroupNorm) and isinstance(module.norm2, nn.GroupNorm)):
            _speed_up(module.norm1, True)
            _speed_up(module.norm2, True)
            module.nonlinearity = nn.Identity()
            changed.update((id(module.norm1), id(module.norm2)))
        elif (isinstance(getattr(module, "conv_norm_out", None), nn.GroupNorm)
              and isinstance(getattr(module, "conv_act", None), nn.SiLU)):
            _speed_up(module.conv_norm_out, True)
            module.conv_act = nn.Identity()
            changed.add(id(module.conv_norm_out))
    for module in vae.modules():  # the rest (the mid-block attention's norm): no SiLU after them
        if isinstance(module, nn.GroupNorm) and id(module) not in changed:
            _speed_up(module, False)
            changed.add(id(module))
    return len(changed)
