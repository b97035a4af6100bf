"""Triton kernels for the compiled speed modes (imported only where Triton is installed: with
PyTorch's CUDA builds).

`gelu_quantize_rows` (`fast`): tanh-GELU, then per-row fp8 quantisation, in one pass over the
MLP's activation. The MLP's down projection (proj_out in single blocks, ff.net.2 in double
blocks) takes its input in fp8 with one scale per row, and each row's scale needs the row's
maximum before any entry can be cast. Inductor writes that as a looped reduction, which ran at
half this kernel's speed on the H200 (bench/fp8_kernels.py): here each program owns one row
and either holds it in registers (one read) or reads it in chunks twice, the second time from
cache; the autotuner picks per row width.

`flux_attention_inputs` (`exact`): the fused QKV projection's output -> Q and K RMS-normalised
per head and rotated (RoPE), V copied, all three in one [3, batch, seq, heads, head_dim]
buffer, the text stream's rows first. Inductor's kernels for the same work (norm, RoPE's pair
swap, the text/image concatenation and the transposition to [batch, heads, seq, dim]) ran at
1.8 TB/s on the H200; here each program owns a block of rows of one head and touches each
byte once. Attention then reads the buffer through transposed views (no copy), and its output
keeps that layout, so the output projection needs no transposition either.

Registered with torch.library.triton_op, so torch.compile keeps them inside the compiled block
(no graph break) and CPUs can run them in Triton's interpreter (TRITON_INTERPRET=1; the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ryla.speed.probes import FP8, FP8_MAX

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


@triton.jit
def _attention_inputs_kernel(src_ptr, weight_q_ptr, weight_k_ptr, cos_ptr, sin_ptr, out_ptr,
                             src_batch_stride, src_row_stride, out_part_stride, out_batch_stride, rows,
                             out_row_offset, EPS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             HAS_ROPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
                             PARTS: tl.constexpr):
    """Program (row block, head group, batch * PARTS + part): part 0 is Q, 1 is K, 2 is V (with
    PARTS 2, V is left where it is). `src` rows are [Q heads | K heads | V heads] (the fused
    projection's output, bf16); `out` is [PARTS, batch, seq, heads, head_dim] and these rows land
    at `out_row_offset`, which is also their
    position in RoPE's cos/sin tables ([seq, head_dim] float32, each value repeated for its pair,
    as diffusers' FluxPosEmbed builds them). A program loads the rows' cos/sin and the norm's
    weight once for all HEADS_PER_PROGRAM heads it handles.

    RoPE rotates interleaved pairs (2i, 2i + 1), so each pair is read as one 32-bit word: the
    bf16 at the lower address is the low half. A bf16 is the top half of a float32, so
    unpacking is a shift or a mask; the loads and stores stay vectorised and no values move
    between threads. Strides and offsets are in bf16 elements (all even here)."""
    first_head = tl.program_id(1) * HEADS_PER_PROGRAM
    part = tl.program_id(2) % PARTS
    batch = tl.program_id(2) // PARTS
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = (row < rows)[:, None]
    pair = tl.arange(0, HEAD_DIM // 2)[None, :]
    src_words = src_ptr.to(tl.pointer_type(tl.int32))
    out_words = out_ptr.to(tl.pointer_type(tl.int32))
    # 32-bit offsets within one (part, batch) plane; the plane's base is a scalar
    src = (src_words + (batch.to(tl.int64) * src_batch_stride + (part * HEADS + first_head) * HEAD_DIM) // 2
           + row[:, None] * (src_row_stride // 2))
    out = (out_words + (part.to(tl.int64) * out_part_stride + batch.to(tl.int64) * out_batch_stride
                        + first_head * HEAD_DIM) // 2 + (out_row_offset + row[:, None]) * (HEADS * HEAD_DIM // 2))
    if part < 2:
        weight_ptr = tl.where(part == 0, weight_q_ptr, weight_k_ptr)
        weight_even = tl.load(weight_ptr + 2 * pair).to(tl.float32)
        weight_odd = tl.load(weight_ptr + 2 * pair + 1).to(tl.float32)
        if HAS_ROPE:  # one angle per pair (its even column)
            table = (out_row_offset + row[:, None]) * HEAD_DIM + 2 * pair
            cos = tl.load(cos_ptr + table, mask=mask, other=0.0)
            sin = tl.load(sin_ptr + table, mask=mask, other=0.0)
        for head in tl.static_range(HEADS_PER_PROGRAM):
            words = tl.load(src + head * (HEAD_DIM // 2) + pair, mask=mask, other=0)
            even = (words << 16).to(tl.float32, bitcast=True)
            odd = (words & -65536).to(tl.float32, bitcast=True)  # -65536 is 0xFFFF0000
            # RMSNorm over the head (float32, as torch.nn.RMSNorm computes it), then the weight
            inv_rms = tl.math.rsqrt((tl.sum(even * even, axis=1) + tl.sum(odd * odd, axis=1)) / HEAD_DIM
                                    + EPS)[:, None]
            even = even * inv_rms * weight_even
            odd = odd * inv_rms * weight_odd
            if HAS_ROPE:  # (a, b) -> (a cos - b sin, b cos + a sin)
                even, odd = even * cos - odd * sin, odd * cos + even * sin
            low = even.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
            high = odd.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16
            tl.store(out + head * (HEAD_DIM // 2) + pair, high | low, mask=mask)
    else:
        for head in tl.static_range(HEADS_PER_PROGRAM):
            words = tl.load(src + head * (HEAD_DIM // 2) + pair, mask=mask, other=0)
            tl.store(out + head * (HEAD_DIM // 2) + pair, words, mask=mask)


# Measured best of 1-64 rows x 1-8 warps x one or all heads a program (bench/exact_kernels.py,
# H200): 4 rows, 1 warp. All heads a program (cos/sin and the norm's weight loaded once for 24
# heads) took a single block's 4608 rows from 0.059 to 0.048 ms (2.9 -> 3.5 TB/s), but the
# 512-row text launch then has 384 programs for 132 multiprocessors and ran slower; launches
# with fewer programs than this keep one head a program.
ATTENTION_INPUTS_BLOCK_ROWS = 4
ATTENTION_INPUTS_WARPS = 1
ATTENTION_INPUTS_ALL_HEADS_MIN_PROGRAMS = 2048


def launch_attention_inputs(qkv: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                            cos: torch.Tensor | None, sin: torch.Tensor | None, out: torch.Tensor, row_offset: int,
                            eps: float, block_rows: int = ATTENTION_INPUTS_BLOCK_ROWS,
                            num_warps: int = ATTENTION_INPUTS_WARPS, all_heads: bool | None = None) -> None:
    """One stream's fused projection `qkv` ([batch, rows, 3 * heads * head_dim] bf16, last dim
    contiguous) into rows row_offset.. of `out` ([3, batch, seq, heads, head_dim] bf16,
    contiguous; or [2, ...]: Q and K only). `all_heads`: a program handles all its rows' heads
    (else one each); by default, where that still makes ATTENTION_INPUTS_ALL_HEADS_MIN_PROGRAMS
    programs."""
    batch, rows, width = qkv.shape
    parts, _, _, heads, head_dim = out.shape
    if (width != 3 * heads * head_dim or parts not in (2, 3) or qkv.stride(2) != 1 or not out.is_contiguous()
            or qkv.dtype != torch.bfloat16 or out.dtype != torch.bfloat16
            or any(stride % 2 for stride in qkv.stride()[:2]) or head_dim % 2):
        raise ValueError(f"attention inputs: got {qkv.dtype} {tuple(qkv.shape)} (strides {qkv.stride()}) "
                         f"into {out.dtype} {tuple(out.shape)}")
    has_rope = cos is not None
    if all_heads is None:
        all_heads = batch * parts * triton.cdiv(rows, block_rows) >= ATTENTION_INPUTS_ALL_HEADS_MIN_PROGRAMS
    heads_per_program = heads if all_heads else 1
    grid = (triton.cdiv(rows, block_rows), heads // heads_per_program, batch * parts)
    wrap_triton(_attention_inputs_kernel)[grid](
        qkv, weight_q, weight_k, cos if has_rope else weight_q, sin if has_rope else weight_q, out,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), rows, row_offset,
        EPS=eps, HEADS=heads, HEAD_DIM=head_dim, HAS_ROPE=has_rope, BLOCK_ROWS=block_rows,
        HEADS_PER_PROGRAM=heads_per_program, PARTS=parts, num_warps=num_warps)


@triton_op("ryla::flux_attention_inputs", mutates_args={})
def flux_attention_inputs(qkv: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                          text_qkv: torch.Tensor | None, text_weight_q: torch.Tensor | None,
                          text_weight_k: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                          head_dim: int, eps: float, with_value: bool = True) -> torch.Tensor:
    """Q, K (RMS-normalised, RoPE'd) and V as [3, batch, text + image rows, heads, head_dim]
    from the fused projections of the image stream (`qkv`) and, in double blocks, the text
    stream (`text_qkv`, whose rows come first, with the text norms' weights). Without
    `with_value`, [2, ...]: Q and K only (V is read from `qkv` as it is)."""
    batch, rows, width = qkv.shape
    text_rows = text_qkv.shape[1] if text_qkv is not None else 0
    out = torch.empty((3 if with_value else 2, batch, text_rows + rows, width // (3 * head_dim), head_dim),
                      dtype=qkv.dtype, device=qkv.device)
    if text_qkv is not None:
        launch_attention_inputs(text_qkv, text_weight_q, text_weight_k, cos, sin, out, 0, eps)
    launch_attention_inputs(qkv, weight_q, weight_k, cos, sin, out, text_rows, eps)
    return out


# ---------------------------------------------------------------------- GroupNorm (VAE decoder)
# PyTorch's GroupNorm computes each group's statistics in one thread block: 32 blocks for the
# VAE decoder's 32 groups of up to 16M values at 1024x1024, half of the decode's time on the
# H200 (bench/exact_kernels.py). Here each group is split into chunks across the GPU: one
# kernel sums each chunk, the next reduces the group's partial sums (a fixed order, so the same
# input gives the same bits) and normalises its chunk, with the SiLU that follows every
# GroupNorm in the decoder's ResNet blocks applied on the way out.

@triton.jit
def _normalize(x, mean, inv_std, weight, bias, APPLY_SILU: tl.constexpr):
    """(x - mean) / sqrt(var + eps) * weight + bias, then SiLU if APPLY_SILU: the arithmetic
    per value of both layouts' kernels, in float32."""
    y = (x - mean) * inv_std * weight + bias
    if APPLY_SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _group_sums_kernel(x_ptr, partial_ptr, group_numel, splits, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (group, chunk): sum and sum of squares of x - shift over the chunk, float32,
    with the group's first value as the shift (keeps the variance exact-ish when the mean is
    large against the spread)."""
    group = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = x_ptr + group * group_numel
    shift = tl.load(base).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        offset = chunk * CHUNK + start + tl.arange(0, BLOCK)
        mask = offset < group_numel
        x = tl.load(base + offset, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift, 0.0)
        total += x
        squares += x * x
    out = partial_ptr + (group * splits + chunk) * 2
    tl.store(out, tl.sum(total, axis=0))
    tl.store(out + 1, tl.sum(squares, axis=0))


@triton.jit
def _group_norm_apply_kernel(x_ptr, out_ptr, partial_ptr, weight_ptr, bias_ptr, group_numel, splits, spatial,
                             groups, channels_per_group, eps, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                             SPLITS_BLOCK: tl.constexpr, APPLY_SILU: tl.constexpr):
    """Program (group, chunk): the group's mean and variance from all its chunks' sums, then
    (x - mean) / sqrt(var + eps) * weight + bias (and SiLU) over this chunk."""
    group = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    index = tl.arange(0, SPLITS_BLOCK)
    sums = partial_ptr + (group * splits + index) * 2
    total = tl.sum(tl.load(sums, mask=index < splits, other=0.0), axis=0)
    squares = tl.sum(tl.load(sums + 1, mask=index < splits, other=0.0), axis=0)
    base = x_ptr + group * group_numel
    shift = tl.load(base).to(tl.float32)
    shifted_mean = total / group_numel
    variance = tl.maximum(squares / group_numel - shifted_mean * shifted_mean, 0.0)
    mean = shifted_mean + shift
    inv_std = tl.math.rsqrt(variance + eps)
    first_channel = (group % groups) * channels_per_group
    for start in range(0, CHUNK, BLOCK):
        offset = chunk * CHUNK + start + tl.arange(0, BLOCK)
        mask = offset < group_numel
        channel = first_channel + offset // spatial
        weight = tl.load(weight_ptr + channel, mask=mask, other=1.0).to(tl.float32)
        bias = tl.load(bias_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        y = _normalize(tl.load(base + offset, mask=mask, other=0.0).to(tl.float32), mean, inv_std, weight, bias,
                       APPLY_SILU)
        tl.store(out_ptr + group * group_numel + offset, y.to(out_ptr.dtype.element_ty), mask=mask)


# Channels-last ([batch, H, W, channels] in memory): a group's values are not contiguous, but
# each pixel's channels are. Each program takes a run of pixels with all their channels, so
# loads stay contiguous: per-channel sums first (shifted by the channel's first value), then
# one small program per (image, group) combines its channels' sums and chunks, then the
# normalisation, with the same arithmetic per value as the kernel above (_normalize).

@triton.jit
def _channel_sums_nhwc_kernel(x_ptr, partial_ptr, pixels, channels, splits, CHUNK: tl.constexpr,
                              PIXELS_BLOCK: tl.constexpr, CHANNELS_BLOCK: tl.constexpr):
    """Program (image, chunk): per channel, the sum and sum of squares of x - x[first pixel]
    over the chunk's pixels, float32, into partial[image, chunk, 0 or 1, channel]."""
    image = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = x_ptr + image * pixels * channels
    channel = tl.arange(0, CHANNELS_BLOCK)
    channel_mask = channel < channels
    shift = tl.load(base + channel, mask=channel_mask, other=0.0).to(tl.float32)
    # Each thread keeps its own running sums over the tile's pixels and they are added across
    # the tile once, at the end: summing over pixels inside the loop crosses warps (shared
    # memory and a barrier per tile), which ran this kernel at a tenth of the NCHW one's
    # bandwidth on the H200 (run 18).
    total = tl.zeros([PIXELS_BLOCK, CHANNELS_BLOCK], dtype=tl.float32)
    squares = tl.zeros([PIXELS_BLOCK, CHANNELS_BLOCK], dtype=tl.float32)
    for start in range(0, CHUNK, PIXELS_BLOCK):
        pixel = chunk * CHUNK + start + tl.arange(0, PIXELS_BLOCK)
        mask = (pixel < pixels)[:, None] & channel_mask[None, :]
        x = tl.load(base + pixel.to(tl.int64)[:, None] * channels + channel[None, :], mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)
        total += x
        squares += x * x
    out = partial_ptr + (image * splits + chunk) * 2 * channels
    tl.store(out + channel, tl.sum(total, axis=0), mask=channel_mask)
    tl.store(out + channels + channel, tl.sum(squares, axis=0), mask=channel_mask)


@triton.jit
def _group_stats_nhwc_kernel(x_ptr, partial_ptr, stats_ptr, pixels, channels, splits, groups, channels_per_group,
                             eps, SPLITS_BLOCK: tl.constexpr, GROUP_BLOCK: tl.constexpr):
    """Program (image, group): the group's mean and 1 / sqrt(variance + eps) from its channels'
    shifted sums over all chunks, into stats[image, group, 0 or 1]."""
    image = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    split = tl.arange(0, SPLITS_BLOCK)
    member = tl.arange(0, GROUP_BLOCK)
    channel = group * channels_per_group + member
    member_mask = member < channels_per_group
    mask = (split < splits)[:, None] & member_mask[None, :]
    rows = partial_ptr + (image * splits + split.to(tl.int64))[:, None] * 2 * channels + channel[None, :]
    sums = tl.sum(tl.load(rows, mask=mask, other=0.0), axis=0)  # per channel: sum of x - shift
    squares = tl.sum(tl.load(rows + channels, mask=mask, other=0.0), axis=0)
    shift = tl.load(x_ptr + image * pixels * channels + channel, mask=member_mask, other=0.0).to(tl.float32)
    count = pixels * channels_per_group
    mean = tl.sum(tl.where(member_mask, sums + pixels * shift, 0.0), axis=0) / count
    offset = shift - mean  # sum over a channel of (x - mean)^2 = squares + 2 offset sums + pixels offset^2
    deviations = squares + 2.0 * offset * sums + pixels * offset * offset
    variance = tl.maximum(tl.sum(tl.where(member_mask, deviations, 0.0), axis=0) / count, 0.0)
    out = stats_ptr + (image * groups + group) * 2
    tl.store(out, mean)
    tl.store(out + 1, tl.math.rsqrt(variance + eps))


@triton.jit
def _group_norm_apply_nhwc_kernel(x_ptr, out_ptr, stats_ptr, weight_ptr, bias_ptr, pixels, channels, groups,
                                  channels_per_group, CHUNK: tl.constexpr, PIXELS_BLOCK: tl.constexpr,
                                  CHANNELS_BLOCK: tl.constexpr, APPLY_SILU: tl.constexpr):
    """Program (image, chunk): (x - mean) * inv_std * weight + bias (and SiLU) over the chunk's
    pixels, each channel with its group's statistics."""
    image = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    channel = tl.arange(0, CHANNELS_BLOCK)
    channel_mask = channel < channels
    stats = stats_ptr + (image * groups + channel // channels_per_group) * 2
    mean = tl.load(stats, mask=channel_mask, other=0.0)
    inv_std = tl.load(stats + 1, mask=channel_mask, other=0.0)
    weight = tl.load(weight_ptr + channel, mask=channel_mask, other=1.0).to(tl.float32)
    bias = tl.load(bias_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
    base = image * pixels * channels
    for start in range(0, CHUNK, PIXELS_BLOCK):
        pixel = chunk * CHUNK + start + tl.arange(0, PIXELS_BLOCK)
        mask = (pixel < pixels)[:, None] & channel_mask[None, :]
        offset = base + pixel.to(tl.int64)[:, None] * channels + channel[None, :]
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        y = _normalize(x, mean[None, :], inv_std[None, :], weight[None, :], bias[None, :], APPLY_SILU)
        tl.store(out_ptr + offset, y.to(out_ptr.dtype.element_ty), mask=mask)


GROUP_NORM_BLOCK = 2048
GROUP_NORM_MAX_CHUNK = 65536
NHWC_PROGRAMS_PER_IMAGE = 1024  # as many programs as the NCHW kernels' 32 groups x ~32 chunks


def _group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     silu: bool) -> torch.Tensor:
    batch, channels = x.shape[:2]
    pixels = x[0, 0].numel()
    channels_block = triton.next_power_of_2(channels)
    pixels_block = max(1, GROUP_NORM_BLOCK // channels_block)
    chunk = max(pixels_block, triton.next_power_of_2(triton.cdiv(pixels, NHWC_PROGRAMS_PER_IMAGE)))
    splits = triton.cdiv(pixels, chunk)
    partial = torch.empty((batch, splits, 2, channels), dtype=torch.float32, device=x.device)
    stats = torch.empty((batch, groups, 2), dtype=torch.float32, device=x.device)
    out = torch.empty_like(x)  # channels-last too
    grid = (batch, splits)
    _channel_sums_nhwc_kernel[grid](x, partial, pixels, channels, splits, CHUNK=chunk, PIXELS_BLOCK=pixels_block,
                                    CHANNELS_BLOCK=channels_block, num_warps=8)
    _group_stats_nhwc_kernel[(batch, groups)](x, partial, stats, pixels, channels, splits, groups, channels // groups,
                                              eps, SPLITS_BLOCK=triton.next_power_of_2(splits),
                                              GROUP_BLOCK=triton.next_power_of_2(channels // groups))
    _group_norm_apply_nhwc_kernel[grid](x, out, stats, weight, bias, pixels, channels, groups, channels // groups,
                                        CHUNK=chunk, PIXELS_BLOCK=pixels_block, CHANNELS_BLOCK=channels_block,
                                        APPLY_SILU=silu, num_warps=8)
    return out


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor:
    """F.group_norm (then F.silu) for a contiguous [batch, channels, ...] tensor, or a
    channels-last [batch, channels, H, W] one, with affine weights, spread over the whole GPU
    (two launches; three in channels-last)."""
    batch, channels = x.shape[:2]
    if channels % groups:
        raise ValueError(f"group norm: {groups} groups over {tuple(x.shape)}")
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return _group_norm_nhwc(x, groups, weight, bias, eps, silu)
        raise ValueError(f"group norm: {tuple(x.shape)} is neither contiguous nor channels-last")
    spatial = x[0, 0].numel()
    group_numel = channels // groups * spatial
    # about 32 chunks a group (1024 programs for FLUX's VAE), each a whole number of blocks
    chunk = min(GROUP_NORM_MAX_CHUNK, max(GROUP_NORM_BLOCK, triton.next_power_of_2(triton.cdiv(group_numel, 32))))
    splits = triton.cdiv(group_numel, chunk)
    partial = torch.empty((batch * groups, splits, 2), dtype=torch.float32, device=x.device)
    out = torch.empty_like(x)
    grid = (batch * groups, splits)
    _group_sums_kernel[grid](x, partial, group_numel, splits, CHUNK=chunk, BLOCK=GROUP_NORM_BLOCK, num_warps=8)
    _group_norm_apply_kernel[grid](x, out, partial, weight, bias, group_numel, splits, spatial, groups,
                                   channels // groups, eps, CHUNK=chunk, BLOCK=GROUP_NORM_BLOCK,
                                   SPLITS_BLOCK=triton.next_power_of_2(splits), APPLY_SILU=silu, num_warps=8)
    return out


@triton.jit
def _add_quantize_rows_grouped_kernel(pointers_ptr, delta_ptr, factor, layers, rows, N_COLS: tl.constexpr,
                                      OUT_TYPE: tl.constexpr, FP8_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of one layer (program ids: row, layer): y = w_fp8 * w_scale + factor *
    delta, then y quantised with the row's new scale (max |y| / FP8_LIMIT). The layers' tensors
    are anywhere in memory: pointers_ptr holds four addresses a layer (fp8 rows, their scales,
    the output rows, their scales), rows N_COLS apart; delta is [layers, rows, N_COLS]. Two
    passes over BLOCK-wide chunks: the maximum, then the cast, the second reading the row
    again from cache."""
    row = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    w_row = tl.load(pointers_ptr + layer).to(tl.pointer_type(tl.float8e4nv), bitcast=True) + row * N_COLS
    w_scale = tl.load(tl.load(pointers_ptr + layers + layer).to(tl.pointer_type(tl.float32), bitcast=True) + row)
    out_row = tl.load(pointers_ptr + 2 * layers + layer).to(tl.pointer_type(OUT_TYPE), bitcast=True) + row * N_COLS
    out_scale_ptr = tl.load(pointers_ptr + 3 * layers + layer).to(tl.pointer_type(tl.float32), bitcast=True)
    delta_row = delta_ptr + (layer * rows + row) * N_COLS
    running_max = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N_COLS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N_COLS
        y = (tl.load(w_row + cols, mask=mask, other=0.0).to(tl.float32) * w_scale
             + factor * tl.load(delta_row + cols, mask=mask, other=0.0).to(tl.float32))
        running_max = tl.maximum(running_max, tl.where(mask, tl.abs(y), 0.0))
    scale = tl.maximum(tl.max(running_max, axis=0), 1e-12) / FP8_LIMIT
    for start in range(0, N_COLS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N_COLS
        y = (tl.load(w_row + cols, mask=mask, other=0.0).to(tl.float32) * w_scale
             + factor * tl.load(delta_row + cols, mask=mask, other=0.0).to(tl.float32))
        tl.store(out_row + cols, tl.clamp(y / scale, -FP8_LIMIT, FP8_LIMIT).to(OUT_TYPE), mask=mask)
    tl.store(out_scale_ptr + row, scale)


# Row chunk width and warps of the row kernel: of 1024x4 to 16384x16, 4096x4 was the fastest on
# the H200 for ryla's grouped switch with bf16 products (bench/lora_patch.py
# --row-kernel-configs: one LoRA's 494 layers in 24.3 ms, 29.8 at 8192x8, 30.4 at 2048x4).
ROW_KERNEL_BLOCK, ROW_KERNEL_WARPS = 4096, 4


def row_pointer_table(originals: list[tuple[torch.Tensor, torch.Tensor]],
                      outs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The table of addresses add_quantize_rows_grouped's kernel reads its layers through: four
    a layer (fp8 rows, their scales, the output rows, their scales), on the layers' device. Made
    once for a set of layers, it serves every launch over them while the tensors live (the
    caller keeps them alive). Each original and out is ([rows, cols] with contiguous rows,
    [rows] float32 scales), all of one shape; an out may be float32 instead of fp8 (the CPU
    tests' check, as for gelu_quantize_rows: the scaled values unrounded)."""
    if not originals or len(originals) != len(outs):
        raise ValueError("row_pointer_table: one out per original, at least one")
    shape, out_dtype = originals[0][0].shape, outs[0][0].dtype
    for (weight, scale), (out, out_scale) in zip(originals, outs):
        if not (weight.dim() == 2 and weight.shape == out.shape == shape
                and weight.stride() == out.stride() == (shape[1], 1) and weight.dtype == FP8
                and out.dtype == out_dtype and scale.is_contiguous() and out_scale.is_contiguous()):
            raise ValueError("add_quantize_rows_grouped: fp8 [rows, cols] layers with contiguous rows")
    pointers = torch.tensor([t.data_ptr() for t in (*(w for w, _ in originals), *(s for _, s in originals),
                                                    *(o for o, _ in outs), *(s for _, s in outs))],
                            dtype=torch.int64)
    device = originals[0][0].device
    if device.type == "cuda":  # pinned, so the copy neither waits for the GPU nor holds up this thread
        pointers = pointers.pin_memory().to(device, non_blocking=True)
    return pointers


def add_quantize_rows_table(pointers: torch.Tensor, delta: torch.Tensor, factor: float, out_dtype: torch.dtype,
                            block: int | None = None, num_warps: int | None = None) -> None:
    """add_quantize_rows_grouped over layers given by their row_pointer_table: one launch."""
    layers, rows, cols = delta.shape
    if pointers.numel() != 4 * layers or not delta.is_contiguous():
        raise ValueError("add_quantize_rows_grouped: one layer of the table per layer of a contiguous delta")
    _add_quantize_rows_grouped_kernel[(rows, layers)](
        pointers, delta, float(factor), layers, rows, N_COLS=cols,
        OUT_TYPE=tl.float8e4nv if out_dtype == FP8 else tl.float32, FP8_LIMIT=FP8_MAX,
        BLOCK=block or ROW_KERNEL_BLOCK, num_warps=num_warps or ROW_KERNEL_WARPS)


def add_quantize_rows_grouped(originals: list[tuple[torch.Tensor, torch.Tensor]], delta: torch.Tensor, factor: float,
                              outs: list[tuple[torch.Tensor, torch.Tensor]], block: int | None = None,
                              num_warps: int | None = None) -> None:
    """LoRAs onto the fp8 rows of several layers of one shape in one launch (ryla.flux.lora):
    outs[i] <- quantise_rows(originals[i] fp8 * their row scales + factor * delta[i]), delta
    [layers, rows, cols], contiguous, bf16 or float32 (row_pointer_table says what the layers
    may be). Each row's fp8 values and product are read once from memory (the second pass from
    cache)."""
    if len(originals) != delta.shape[0] or tuple(originals[0][0].shape) != tuple(delta.shape[1:]):
        raise ValueError("add_quantize_rows_grouped: one original and one out per layer of a contiguous delta")
    add_quantize_rows_table(row_pointer_table(originals, outs), delta, factor, outs[0][0].dtype, block, num_warps)


def dequantize_add_quantize_rows(weight_fp8: torch.Tensor, weight_scale: torch.Tensor, delta: torch.Tensor,
                                 factor: float, out: torch.Tensor, out_scale: torch.Tensor,
                                 block: int | None = None, num_warps: int | None = None) -> None:
    """add_quantize_rows_grouped for one layer (delta [rows, cols])."""
    add_quantize_rows_grouped([(weight_fp8, weight_scale)], delta.contiguous()[None], factor, [(out, out_scale)],
                              block, num_warps)


@triton.jit
def _e4m3_stochastic(y, noise):
    """y (float32) rounded to one of its two neighbouring float8_e4m3fn values, up with
    probability equal to its distance from the lower one over their spacing (noise uniform in
    [0, 1)), saturating at 448. The spacing in y's binade is 2^(exponent - 3) (three mantissa
    bits), and 2^-9 below e4m3's smallest normal exponent (-6); both it and its inverse are
    built from their bits, so the scaling is exact."""
    magnitude = tl.abs(y)
    exponent = tl.maximum(((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    spacing = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    rounded = tl.minimum(tl.floor(magnitude * inverse + noise) * spacing, 448.0)
    return tl.where(y < 0, -rounded, rounded)


@triton.jit
def _add_round_to_e4m3_grid_kernel(w_ptr, delta_ptr, out_ptr, factor, seed, numel, QUARTER: tl.constexpr):
    """One program per 4 x QUARTER elements: out = stochastic_e4m3(w + factor * delta). One
    Philox draw (tl.rand4x) serves four elements, one in each quarter of the program's block;
    the draw's counter is the element's index within the quarter block, so the numbers depend
    on the seed and the element's position only."""
    block = tl.program_id(0) * 4 * QUARTER
    counters = tl.program_id(0) * QUARTER + tl.arange(0, QUARTER)
    noise = tl.rand4x(seed, counters)
    for part in tl.static_range(4):
        offsets = block + part * QUARTER + tl.arange(0, QUARTER)
        mask = offsets < numel
        y = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + factor * tl.load(
            delta_ptr + offsets, mask=mask, other=0.0)
        tl.store(out_ptr + offsets, _e4m3_stochastic(y, noise[part]).to(out_ptr.dtype.element_ty), mask=mask)


def add_round_to_e4m3_grid(original: torch.Tensor, delta: torch.Tensor, factor: float, seed: int,
                           out: torch.Tensor) -> None:
    """A LoRA onto rows that hold fp8 values (ryla.flux.lora): out <- original + factor *
    delta, stochastically rounded back onto the float8_e4m3fn grid, in one pass that reads the
    original (fp8 or 16-bit) and the float32 product once and writes `out` (16-bit, fp8, or
    float32 for the CPU tests) once. The same seed and inputs give the same bits."""
    numel = original.numel()
    if not (original.is_contiguous() and delta.is_contiguous() and out.is_contiguous()):
        raise ValueError("add_round_to_e4m3_grid needs contiguous rows")
    if numel >= 2 ** 31:
        raise ValueError("add_round_to_e4m3_grid: one layer's rows must hold fewer than 2^31 elements")
    quarter = 1024
    _add_round_to_e4m3_grid_kernel[(triton.cdiv(numel, 4 * quarter),)](
        original, delta, out, float(factor), int(seed), numel, QUARTER=quarter, num_warps=8)


# Stacked LoRAs in one pass (ryla.flux.lora): each program computes its tile of
# sum_t scale_t * up_t @ down_t with tl.dot (TF32: exact products for factors that came from
# 16-bit files, float32 sums), adds it to the original and writes the new weights; the sum
# never goes to memory. Measured on the H200 (bench/lora_patch.py, 494 full-size layers): two
# rank-64 LoRAs 90 ms against 103 ms for the products first (mm, addmm, then the rounding
# kernel), but one LoRA 49 ms against 44 ms, so ryla uses it from two LoRAs on. The same
# structure for fast mode's fp8 rows (two sweeps for the row maxima) was slower both ways
# (82 and 142 ms against 46 and 104) and was removed.
# Up to MAX_LORA_TERMS LoRAs on one layer; ranks up to 256, each masked to its own width.

MAX_LORA_TERMS = 4


@triton.jit
def _lora_term(acc, up_ptr, down_ptr, rank, scale, offs_m, offs_n, mask_m, mask_n, cols,
               RANK_BLOCK: tl.constexpr):
    r = tl.arange(0, RANK_BLOCK)
    up = tl.load(up_ptr + offs_m[:, None] * rank + r[None, :], mask=mask_m[:, None] & (r[None, :] < rank), other=0.0)
    down = tl.load(down_ptr + r[:, None] * cols + offs_n[None, :], mask=(r[:, None] < rank) & mask_n[None, :],
                   other=0.0)
    return acc + scale * tl.dot(up.to(tl.float32), down.to(tl.float32), input_precision="tf32")


@triton.jit
def _lora_sum(up0, down0, rank0, scale0, up1, down1, rank1, scale1, up2, down2, rank2, scale2,
              up3, down3, rank3, scale3, offs_m, offs_n, mask_m, mask_n, cols, N_TERMS: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, RANK_BLOCK: tl.constexpr):
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _lora_term(acc, up0, down0, rank0, scale0, offs_m, offs_n, mask_m, mask_n, cols, RANK_BLOCK)
    if N_TERMS > 1:
        acc = _lora_term(acc, up1, down1, rank1, scale1, offs_m, offs_n, mask_m, mask_n, cols, RANK_BLOCK)
    if N_TERMS > 2:
        acc = _lora_term(acc, up2, down2, rank2, scale2, offs_m, offs_n, mask_m, mask_n, cols, RANK_BLOCK)
    if N_TERMS > 3:
        acc = _lora_term(acc, up3, down3, rank3, scale3, offs_m, offs_n, mask_m, mask_n, cols, RANK_BLOCK)
    return acc


@triton.jit
def _lora_onto_e4m3_grid_kernel(w_ptr, out_ptr, seed, rows, cols, quarter,
                                up0, down0, rank0, scale0, up1, down1, rank1, scale1,
                                up2, down2, rank2, scale2, up3, down3, rank3, scale3,
                                N_TERMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                RANK_BLOCK: tl.constexpr):
    """out = stochastic_e4m3(w + sum of the LoRA terms). Each row is cut into four quarters;
    a program owns the same BM x BN tile in all four, and one Philox draw (tl.rand4x) at
    counter row * quarter + column-in-quarter serves the four: the numbers depend on the seed
    and the element's position only, not on the tiling."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_q = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_m = offs_m < rows
    mask_q = offs_q < quarter
    noise = tl.rand4x(seed, offs_m[:, None] * quarter + offs_q[None, :])
    for part in tl.static_range(4):
        offs_n = part * quarter + offs_q
        acc = _lora_sum(up0, down0, rank0, scale0, up1, down1, rank1, scale1, up2, down2, rank2, scale2,
                        up3, down3, rank3, scale3, offs_m, offs_n, mask_m, mask_q, cols, N_TERMS, BM, BN,
                        RANK_BLOCK)
        index = offs_m[:, None] * cols + offs_n[None, :]
        mask = mask_m[:, None] & mask_q[None, :]
        y = tl.load(w_ptr + index, mask=mask, other=0.0).to(tl.float32) + acc
        tl.store(out_ptr + index, _e4m3_stochastic(y, noise[part]).to(out_ptr.dtype.element_ty), mask=mask)


def _lora_term_args(terms: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[list, int]:
    """The kernel's 16 term arguments (up, down, rank, scale, four times; unused terms repeat
    the first with scale 0 and are never read) and the rank block (a power of two, >= 16)."""
    args = []
    for down, up, scale in terms + [terms[0][:2] + (0.0,)] * (MAX_LORA_TERMS - len(terms)):
        args += [up, down, down.shape[0], float(scale)]
    return args, max(16, triton.next_power_of_2(max(down.shape[0] for down, _, _ in terms)))


def fused_lora_fits(terms: list, rows: int, cols: int) -> bool:
    """Whether the one-pass kernel takes these terms (each (down [r, cols], up [rows, r], scale),
    float32 or 16-bit, contiguous, on one device): at most MAX_LORA_TERMS, ranks up to 256, a
    width divisible by 4. Otherwise ryla.flux.lora computes the product first."""
    return (0 < len(terms) <= MAX_LORA_TERMS and cols % 4 == 0
            and all(down.shape == (down.shape[0], cols) and up.shape == (rows, down.shape[0]) and down.shape[0] <= 256
                    and down.is_contiguous() and up.is_contiguous() for down, up, _ in terms))


def lora_onto_e4m3_grid(original: torch.Tensor, terms: list, seed: int, out: torch.Tensor) -> None:
    """out <- original + sum of scale * up @ down over `terms`, stochastically rounded onto the
    float8_e4m3fn grid (see _e4m3_stochastic), in one pass. original and out are [rows, cols]
    with contiguous rows; out may be bf16, fp8, or float32 (the CPU tests)."""
    rows, cols = original.shape
    if not (original.is_contiguous() and out.is_contiguous() and fused_lora_fits(terms, rows, cols)):
        raise ValueError("lora_onto_e4m3_grid: check fused_lora_fits first")
    term_args, rank_block = _lora_term_args(terms)
    quarter, block_m, block_n = cols // 4, 64, 32
    _lora_onto_e4m3_grid_kernel[(triton.cdiv(rows, block_m), triton.cdiv(quarter, block_n))](
        original, out, int(seed), rows, cols, quarter, *term_args, N_TERMS=len(terms), BM=block_m, BN=block_n,
        RANK_BLOCK=rank_block, num_warps=4)
