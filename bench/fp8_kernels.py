"""fast mode's fp8 kernels against what they replace, alone, at FLUX.1-dev's 1024x1024 shapes.

  * attention over 4608 tokens (24 heads of 128): cuDNN bf16 (exact's kernel) vs cuDNN fp8
    through ryla.speed.fp8_attention (Q, K, V quantised as the fp8 processor does), with the
    error of each against float32 attention;
  * the MLP activation's GELU + per-row fp8 quantisation (4608 x 12288, and the double
    blocks' 4096 x 12288): Inductor's fused kernel vs ryla.speed.kernels' one-pass kernel.

    python bench/fp8_kernels.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_floors import rel_l2  # noqa: E402

TOKENS, HEADS, HEAD_DIM = 4096 + 512, 24, 128


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200)


def attention(results: dict) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ryla.speed.fp8 import FP8_MAX, to_fp8
    from ryla.speed.fp8_attention import cudnn_fp8_attention_available

    torch.manual_seed(0)
    shape = (1, TOKENS, HEADS, HEAD_DIM)
    # Q and K as after FLUX's RMSNorm (unit RMS per head, weights ~1), V as a projection's output
    norm_weight = 1.0 + 0.2 * torch.rand(HEAD_DIM, device="cuda")
    q, k = (F.rms_norm(torch.randn(shape, device="cuda") * 2, (HEAD_DIM,)) * norm_weight for _ in range(2))
    v = torch.randn(shape, device="cuda") * 1.5
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    scale = 1 / math.sqrt(HEAD_DIM)
    flops = 4 * TOKENS * TOKENS * HEAD_DIM * HEADS

    def bhsd(t):
        return t.transpose(1, 2)

    reference = F.scaled_dot_product_attention(*(bhsd(t).float() for t in (q, k, v)), scale=scale).transpose(1, 2)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        bf16 = F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), scale=scale).transpose(1, 2)
        bf16_ms = bench_ms(lambda: F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), scale=scale))
    bound = math.sqrt(HEAD_DIM) * norm_weight.abs().max() / FP8_MAX
    scale_q = scale_k = bound.reshape(1, 1, 1, 1).float()
    scale_v = (v.abs().amax().float() / FP8_MAX).reshape(1, 1, 1, 1)
    q8, k8, v8 = to_fp8(q, scale_q), to_fp8(k, scale_k), to_fp8(v, scale_v)
    row = {"bf16_cudnn_ms": bf16_ms, "bf16_cudnn_tflops": flops / bf16_ms / 1e9,
           "bf16_rel_l2_vs_fp32": rel_l2(bf16, reference), "cudnn_fp8_available": cudnn_fp8_attention_available()}
    scale_o = 1 / scale_v
    fp8 = torch.ops.ryla.attention_fp8(q8, k8, v8, scale_q, scale_k, scale_v, scale_o, scale)
    fp8_ms = bench_ms(lambda: torch.ops.ryla.attention_fp8(q8, k8, v8, scale_q, scale_k, scale_v, scale_o, scale))
    torch.cuda.synchronize()
    start = time.perf_counter()  # host time per call: 100 calls queue without waiting for the GPU
    for _ in range(100):
        torch.ops.ryla.attention_fp8(q8, k8, v8, scale_q, scale_k, scale_v, scale_o, scale)
    row["fp8_host_us_per_call"] = (time.perf_counter() - start) * 1e4
    torch.cuda.synchronize()
    fp8 = fp8.float() * scale_v.reshape(())
    row.update(fp8_ms=fp8_ms, fp8_tflops=flops / fp8_ms / 1e9, fp8_rel_l2_vs_fp32=rel_l2(fp8, reference),
               fp8_speedup=bf16_ms / fp8_ms)
    quantize = torch.compile(lambda q, k, v: (to_fp8(q, scale_q), to_fp8(k, scale_k),
                                              to_fp8(v, (v.abs().amax().float() / FP8_MAX).reshape(1, 1, 1, 1))))
    quantize(q, k, v)
    row["quantize_qkv_ms"] = bench_ms(lambda: quantize(q, k, v))
    results["attention"] = row
    print("attention", json.dumps(row), flush=True)


def gelu_quantize(results: dict) -> None:
    from ryla.speed.fp8 import FP8_MAX, quantize_rows
    from ryla.speed.kernels import TUNING_CONFIGS, _gelu_quantize_rows_kernel

    def inductor_version(x):  # what the model ran before the kernel: PyTorch ops, compiled
        x_fp8, scale = quantize_rows(F.gelu(x, approximate="tanh"))
        return x_fp8, scale[:, None]

    compiled = torch.compile(inductor_version)
    results["gelu_quantize"] = {}
    for rows in (4608, 4096):
        x = torch.randn(rows, 12288, device="cuda", dtype=torch.bfloat16) * 2
        expected_q, expected_s = compiled(x)
        got_q, got_s = torch.ops.ryla.gelu_quantize_rows(x, True)
        exact = F.gelu(x.float(), approximate="tanh")
        row = {"inductor_ms": bench_ms(lambda: compiled(x)),
               "triton_ms": bench_ms(lambda: torch.ops.ryla.gelu_quantize_rows(x, True)),  # tuned
               **{f"triton_{'chunked' if c.kwargs['TWO_PASS'] else 'one_pass'}_{c.kwargs['BLOCK']}_{c.num_warps}w_ms":
                  bench_ms(lambda: _gelu_quantize_rows_kernel[(rows,)](
                      x, got_q, got_s, x.stride(0), got_q.stride(0), N_COLS=12288, APPLY_GELU=True, FP8_LIMIT=FP8_MAX,
                      **c.kwargs, num_warps=c.num_warps)) for c in TUNING_CONFIGS},
               "scale_max_rel_diff": ((got_s - expected_s).abs() / expected_s).max().item(),
               "inductor_rel_l2": rel_l2(expected_q.float() * expected_s, exact),
               "triton_rel_l2": rel_l2(got_q.float() * got_s, exact),
               "bytes_moved_gb": rows * 12288 * 3 / 1e9}
        row["triton_tb_per_s"] = row["bytes_moved_gb"] / row["triton_ms"]
        results["gelu_quantize"][f"{rows}x12288"] = row
        print("gelu_quantize", rows, json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version()}
    try:
        import cudnn

        results["cudnn_frontend"] = cudnn.__version__
        results["cudnn_backend"] = cudnn.backend_version()
    except Exception as exc:  # reported, and the fp8 path falls back
        results["cudnn_frontend"] = f"unavailable: {exc}"
    with torch.inference_mode():
        for part in (gelu_quantize, attention):
            try:
                part(results)
            except Exception as exc:
                import traceback

                traceback.print_exc()
                results[part.__name__] = {"error": f"{type(exc).__name__}: {exc}"}
    (args.out / "fp8_kernels.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
