"""The kernels around exact mode's attention, measured alone on the GPU (full FLUX sizes).

  * one FLUX attention (fused projections, cuDNN attention, torch.compile'd), its inputs
    prepared by diffusers' processor (Inductor's kernels) vs ryla.speed.attention's one kernel,
    for a single block (4608 tokens) and a double block (512 text + 4096 image tokens);
  * cuDNN attention through PyTorch on [batch, heads, seq, dim] tensors vs transposed views of
    [batch, seq, heads, dim] ones, FlashAttention-2 beside them, and FlashAttention-3 where it
    is installed (bench/fetch_flash_attention_3.sh);
  * cuDNN bf16 attention through cudnn-frontend, every execution plan it offers, timed;
  * the VAE decoder's GroupNorm at 1024x1024: eager vs torch.compile'd;
  * a double block's text and image projections (same shapes, different weights): two cuBLAS
    products (512 and 4096 rows) vs one grouped product over the 4608 rows (torch._grouped_mm),
    beside one 4608-row product (what a single block gets).

    python bench/exact_kernels.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_floors import cuda_time as seconds_per_call, device_time_by_kernel, rel_l2  # noqa: E402

HEADS, HEAD_DIM, DIM = 24, 128, 3072
TEXT, IMAGE = 512, 4096


def cuda_time(fn, iters: int = 50) -> float:
    """Median milliseconds per call (CUDA events, after warm-up)."""
    return seconds_per_call(fn, iters) * 1000


def kernel_ms(fn, iters: int = 10) -> dict:
    """Device milliseconds per call of each kernel fn launches, by kernel name (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    _, kernels = device_time_by_kernel(lambda: [fn() for _ in range(iters)])
    return {name: seconds * 1000 / iters for name, (seconds, _) in kernels.items()}


def rotary(seq: int):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.zeros(seq, 3, device="cuda")
    ids[TEXT:, 1] = torch.arange(seq - TEXT, device="cuda") // 64
    ids[TEXT:, 2] = torch.arange(seq - TEXT, device="cuda") % 64
    return FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)


def attention_modules() -> dict:
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    from ryla.speed.attention import FusedInputsFluxAttnProcessor

    results = {}
    torch.manual_seed(0)
    for kind in ("single", "double"):
        double = kind == "double"
        attn = FluxAttention(query_dim=DIM, heads=HEADS, dim_head=HEAD_DIM, out_dim=DIM, bias=True,
                             added_kv_proj_dim=DIM if double else None, context_pre_only=False if double else None,
                             pre_only=not double, eps=1e-6).to("cuda", torch.bfloat16).eval()
        for name, p in attn.named_parameters():
            if "norm" in name:
                p.data.uniform_(0.5, 1.5)
        attn.fuse_projections()
        image = torch.randn(1, IMAGE if double else TEXT + IMAGE, DIM, device="cuda", dtype=torch.bfloat16)
        text = torch.randn(1, TEXT, DIM, device="cuda", dtype=torch.bfloat16) if double else None
        rope = rotary(TEXT + IMAGE)
        outputs, entry = {}, {}
        for label, processor in (("diffusers", FluxAttnProcessor()), ("fused_inputs", FusedInputsFluxAttnProcessor())):
            processor._attention_backend = "_native_cudnn"
            attn.set_processor(processor)
            torch._dynamo.reset()
            compiled = torch.compile(lambda: attn(image, text, image_rotary_emb=rope), fullgraph=True)
            with torch.inference_mode():
                outputs[label] = compiled()
                entry[f"{label}_ms"] = cuda_time(compiled)
        diff = [rel_l2(a, b) for a, b in zip(_tuple(outputs["fused_inputs"]), _tuple(outputs["diffusers"]))]
        entry["rel_l2"] = max(diff)
        results[kind] = entry
        print(kind, entry, flush=True)
    return results


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def graphed_time(launch, repeats: int = 20) -> float:
    """Milliseconds of GPU time per launch: `repeats` launches captured in one CUDA graph and
    replayed, so host launch overhead does not count (a lone eager launch of a small kernel
    is host-bound)."""
    launch()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            launch()
    return cuda_time(graph.replay, iters=20) / repeats


