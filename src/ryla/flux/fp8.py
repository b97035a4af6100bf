"""fp8 linear layers for the `fast` speed mode.

Weights in float8_e4m3fn with one scale per output row; activations quantised per row at run
time; one `torch._scaled_mm` (Hopper's fp8 tensor cores) per layer, output in bf16.

Why not torchao's Float8 tensor subclass: measured on the H200 (bench/results), its weights
make torch.compile specialise on every block instance, so the regionally compiled FLUX blocks
were recompiled 57 times (314 s of warm-up) instead of once per block type. Here the fp8
weight and its scales are plain buffers, which compiled blocks take as inputs, and which a
LoRA can patch in place (dequantise the touched rows, add, quantise again).
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (fp8 [N, K], float32 scale [N]) with weight ~= fp8 * scale per row."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.data)
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_columns(x, slice(None), bias=True)

    def forward_columns(self, x: torch.Tensor, columns: slice, bias: bool = True) -> torch.Tensor:
        """x @ W[:, columns].T (+ bias): the layer's product over one range of its inputs
        (ryla.flux.blocks splits a single block's proj_out this way)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        bias_or_none = self.bias if bias else None
        if x2.is_cuda:
            x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
            x_fp8 = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            # Fast accumulation: Hopper's fp8 tensor-core accumulate mode, as torchao uses for
            # inference; the result is still bf16.
            out = torch._scaled_mm(x_fp8, self.weight_fp8[:, columns].t(), scale_a=x_scale,
                                   scale_b=self.weight_scale[None, :], bias=bias_or_none, out_dtype=x.dtype,
                                   use_fast_accum=True)
        else:  # CPUs have no fp8 matmul: same numbers for the weights, computed in x's dtype
            out = nn.functional.linear(x2, self.dequantized()[:, columns].to(x.dtype), bias_or_none)
        return out.reshape(*shape[:-1], self.out_features)

    def dequantized(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.weight_fp8[rows].float() * self.weight_scale[rows, None]

    # The three operations WeightPatcher needs to apply a LoRA to rows of this layer.
    def save_rows(self, rows: slice):
        return self.weight_fp8[rows].clone(), self.weight_scale[rows].clone()

    def load_rows(self, rows: slice, saved) -> None:
        self.weight_fp8[rows], self.weight_scale[rows] = saved

    def add_to_rows(self, rows: slice, delta: torch.Tensor) -> None:
        weight, scale = quantize_rows(self.dequantized(rows) + delta)
        self.weight_fp8[rows], self.weight_scale[rows] = weight, scale


def quantize_linear_layers(module: nn.Module, include) -> int:
    """Replace every nn.Linear whose qualified name passes `include` by a Float8Linear."""
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear) and include(name)]
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, leaf, Float8Linear(linear))
    return len(targets)
