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
import torch.nn.functional as F
from torch import nn

from ryla.speed.probes import FP8, FP8_MAX



def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3, saturating at its largest value (scale broadcasts against x)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (fp8 [N, K], float32 scale [N]) with weight ~= fp8 * scale per row."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return to_fp8(weight, scale[:, None]), scale


_row_kernel = False  # set by quantize_linear_layers, outside compiled code
FP8_BIAS_EPILOGUE_ROWS = 64  # fewer rows than this: the bias is added after the fp8 GEMM


def _load_row_quantization_kernel() -> None:
    """Triton's fused GELU + row quantisation kernel (ryla.speed.kernels) where Triton is
    installed (PyTorch's CUDA builds bring it)."""
    global _row_kernel
    try:
        import ryla.speed.kernels  # noqa: F401  (registers torch.ops.ryla.gelu_quantize_rows)
    except ImportError:
        return
    _row_kernel = True


def quantize_activation_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (fp8 [M, K], float32 scale [M, 1]) with (gelu_tanh(x) if gelu else x) ~= fp8 * scale.

    With GELU, on a GPU with Triton, one kernel reads each row once (ryla.speed.kernels). Without
    GELU the input is usually the output of a norm that Inductor fuses with this quantisation
    already, so it stays in PyTorch ops."""
    if gelu and _row_kernel and x.is_cuda and x.stride(-1) == 1:
        return torch.ops.ryla.gelu_quantize_rows(x, True)
    x_fp8, scale = quantize_rows(F.gelu(x, approximate="tanh") if gelu else x)
    return x_fp8, scale[:, None]


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

    def forward_columns(self, x: torch.Tensor, columns: slice, bias: bool = True, gelu: bool = False) -> torch.Tensor:
        """x @ W[:, columns].T (+ bias): the layer's product over one range of its inputs
        (ryla.speed.blocks splits a single block's proj_out this way). With `gelu`, the input
        is gelu_tanh(x), applied while quantising it."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda:
            x_fp8, x_scale = quantize_activation_rows(x2, gelu)
            out = self.forward_fp8(x_fp8, x_scale, x.dtype, columns, bias)
        else:  # CPUs have no fp8 matmul: same numbers for the weights, computed in x's dtype
            x2 = F.gelu(x2, approximate="tanh") if gelu else x2
            out = F.linear(x2, self.dequantized()[:, columns].to(x.dtype), self.bias if bias else None)
        return out.reshape(*shape[:-1], self.out_features)

    def forward_fp8(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype,
                    columns: slice = slice(None), bias: bool = True) -> torch.Tensor:
        """The product for an input already in fp8: x_fp8 [M, K] (rows contiguous) times
        x_scale, one per row ([M, 1]) or one in all (a one-element tensor: fp8 attention's
        output, which needs no second quantisation pass). Returns [M, out_features]."""
        bias_or_none = self.bias if bias else None
        if x_scale.numel() == 1:
            x_scale = x_scale.reshape(1, 1).expand(x_fp8.shape[0], 1).contiguous()
        if x_fp8.is_cuda:
            # cuBLASLt's fp8 GEMM with row-wise scales refuses a bias epilogue for a few rows
            # (CUBLAS_STATUS_NOT_SUPPORTED, H200 with CUDA 13: 8 and 16 rows of K=12288 refused,
            # 48 and more taken; InfuseNet's 8 identity tokens hit it): below
            # FP8_BIAS_EPILOGUE_ROWS rows the bias is added after, which costs nothing there.
            separate_bias = bias_or_none is not None and x_fp8.shape[0] < FP8_BIAS_EPILOGUE_ROWS
            # Fast accumulation: Hopper's fp8 tensor-core accumulate mode, as torchao uses for
            # inference; the result is still bf16.
            out = torch._scaled_mm(x_fp8, self.weight_fp8[:, columns].t(), scale_a=x_scale,
                                   scale_b=self.weight_scale[None, :], bias=None if separate_bias else bias_or_none,
                                   out_dtype=out_dtype, use_fast_accum=True)
            return out + bias_or_none if separate_bias else out
        x = (x_fp8.float() * x_scale).to(out_dtype)
        return F.linear(x, self.dequantized()[:, columns].to(out_dtype), bias_or_none)

    def dequantized(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.weight_fp8[rows].float() * self.weight_scale[rows, None]

    # The three operations WeightPatcher needs to apply LoRAs to rows of this layer.
    def save_rows(self, rows: slice):
        return self.weight_fp8[rows].clone(), self.weight_scale[rows].clone()

    def load_rows(self, rows: slice, saved) -> None:
        self.weight_fp8[rows], self.weight_scale[rows] = saved

    def rows_view(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' fp8 values and scales, as views a LoRA patch writes into
        (ryla.flux.lora.plan_fp8_rows)."""
        return self.weight_fp8[rows], self.weight_scale[rows]


def quantize_linear_layers(module: nn.Module, include) -> int:
    """Replace every nn.Linear whose qualified name passes `include` by a Float8Linear."""
    _load_row_quantization_kernel()
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear) and include(name)]
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, leaf, Float8Linear(linear))
    return len(targets)