def attention_inputs_configs() -> dict:
    """ryla's attention-inputs kernel alone, per launch shape: a single block's projection
    (4608 rows) and a double block's (512 text + 4096 image rows, two launches)."""
    from ryla.speed.kernels import launch_attention_inputs

    rows = TEXT + IMAGE
    qkv = torch.randn(1, rows, 3 * DIM, device="cuda", dtype=torch.bfloat16)
    weights = [torch.rand(HEAD_DIM, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2)]
    cos, sin = rotary(rows)
    out = torch.empty(3, 1, rows, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    moved = 2 * qkv.numel() * qkv.element_size()  # read once, written once
    text, image = qkv[:, :TEXT].contiguous(), qkv[:, TEXT:].contiguous()
    results = {}
    # (rows, warps, all heads a program): one head a program was the first version's layout
    for block_rows, warps, all_heads in ((4, 1, False), (1, 1, True), (2, 1, True), (4, 1, True), (4, 2, True),
                                         (8, 1, True), (8, 2, True), (8, 4, True), (16, 4, True)):
        def single():
            launch_attention_inputs(qkv, *weights, cos, sin, out, 0, 1e-6, block_rows, warps, all_heads)

        def double():
            launch_attention_inputs(text, *weights, cos, sin, out, 0, 1e-6, block_rows, warps, all_heads)
            launch_attention_inputs(image, *weights, cos, sin, out, TEXT, 1e-6, block_rows, warps, all_heads)

        entry = {}
        for label, launch in (("single", single), ("double", double)):
            ms = graphed_time(launch)
            entry[label] = {"ms": ms, "tb_per_s": moved / ms / 1e9}
        results[f"{block_rows}x{warps}{' all heads' if all_heads else ''}"] = entry
    print("attention inputs", results, flush=True)
    return results


def single_block_value_in_place() -> dict:
    """A single block's attention inputs and FA3 attention, V copied by the kernel (before) vs
    read from the projection's output in place (ryla.speed.attention's value_in_place)."""
    from ryla.speed.attention import flash_attention_3_available
    from ryla.speed.kernels import launch_attention_inputs

    if not flash_attention_3_available():
        return {"error": "FlashAttention-3 not installed (bench/fetch_flash_attention_3.sh)"}
    rows = TEXT + IMAGE
    qkv = torch.randn(1, rows, 3 * DIM, device="cuda", dtype=torch.bfloat16)
    weights = [torch.rand(HEAD_DIM, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2)]
    cos, sin = rotary(rows)
    copied = torch.empty(3, 1, rows, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    only_qk = torch.empty(2, 1, rows, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    value = qkv[..., 2 * DIM:].unflatten(-1, (HEADS, HEAD_DIM))
    scale = HEAD_DIM ** -0.5
    outputs = {}

    def with_copy():
        launch_attention_inputs(qkv, *weights, cos, sin, copied, 0, 1e-6)
        outputs["copy"] = torch.ops.ryla.flash_attention_3(copied[0], copied[1], copied[2], scale)

    def in_place():
        launch_attention_inputs(qkv, *weights, cos, sin, only_qk, 0, 1e-6)
        outputs["in_place"] = torch.ops.ryla.flash_attention_3(only_qk[0], only_qk[1], value, scale)

    with torch.inference_mode():
        # not graph-captured: FA3 allocates its own scratch; 0.5 ms of GPU work per call keeps
        # the queue ahead of the host
        results = {label: {"ms": cuda_time(fn)} for label, fn in (("copy", with_copy), ("in_place", in_place))}
        with_copy()
        in_place()
        results["rel_l2_in_place_vs_copy"] = rel_l2(outputs["in_place"], outputs["copy"])
    print("single block value in place", results, flush=True)
    return results


def sdpa_layouts() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq = TEXT + IMAGE
    bshd = [torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    views = [x.transpose(1, 2) for x in bshd]
    contiguous = [x.contiguous() for x in views]
    flops = 4 * seq * seq * HEAD_DIM * HEADS
    results = {}
    for label, backend, inputs in (("cudnn_bhsd", SDPBackend.CUDNN_ATTENTION, contiguous),
                                   ("cudnn_bshd_views", SDPBackend.CUDNN_ATTENTION, views),
                                   ("flash2_bhsd", SDPBackend.FLASH_ATTENTION, contiguous)):
        with sdpa_kernel(backend), torch.inference_mode():
            ms = cuda_time(lambda: F.scaled_dot_product_attention(*inputs))
            out = F.scaled_dot_product_attention(*inputs)
        results[label] = {"ms": ms, "tflops": flops / ms / 1e9, "out_stride": list(out.stride())}
    from ryla.speed.attention import flash_attention_3_available

    if flash_attention_3_available():
        with torch.inference_mode():
            ms = cuda_time(lambda: torch.ops.ryla.flash_attention_3(*bshd, HEAD_DIM ** -0.5))
            out = torch.ops.ryla.flash_attention_3(*bshd, HEAD_DIM ** -0.5)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                reference = F.scaled_dot_product_attention(*contiguous).transpose(1, 2)
        results["flash3_bshd"] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_l2_vs_cudnn": rel_l2(out, reference)}
    else:
        results["flash3_bshd"] = {"error": "FlashAttention-3 not installed (bench/fetch_flash_attention_3.sh)"}
    print("sdpa", results, flush=True)
    return results


def cudnn_frontend_plans() -> dict:
    try:
        import cudnn
    except ImportError as exc:
        return {"error": str(exc)}
    seq = TEXT + IMAGE
    q, k, v = (torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    dims, strides = [1, HEADS, seq, HEAD_DIM], [seq * HEADS * HEAD_DIM, HEAD_DIM, HEADS * HEAD_DIM, 1]
    tq, tk, tv = (graph.tensor(name=n, dim=dims, stride=strides, data_type=cudnn.data_type.BFLOAT16) for n in "qkv")
    o, _ = graph.sdpa(q=tq, k=tk, v=tv, is_inference=True, attn_scale=HEAD_DIM ** -0.5, use_causal_mask=False)
    o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(cudnn.data_type.BFLOAT16)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    count = graph.get_execution_plan_count()
    workspace = torch.empty(max(graph.get_workspace_size(), 1 << 20), device="cuda", dtype=torch.uint8)
    pack = {tq: q, tk: k, tv: v, o: out}
    flops = 4 * seq * seq * HEAD_DIM * HEADS
    plans = []
    for index in range(count):
        try:
            ms = cuda_time(lambda: graph.execute_plan_at_index(pack, workspace, index, handle=handle), iters=30)
            plans.append({"index": index, "ms": ms, "tflops": flops / ms / 1e9})
        except Exception as exc:  # a plan that needs more workspace, say
            plans.append({"index": index, "error": str(exc)[:200]})
    default_ms = cuda_time(lambda: graph.execute(pack, workspace, handle=handle), iters=30)
    result = {"plans": plans, "default_ms": default_ms, "default_tflops": flops / default_ms / 1e9}
    print("cudnn-frontend", result, flush=True)
    return result


def vae_group_norm() -> dict:
    """GroupNorm + SiLU at the VAE decoder's shapes for 1024x1024: PyTorch's eager kernels vs
    ryla.speed.kernels.group_norm (what the compiled speed modes give the VAE)."""
    from ryla.speed.kernels import group_norm

    results = {}
    for channels, size in ((512, 128), (512, 256), (512, 512), (256, 1024), (128, 1024)):
        x = torch.randn(1, channels, size, size, device="cuda", dtype=torch.bfloat16)
        w, b = torch.randn(channels, device="cuda", dtype=torch.bfloat16), torch.randn(channels, device="cuda",
                                                                                       dtype=torch.bfloat16)
        with torch.inference_mode():
            eager = cuda_time(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-6)), iters=20)
            ryla = cuda_time(lambda: group_norm(x, 32, w, b, 1e-6, silu=True), iters=20)
            diff = rel_l2(group_norm(x, 32, w, b, 1e-6, silu=True), F.silu(F.group_norm(x, 32, w, b, 1e-6)))
            last = x.contiguous(memory_format=torch.channels_last)  # the channels-last path
            ryla_last = cuda_time(lambda: group_norm(last, 32, w, b, 1e-6, silu=True), iters=20)
            diff_last = rel_l2(group_norm(last, 32, w, b, 1e-6, silu=True), F.silu(F.group_norm(x, 32, w, b, 1e-6)))
            by_kernel = kernel_ms(lambda: group_norm(last, 32, w, b, 1e-6, silu=True))  # which of its three
        moved = 3 * x.numel() * x.element_size()  # read twice, written once
        results[f"{channels}x{size}x{size}"] = {"eager_ms": eager, "ryla_ms": ryla, "ryla_tb_per_s": moved / ryla / 1e9,
                                                "rel_l2": diff, "ryla_channels_last_ms": ryla_last,
                                                "ryla_channels_last_tb_per_s": moved / ryla_last / 1e9,
                                                "rel_l2_channels_last": diff_last,
                                                "channels_last_kernels_ms": by_kernel}
    print("group_norm", results, flush=True)
    return results


def double_block_gemms() -> dict:
    """The double blocks' text-stream products have 512 rows: 3 x 16 output tiles for a
    3072-wide layer, on 132 multiprocessors. Timed: the text and image products as two
    launches, as one grouped launch, and one 4608-row product with one weight (the floor)."""
    results = {}
    torch.manual_seed(0)
    offsets = torch.tensor([TEXT, TEXT + IMAGE], device="cuda", dtype=torch.int32)
    for name, k, n in (("qkv", DIM, 3 * DIM), ("out", DIM, DIM), ("mlp_up", DIM, 4 * DIM), ("mlp_down", 4 * DIM, DIM)):
        x = torch.randn(TEXT + IMAGE, k, device="cuda", dtype=torch.bfloat16)
        weights = torch.randn(2, n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        bias = torch.randn(2, n, device="cuda", dtype=torch.bfloat16)
        text, image = x[:TEXT], x[TEXT:]

        def separate():
            return torch.cat([F.linear(text, weights[0], bias[0]), F.linear(image, weights[1], bias[1])])

        with torch.inference_mode():
            row = {"text_ms": cuda_time(lambda: F.linear(text, weights[0], bias[0])),
                   "image_ms": cuda_time(lambda: F.linear(image, weights[1], bias[1])),
                   "one_4608_rows_ms": cuda_time(lambda: F.linear(x, weights[1], bias[1]))}
            try:
                grouped = lambda: torch._grouped_mm(x, weights.transpose(-2, -1), offs=offsets)  # noqa: E731
                row["grouped_ms"] = cuda_time(grouped)
                row["grouped_rel_l2"] = rel_l2(grouped() + torch.repeat_interleave(
                    bias, torch.tensor([TEXT, IMAGE], device="cuda"), dim=0), separate())
            except Exception as exc:  # noqa: BLE001 -- reported, not fatal
                row["grouped_error"] = f"{type(exc).__name__}: {exc}"[:300]
        flops = 2 * (TEXT + IMAGE) * k * n
        for key in [key for key in row if key.endswith("_ms")]:
            rows = {"text_ms": TEXT, "image_ms": IMAGE}.get(key, TEXT + IMAGE)
            row[key.replace("_ms", "_tflops")] = flops * rows / (TEXT + IMAGE) / row[key] / 1e9
        results[name] = row
    print("double_block_gemms", json.dumps(results), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--only", default="", help="comma list of parts to run (default: all)")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version()}
    for name, fn in (("attention_module_ms", attention_modules), ("attention_inputs_kernel", attention_inputs_configs),
                     ("sdpa", sdpa_layouts), ("single_block_value_in_place", single_block_value_in_place),
                     ("cudnn_frontend_bf16", cudnn_frontend_plans), ("vae_group_norm", vae_group_norm),
                     ("double_block_gemms", double_block_gemms)):
        if args.only and name not in args.only.split(","):
            continue
        try:
            results[name] = fn()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exact_kernels.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
