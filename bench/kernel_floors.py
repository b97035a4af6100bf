"""What the GPU's kernels give at FLUX.1-dev's shapes: the floors behind the speed targets.

Times, with CUDA events, each linear layer shape of one FLUX step at 1024x1024 (4096 image +
512 text tokens) in bf16 (cuBLAS) and in fp8 (torch._scaled_mm, per-row scales, as
ryla.speed.fp8), and attention over 4608 tokens with each SDPA kernel PyTorch has here.
Prints TFLOP/s per shape and the step time these rates imply.

    python bench/kernel_floors.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE, TEXT, WIDTH, HEADS, HEAD_DIM = 4096, 512, 3072, 24, 128
# (tokens, in, out, layers per step): FLUX.1-dev's linear layers with fused QKV
LINEARS = {
    "double qkv (image)": (IMAGE, WIDTH, 3 * WIDTH, 19),
    "double qkv (text)": (TEXT, WIDTH, 3 * WIDTH, 19),
    "double out (image)": (IMAGE, WIDTH, WIDTH, 19),
    "double out (text)": (TEXT, WIDTH, WIDTH, 19),
    "double mlp up (image)": (IMAGE, WIDTH, 4 * WIDTH, 19),
    "double mlp up (text)": (TEXT, WIDTH, 4 * WIDTH, 19),
    "double mlp down (image)": (IMAGE, 4 * WIDTH, WIDTH, 19),
    "double mlp down (text)": (TEXT, 4 * WIDTH, WIDTH, 19),
    "single qkv": (IMAGE + TEXT, WIDTH, 3 * WIDTH, 38),
    "single mlp up": (IMAGE + TEXT, WIDTH, 4 * WIDTH, 38),
    "single out": (IMAGE + TEXT, 5 * WIDTH, WIDTH, 38),
}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of `a` from `b`, in float32 (the benchmarks' accuracy measure)."""
    a, b = a.float().flatten(), b.float().flatten()
    return float((a - b).norm() / b.norm())


def device_time_by_kernel(run) -> tuple[object, dict[str, tuple[float, int]]]:
    """run() under torch.profiler (CUDA activity): its result, and each kernel's device seconds
    and calls, by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = run()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total:
            kernels[event.key] = (total / 1e6, event.count)
    return result, kernels


def cuda_time(fn, iters: int = 50) -> float:
    """Median seconds per call, by CUDA events, after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def linear_floors() -> dict:
    out = {}
    for name, (m, k, n, count) in LINEARS.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        flops = 2 * m * k * n
        bf16 = cuda_time(lambda: F.linear(x, w, bias))
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sx = torch.ones(m, 1, device="cuda")
        sw = torch.ones(1, n, device="cuda")
        fp8 = cuda_time(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, bias=bias,
                                                 out_dtype=torch.bfloat16, use_fast_accum=True))
        out[name] = {"shape": [m, k, n], "per_step": count, "bf16_tflops": flops / bf16 / 1e12,
                     "fp8_tflops": flops / fp8 / 1e12, "bf16_ms_per_step": bf16 * count * 1e3,
                     "fp8_ms_per_step": fp8 * count * 1e3}
    return out


def attention_floors() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, HEADS, IMAGE + TEXT, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * (IMAGE + TEXT) ** 2 * HEAD_DIM * HEADS
    out = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                t = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v))
            out[backend.name] = {"tflops": flops / t / 1e12, "ms_per_step": t * 57 * 1e3}
        except RuntimeError as exc:
            out[backend.name] = {"error": str(exc)[:200]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(), "linear": linear_floors(), "attention": attention_floors()}
    linear_bf16 = sum(v["bf16_ms_per_step"] for v in results["linear"].values())
    linear_fp8 = sum(v["fp8_ms_per_step"] for v in results["linear"].values())
    best_attention = min(v["ms_per_step"] for v in results["attention"].values() if "ms_per_step" in v)
    results["step_floor_ms"] = {"bf16": linear_bf16 + best_attention, "fp8_linear": linear_fp8 + best_attention,
                                "linear_bf16": linear_bf16, "linear_fp8": linear_fp8, "attention": best_attention}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "kernel_floors.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["attention"]), json.dumps(results["step_floor_ms"]), flush=True)


if __name__ == "__main__":
    main()
