"""How fast a LoRA switch can rewrite FLUX.1-dev's weights, by strategy, on one GPU.

The layers are FLUX.1-dev's 494 block linears at full size (bf16, the exact mode's storage;
q, k and v as rows of the fused to_qkv layers, as the speed layer fuses them), each with a
rank-64 LoRA whose factors come from fp16 (as published LoRA files hold them) kept on the GPU
in float32. One switch makes every layer original + scale * up @ down. Strategies:

  mm_add    ryla's WeightPatcher now: delta = up @ down (TF32), then torch.add(original,
            delta, alpha=scale, out=weight): float32 sum, one rounding, one pass, no restore
  split_addmm  tried, not taken: the factors split into bf16 high and low parts, one bf16
            GEMM of 4x the rank added to the original by addmm. Only 15 % faster than mm_add on
            the H200, and 4 % of the weights came out different from the float32 reference
            (addmm does not add in float32 and round once), where mm_add's differ in 8 per
            million (float32 summation order)
  current   ryla's WeightPatcher until now: restore every touched layer from its original,
            then per layer delta = up @ down in float32, weight = bf16(weight.float() + delta)
  fp32_acc  per layer acc = original.float(); acc.addmm_(up, down) (TF32: exact for factors
            that came from 16-bit files); weight.copy_(acc): one rounding, no restore pass
  chunked   fp32_acc over row chunks of at most 8 M elements (the accumulator stays in L2)
  bf16_mm   weight.copy_(original); weight.addmm_(up.bf16, down.bf16): the product of bf16
            factors, accumulated in fp32, rounded once (factors lose fp16's 3 extra bits)
  e4m3_grid ryla's WeightPatcher for weights holding fp8 values (an fp8 checkpoint where
            ComfyUI keeps fp8 storage): originals kept in fp8, delta = up @ down (TF32), then one
            Triton kernel adds it and rounds stochastically onto the e4m3 grid into the bf16
            weight (ryla.speed.kernels.add_round_to_e4m3_grid)
  e4m3_fused the one-pass kernel (ryla.speed.kernels.lora_onto_e4m3_grid): the LoRAs' sum
            computed tile by tile with tl.dot, never written to memory; ryla uses it for
            stacked LoRAs only (e4m3_fused_stacked vs e4m3_grid_stacked: two LoRAs on every
            layer, the products first by mm and addmm, then the rounding kernel).
            fp8_fused and fp8_fused_stacked in lora_patch.json: the same for fast mode's fp8 rows,
            measured on 2026-12-02, slower, and removed (git history has it)
  fp8_current, fp8_acc  the same two ways for the fast mode's fp8 rows (dequantise, add,
            quantise again with new row scales); fp8_kernel: the float32 product (TF32) then
            one Triton kernel a layer (ryla.speed.kernels.dequantize_add_quantize_rows), ryla's
            for one LoRA until fp8_grouped; fp8_kernel_bf16_stacked: ryla's for stacked LoRAs until
            then, one bf16 GEMM of their factors side by side (scaled ups), the product written
            once; fp8_kernel_side_by_side_stacked: the same in float32 (TF32); fp8_kernel_bf16:
            one LoRA's product in bf16. Under --profile these turned out bound by the host
            issuing their ~1,000-2,000 launches (bf16: 26 ms of GPU work in a 72 ms switch).
            fp8_tiled* in lora_patch.json: tried on 2026-12-02 and removed (git history has it):
            two kernels over 2-D tiles that compute the product with tl.dot (the first for the
            row maxima, the second to write), slower or no faster than the product first
  fp8_grouped, fp8_grouped_stacked  ryla's for a set of LoRAs met the first time
            (ryla.flux.lora.patch_fp8_rows): layers of one shape and one set of LoRA ranks and
            scales together, their factors stacked, one batched bf16 GEMM of the side-by-side
            factors and one launch of the row kernel over all of them
            (ryla.speed.kernels.add_quantize_rows_grouped), in launches of at most
            FP8_ROWS_GROUP_BYTES of products
  fp8_planned, fp8_planned_stacked  ryla's for a set met before: the same, from the kept
            SwitchPlan (factors already stacked, scaled and in bf16, the layers' address tables
            on the GPU): a batched GEMM and a row-kernel launch a group, nothing else
  fp8_kernel_BLOCKxWARPS  (--row-kernel-configs) fp8_kernel with other settings of the row
            kernel: the chunk width of a row and the warps of a program

Use --profile for GPU time by kernel against each switch's wall time.

Reported: median seconds per switch, and how far the weights are from the reference
bf16(original + scale * up @ down computed in float64).

    python bench/lora_patch.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HIDDEN, MLP = 3072, 12288


def flux_layers() -> list[tuple[str, int, int, int]]:
    """(name, fused rows of the storage layer, out rows patched, in) for every block linear."""
    layers = []
    for i in range(19):
        b = f"transformer_blocks.{i}"
        for leaf in ("to_q", "to_k", "to_v"):
            layers.append((f"{b}.attn.to_qkv:{leaf}", 3 * HIDDEN, HIDDEN, HIDDEN))
        for leaf in ("add_q_proj", "add_k_proj", "add_v_proj"):
            layers.append((f"{b}.attn.to_added_qkv:{leaf}", 3 * HIDDEN, HIDDEN, HIDDEN))
        layers += [(f"{b}.attn.to_out.0", HIDDEN, HIDDEN, HIDDEN), (f"{b}.attn.to_add_out", HIDDEN, HIDDEN, HIDDEN),
                   (f"{b}.ff.net.0.proj", MLP, MLP, HIDDEN), (f"{b}.ff.net.2", HIDDEN, HIDDEN, MLP),
                   (f"{b}.ff_context.net.0.proj", MLP, MLP, HIDDEN), (f"{b}.ff_context.net.2", HIDDEN, HIDDEN, MLP),
                   (f"{b}.norm1.linear", 6 * HIDDEN, 6 * HIDDEN, HIDDEN),
                   (f"{b}.norm1_context.linear", 6 * HIDDEN, 6 * HIDDEN, HIDDEN)]
    for i in range(38):
        b = f"single_transformer_blocks.{i}"
        for leaf in ("to_q", "to_k", "to_v"):
            layers.append((f"{b}.attn.to_qkv:{leaf}", 3 * HIDDEN, HIDDEN, HIDDEN))
        layers += [(f"{b}.proj_mlp", MLP, MLP, HIDDEN), (f"{b}.proj_out", HIDDEN, HIDDEN, HIDDEN + MLP),
                   (f"{b}.norm.linear", 3 * HIDDEN, 3 * HIDDEN, HIDDEN)]
    return layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated strategies to run (default: all)")
    parser.add_argument("--row-kernel-configs", default="",
                        help="BLOCKxWARPS settings of fast mode's row kernel to time as fp8_kernel_BLOCKxWARPS "
                             "and fp8_grouped(_stacked)_BLOCKxWARPS, comma-separated")
    parser.add_argument("--profile", action="store_true",
                        help="one more switch per strategy under torch.profiler: GPU time by kernel (top 8) and "
                             "all kernels' sum against the switch's wall time")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    layers = flux_layers()
    storage: dict[str, torch.Tensor] = {}
    targets = []
    for name, fused_rows, rows, inputs in layers:
        store_name, _, leaf = name.partition(":")
        if store_name not in storage:
            storage[store_name] = (torch.randn(fused_rows, inputs, device=device) * 0.02).to(torch.bfloat16)
        index = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj").index(leaf) % 3 if leaf else 0
        row_slice = slice(index * rows, (index + 1) * rows) if leaf else slice(None)
        down = (torch.randn(args.rank, inputs, device=device) * 0.01).half().float()
        up = (torch.randn(rows, args.rank, device=device) * 0.01).half().float()
        targets.append((store_name, row_slice, up, down, 0.8))
    originals = {(n, s.start): storage[n][s].clone() for n, s, *_ in targets}
    params = sum(t.numel() for t in storage.values())
    print(f"{len(targets)} layers, {params / 1e9:.2f} B parameters", flush=True)

    def current():
        for n, s, *_ in targets:  # restore pass
            storage[n][s] = originals[(n, s.start)]
        for n, s, up, down, scale in targets:
            w = storage[n]
            delta = (up @ down) * scale
            w[s] = (w[s].float() + delta).to(w.dtype)

    def fp32_acc():
        torch.backends.cuda.matmul.allow_tf32 = True
        for n, s, up, down, scale in targets:
            acc = originals[(n, s.start)].float()
            acc.addmm_(up, down, alpha=scale)
            storage[n][s].copy_(acc)
        torch.backends.cuda.matmul.allow_tf32 = False

    def chunked(limit=8 << 20):
        torch.backends.cuda.matmul.allow_tf32 = True
        for n, s, up, down, scale in targets:
            original = originals[(n, s.start)]
            target = storage[n][s]
            step = max(1, limit // original.shape[1])
            for start in range(0, original.shape[0], step):
                acc = original[start:start + step].float()
                acc.addmm_(up[start:start + step], down, alpha=scale)
                target[start:start + step].copy_(acc)
        torch.backends.cuda.matmul.allow_tf32 = False

    def split_addmm():  # tried and not taken: see the docstring
        matmul = torch.backends.cuda.matmul
        matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = True, False
        for n, s, up, down, scale in targets:
            up_hi, down_hi = up.to(torch.bfloat16), down.to(torch.bfloat16)
            up_lo, down_lo = (up - up_hi.float()).to(torch.bfloat16), (down - down_hi.float()).to(torch.bfloat16)
            u = torch.cat([up_hi, up_hi, up_lo, up_lo], dim=1)
            d = torch.cat([down_hi, down_lo, down_hi, down_lo], dim=0)
            torch.addmm(originals[(n, s.start)], u, d, alpha=scale, out=storage[n][s])
        matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = False, True

    def mm_add():  # ryla's WeightPatcher on CPUs, and on CUDA before split_addmm
        torch.backends.cuda.matmul.allow_tf32 = True
        for n, s, up, down, scale in targets:
            delta = torch.mm(up, down)
            torch.add(originals[(n, s.start)], delta, alpha=scale, out=storage[n][s])
        torch.backends.cuda.matmul.allow_tf32 = False

    def bf16_mm():
        for n, s, up, down, scale in targets:
            w = storage[n][s]
            w.copy_(originals[(n, s.start)])
            w.addmm_(up.to(torch.bfloat16), down.to(torch.bfloat16), alpha=scale)

    # fast mode's storage: fp8 weights with one scale per row (ryla.speed.fp8.Float8Linear)
    from ryla.speed.fp8 import quantize_rows

    fp8_originals = {key: quantize_rows(value) for key, value in originals.items()}
    fp8_storage = {key: (w.clone(), sc.clone()) for key, (w, sc) in fp8_originals.items()}

    def fp8_current():
        for key, (w, sc) in fp8_originals.items():  # restore pass
            fp8_storage[key][0].copy_(w)
            fp8_storage[key][1].copy_(sc)
        for n, s, up, down, scale in targets:
            w, sc = fp8_storage[(n, s.start)]
            delta = (up @ down) * scale
            new_w, new_sc = quantize_rows(w.float() * sc[:, None] + delta)
            w.copy_(new_w)
            sc.copy_(new_sc)

    def fp8_acc():
        torch.backends.cuda.matmul.allow_tf32 = True
        for n, s, up, down, scale in targets:
            w0, sc0 = fp8_originals[(n, s.start)]
            acc = w0.float() * sc0[:, None]
            acc.addmm_(up, down, alpha=scale)
            new_w, new_sc = quantize_rows(acc)
            w, sc = fp8_storage[(n, s.start)]
            w.copy_(new_w)
            sc.copy_(new_sc)
        torch.backends.cuda.matmul.allow_tf32 = False

    def fp8_kernel(block: int = 2048, warps: int = 4):  # ryla's until fp8_grouped: the product, then one kernel
        from ryla.speed.kernels import dequantize_add_quantize_rows

        torch.backends.cuda.matmul.allow_tf32 = True
        for n, s, up, down, scale in targets:
            w0, sc0 = fp8_originals[(n, s.start)]
            w, sc = fp8_storage[(n, s.start)]
            dequantize_add_quantize_rows(w0, sc0, torch.mm(up, down), scale, w, sc, block=block, num_warps=warps)
        torch.backends.cuda.matmul.allow_tf32 = False

    def with_row_kernel(block: int, warps: int, fn):
        """fn with the row kernel's settings changed for the call (ryla.speed.kernels' module
        settings, which patch_fp8_rows uses)."""
        from ryla.speed import kernels

        saved = kernels.ROW_KERNEL_BLOCK, kernels.ROW_KERNEL_WARPS
        kernels.ROW_KERNEL_BLOCK, kernels.ROW_KERNEL_WARPS = block, warps
        try:
            fn()
        finally:
            kernels.ROW_KERNEL_BLOCK, kernels.ROW_KERNEL_WARPS = saved

    row_kernel_configs = {}  # the row kernel's chunk width and warps
    for spec in filter(None, args.row_kernel_configs.split(",")):
        block, warps = (int(v) for v in spec.split("x"))
        row_kernel_configs[f"fp8_kernel_{spec}"] = lambda block=block, warps=warps: fp8_kernel(block, warps)
        row_kernel_configs[f"fp8_grouped_{spec}"] = lambda block=block, warps=warps: with_row_kernel(
            block, warps, fp8_grouped)
        row_kernel_configs[f"fp8_grouped_stacked_{spec}"] = lambda block=block, warps=warps: with_row_kernel(
            block, warps, lambda: fp8_grouped(True))

    e4m3_originals = {key: value.to(torch.float8_e4m3fn) for key, value in originals.items()}

    def e4m3_grid():
        from ryla.flux.lora import layer_seed
        from ryla.speed.kernels import add_round_to_e4m3_grid

        torch.backends.cuda.matmul.allow_tf32 = True
        for n, s, up, down, scale in targets:
            add_round_to_e4m3_grid(e4m3_originals[(n, s.start)], torch.mm(up, down), scale, layer_seed(f"{n}:{s.start}"),
                                   storage[n][s])
        torch.backends.cuda.matmul.allow_tf32 = False

    second = [((torch.randn(args.rank, down.shape[1], device=device) * 0.01).half().float(),
               (torch.randn(up.shape[0], args.rank, device=device) * 0.01).half().float())
              for _, _, up, down, _ in targets]

    def e4m3_fused(stacked=False):
        from ryla.flux.lora import layer_seed
        from ryla.speed.kernels import lora_onto_e4m3_grid

        for (n, s, up, down, scale), (down2, up2) in zip(targets, second):
            terms = [(down, up, scale)] + ([(down2, up2, 0.8)] if stacked else [])
            lora_onto_e4m3_grid(e4m3_originals[(n, s.start)], terms, layer_seed(f"{n}:{s.start}"), storage[n][s])

    def e4m3_grid_stacked():
        from ryla.flux.lora import layer_seed
        from ryla.speed.kernels import add_round_to_e4m3_grid

        torch.backends.cuda.matmul.allow_tf32 = True
        for (n, s, up, down, scale), (down2, up2) in zip(targets, second):
            delta = torch.mm(up, down).mul_(scale)
            delta.addmm_(up2, down2, alpha=0.8)
            add_round_to_e4m3_grid(e4m3_originals[(n, s.start)], delta, 1.0, layer_seed(f"{n}:{s.start}"),
                                   storage[n][s])
        torch.backends.cuda.matmul.allow_tf32 = False

    def fp8_kernel_stacked():
        from ryla.speed.kernels import dequantize_add_quantize_rows

        torch.backends.cuda.matmul.allow_tf32 = True
        for (n, s, up, down, scale), (down2, up2) in zip(targets, second):
            w0, sc0 = fp8_originals[(n, s.start)]
            w, sc = fp8_storage[(n, s.start)]
            delta = torch.mm(up, down).mul_(scale)
            delta.addmm_(up2, down2, alpha=0.8)
            dequantize_add_quantize_rows(w0, sc0, delta, 1.0, w, sc)
        torch.backends.cuda.matmul.allow_tf32 = False

    def fp8_kernel_bf16(stacked=False):  # the product written in bf16: ryla's for stacked LoRAs only
        from ryla.speed.kernels import dequantize_add_quantize_rows

        for (n, s, up, down, scale), (down2, up2) in zip(targets, second):
            w0, sc0 = fp8_originals[(n, s.start)]
            w, sc = fp8_storage[(n, s.start)]
            if stacked:  # the product of the side-by-side factors, written in bf16
                delta = torch.mm(torch.cat([up * scale, up2 * 0.8], dim=1).to(torch.bfloat16),
                                 torch.cat([down, down2]).to(torch.bfloat16))
                factor = 1.0
            else:
                delta, factor = torch.mm(up.to(torch.bfloat16), down.to(torch.bfloat16)), scale
            dequantize_add_quantize_rows(w0, sc0, delta, factor, w, sc)

    def fp8_kernel_side_by_side_stacked():  # tried: the side-by-side product in float32 (TF32)
        from ryla.speed.kernels import dequantize_add_quantize_rows

        torch.backends.cuda.matmul.allow_tf32 = True
        for (n, s, up, down, scale), (down2, up2) in zip(targets, second):
            w0, sc0 = fp8_originals[(n, s.start)]
            w, sc = fp8_storage[(n, s.start)]
            delta = torch.mm(torch.cat([up * scale, up2 * 0.8], dim=1), torch.cat([down, down2]))
            dequantize_add_quantize_rows(w0, sc0, delta, 1.0, w, sc)
        torch.backends.cuda.matmul.allow_tf32 = False

    def fp8_jobs(stacked: bool) -> list:
        """The layers as ryla.flux.lora.plan_fp8_rows takes them: (original, storage, terms)."""
        jobs = []
        for (n, s, up, down, scale), (down2, up2) in zip(targets, second):
            terms = [(down, up, scale)] + ([(down2, up2, 0.8)] if stacked else [])
            jobs.append((fp8_originals[(n, s.start)], fp8_storage[(n, s.start)], terms))
        return jobs

    def fp8_grouped(stacked: bool = False):  # ryla's for a set of LoRAs met the first time
        from ryla.flux.lora import patch_fp8_rows

        patch_fp8_rows(fp8_jobs(stacked))

    planned = {}

    def fp8_planned(stacked: bool = False):  # ryla's now for a set of LoRAs met before: a kept SwitchPlan
        from ryla.flux.lora import plan_fp8_rows, run_fp8_rows

        if stacked not in planned:  # made by the first (untimed) call, as by a set's first request
            planned[stacked] = plan_fp8_rows(fp8_jobs(stacked))
        run_fp8_rows(planned[stacked])

    def differences_from_reference() -> dict:
        """Against bf16(original + scale * up @ down) computed in float64: the share of
        weights that differ. (Runs before 2026-12-01 also wrote a max_ulps figure whose formula
        blew up near zero; it meant nothing.)"""
        differ = total = 0
        for n, s, up, down, scale in targets[::25]:
            exact = originals[(n, s.start)].double() + scale * (up.double() @ down.double())
            got = storage[n][s]
            differ += (got != exact.to(torch.bfloat16)).sum().item()
            total += got.numel()
        return {"share_differing": differ / total}

    def fp8_differences_from_reference(stacked: bool) -> dict:
        """Fast mode's rows against quantize_rows of the sum computed in float64 (the second
        LoRA too where `stacked`): the share of fp8 values that differ (a product rounded
        before the sum moves some values across a rounding boundary) and the largest relative
        difference of a row scale."""
        differ = total = 0
        worst_scale = 0.0
        for (n, s, up, down, scale), (down2, up2) in list(zip(targets, second))[::25]:
            w0, sc0 = fp8_originals[(n, s.start)]
            exact = w0.double() * sc0.double()[:, None] + scale * (up.double() @ down.double())
            if stacked:
                exact += 0.8 * (up2.double() @ down2.double())
            ref, ref_scale = quantize_rows(exact.float())
            w, sc = fp8_storage[(n, s.start)]
            differ += (w.view(torch.uint8) != ref.view(torch.uint8)).sum().item()
            total += w.numel()
            worst_scale = max(worst_scale, ((sc - ref_scale).abs() / ref_scale).max().item())
        return {"share_differing": differ / total, "max_scale_relative_difference": worst_scale}

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": len(targets),
               "rank": args.rank, "parameters": params, "strategies": {}}
    for name, fn in (("current", current), ("split_addmm", split_addmm), ("mm_add", mm_add), ("fp32_acc", fp32_acc), ("chunked", chunked),
                     ("bf16_mm", bf16_mm), ("fp8_current", fp8_current), ("fp8_acc", fp8_acc),
                     ("fp8_kernel", fp8_kernel), ("e4m3_grid", e4m3_grid), ("e4m3_fused", e4m3_fused),
                     ("e4m3_grid_stacked", e4m3_grid_stacked),
                     ("e4m3_fused_stacked", lambda: e4m3_fused(True)), ("fp8_kernel_stacked", fp8_kernel_stacked),
                     ("fp8_kernel_bf16", fp8_kernel_bf16), ("fp8_kernel_bf16_stacked", lambda: fp8_kernel_bf16(True)),
                     ("fp8_kernel_side_by_side_stacked", fp8_kernel_side_by_side_stacked),
                     ("fp8_grouped", fp8_grouped), ("fp8_grouped_stacked", lambda: fp8_grouped(True)),
                     ("fp8_planned", fp8_planned), ("fp8_planned_stacked", lambda: fp8_planned(True)),
                     *row_kernel_configs.items()):
        if args.only and name not in args.only.split(","):
            continue
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results["strategies"][name] = {"median_s": statistics.median(times), "runs_s": times,
                                       "vs_float64_reference": None if name.startswith(("fp8", "e4m3"))
                                       else differences_from_reference(),
                                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        if args.profile:
            results["strategies"][name]["profile"] = profile_switch(fn)
        if name.startswith(("fp8_kernel", "fp8_grouped", "fp8_planned")):
            results["strategies"][name]["vs_reference"] = fp8_differences_from_reference("stacked" in name)
        if name.startswith("e4m3"):  # every weight on the grid, within one grid step of the exact sum
            on_grid = all(torch.equal(storage[n][s], storage[n][s].to(torch.float8_e4m3fn).to(torch.bfloat16))
                          for n, s, *_ in targets[::25])
            results["strategies"][name]["all_on_e4m3_grid"] = on_grid
        print(name, json.dumps(results["strategies"][name]), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lora_patch.json").write_text(json.dumps(results, indent=2) + "\n")


def profile_switch(fn) -> dict:
    """One switch under torch.profiler (identity_speed.profile_run: wall ms, the sum of its GPU
    kernels' ms), with the eight kernels that took most, as [calls, ms]."""
    from identity_speed import profile_run

    profiled = profile_run(fn)
    profiled["kernels"] = dict(sorted(profiled["kernels"].items(), key=lambda item: -item[1][1])[:8])
    return profiled


if __name__ == "__main__":
    main()
