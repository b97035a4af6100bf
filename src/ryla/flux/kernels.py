"""Triton kernels for the `fast` speed mode (imported only where Triton is installed: with
PyTorch's CUDA builds).

`gelu_quantize_rows`: tanh-GELU, then per-row fp8 quantisation, in one pass over the MLP's
activation. The MLP's down projection (proj_out in single blocks, ff.net.2 in double blocks)
takes its input in fp8 with one scale per row, and each row's scale needs the row's maximum
before any entry can be cast. Inductor writes that as a looped reduction, which ran at half
this kernel's speed on the H200 (bench/fp8_kernels.py): here each program owns one row and
either holds it in registers (one read) or reads it in chunks twice, the second time from
cache; the autotuner picks per row width.

Registered with torch.library.triton_op, so torch.compile keeps it inside the compiled block
(no graph break) and CPUs can run it in Triton's interpreter (TRITON_INTERPRET=1; the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ryla.flux.fp8 import FP8, FP8_MAX

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # a jit kernel reads globals only as constexprs


@triton.jit
def _gelu_tanh(x, APPLY_GELU: tl.constexpr):
    if APPLY_GELU:
        inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits at both ends in float32
        x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
    return x


@triton.jit
def _gelu_quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, x_row_stride, out_row_stride, N_COLS: tl.constexpr,
                               APPLY_GELU: tl.constexpr, FP8_LIMIT: tl.constexpr, BLOCK: tl.constexpr,
                               TWO_PASS: tl.constexpr):
    """One program per row. One pass (the row in registers: BLOCK >= N_COLS), or two over
    BLOCK-wide chunks (the maximum first, then the cast, reading the row again from cache:
    more rows in flight per multiprocessor). Which is faster depends on the width; the
    autotuner below measures."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    if TWO_PASS or BLOCK < N_COLS:
        running_max = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N_COLS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N_COLS
            y = _gelu_tanh(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), APPLY_GELU)
            running_max = tl.maximum(running_max, tl.where(mask, tl.abs(y), 0.0))
        scale = tl.maximum(tl.max(running_max, axis=0), 1e-12) / FP8_LIMIT
        for start in range(0, N_COLS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N_COLS
            y = _gelu_tanh(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), APPLY_GELU)
            quantized = tl.clamp(y / scale, -FP8_LIMIT, FP8_LIMIT)
            tl.store(out_row + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        cols = tl.arange(0, BLOCK)
        mask = cols < N_COLS
        y = _gelu_tanh(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), APPLY_GELU)
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        scale = tl.maximum(amax, 1e-12) / FP8_LIMIT
        quantized = tl.clamp(y / scale, -FP8_LIMIT, FP8_LIMIT)
        tl.store(out_row + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


# Launch configurations, measured once per row width on the first call (a fraction of a
# second) and remembered in Triton's cache folder with the compiled variants. One-pass
# configurations narrower than the row run as two-pass ones.
TUNING_CONFIGS = [triton.Config({"BLOCK": 16384, "TWO_PASS": False}, num_warps=w) for w in (8, 16)] + [
    triton.Config({"BLOCK": block, "TWO_PASS": True}, num_warps=w) for block, w in ((1024, 4), (2048, 4), (4096, 8))]
_gelu_quantize_rows_tuned = triton.autotune(configs=TUNING_CONFIGS, key=["N_COLS"],
                                            cache_results=True)(_gelu_quantize_rows_kernel)


def launch_gelu_quantize_rows(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, apply_gelu: bool,
                              config: triton.Config | None = None) -> None:
    """Run the kernel into `out` ([M, K], fp8; a float32 `out` keeps the scaled values
    unrounded, which is how the CPU tests check the arithmetic: Triton's interpreter rounds
    to fp8 differently from the GPU's conversion instruction) and `scale` ([M, 1] float32).
    `config` (one of TUNING_CONFIGS) fixes the launch configuration instead of tuning it."""
    rows, cols = x.shape
    args = (x, out, scale, x.stride(0), out.stride(0))
    # the width is a compile-time constant: a few widths (12288 in FLUX), loops known in full
    constants = dict(N_COLS=cols, APPLY_GELU=apply_gelu, FP8_LIMIT=FP8_MAX)
    if config is None:
        wrap_triton(_gelu_quantize_rows_tuned)[(rows,)](*args, **constants)
    else:
        wrap_triton(_gelu_quantize_rows_kernel)[(rows,)](*args, **constants, **config.kwargs,
                                                         num_warps=config.num_warps)


@triton_op("ryla::gelu_quantize_rows", mutates_args={})
def gelu_quantize_rows(x: torch.Tensor, apply_gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] (last dim contiguous) -> (fp8 [M, K], float32 scales [M, 1]) of gelu_tanh(x)
    (or of x) with each row scaled to e4m3's range."""
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    launch_gelu_quantize_rows(x, out, scale, apply_gelu)
    return out, scale
