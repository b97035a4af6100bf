"""Do the LoRA kernels compute the right weights on a real GPU? (CPU CI runs them in Triton's
interpreter only.) Full-size FLUX.1-dev layer shapes, rank-64 factors from fp16:

  e4m3 rounding   ryla.speed.kernels.add_round_to_e4m3_grid (one LoRA) and
                  lora_onto_e4m3_grid (two stacked) against the float64 sum: every weight on the
                  e4m3 grid, at most one grid step from the sum, the rounding unbiased (mean
                  error in grid steps near 0), the same bits from the same seed
  WeightPatcher   through ryla.flux.lora on a module whose layers hold fp8 values: one and two
                  LoRAs, switching back and forth gives the same bits, restore the original bits
  fp8 rows        fast mode's storage (fp8, a scale per row) patched through WeightPatcher
                  (ryla.flux.lora.patch_fp8_rows: a bf16 product, then
                  ryla.speed.kernels.add_quantize_rows_grouped), one LoRA and two stacked,
                  against quantize_rows of the float64 sum; switching back and restoring give
                  the same bits
  fp8 GEMM bias   ryla.speed.fp8.Float8Linear with a bias on 8 rows (InfuseNet's identity tokens)
                  against its dequantised weights

    python bench/lora_kernels_check.py --out bench/results
    TRITON_INTERPRET=1 python bench/lora_kernels_check.py --tiny   # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def grid_steps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of the e4m3 spacing at exact's magnitude."""
    exponent = (torch.frexp(exact.abs()).exponent - 1).clamp(min=-6)
    return (got.double() - exact) / torch.ldexp(torch.ones_like(exact), exponent - 3)


def rounding_report(got: torch.Tensor, exact: torch.Tensor) -> dict:
    steps = grid_steps(got, exact)
    return {"on_e4m3_grid": bool(torch.equal(got, got.to(torch.float8_e4m3fn).to(got.dtype))),
            "max_abs_steps": steps.abs().max().item(), "mean_steps": steps.mean().item()}


def fp8_rows_report(weight: torch.Tensor, factors: list) -> dict:
    """Fast mode's storage (ryla.speed.fp8.Float8Linear: fp8 with a scale per row) patched by
    WeightPatcher, one LoRA and two stacked (one bf16 product of their factors side by side),
    against quantize_rows of the float64 sum: the share of fp8 values that differ, the
    largest relative difference of a row scale, the largest error in units of the row's scale
    (an fp8 value's spacing is at most 32 of them); then switching back and restoring."""
    from ryla.flux.lora import WeightPatcher
    from ryla.speed import fp8

    rows, cols = weight.shape
    linear = torch.nn.Linear(cols, rows, bias=False, device=weight.device, dtype=torch.bfloat16)
    linear.weight.data.copy_(weight)
    module = torch.nn.ModuleDict({"a": fp8.Float8Linear(linear)})
    original_fp8, original_scale = module["a"].weight_fp8.clone(), module["a"].weight_scale.clone()
    dequantized = original_fp8.double() * original_scale.double()[:, None]
    patcher = WeightPatcher(module)
    report = {}
    states = {}
    for name, count in (("one", 1), ("two", 2)):
        patcher.apply((name,), [({"a": term}, 1.0) for term in factors[:count]])
        exact = dequantized + sum(scale * (up.double() @ down.double()) for down, up, scale in factors[:count])
        reference, reference_scale = fp8.quantize_rows(exact.float())
        got, got_scale = module["a"].weight_fp8, module["a"].weight_scale
        error = (got.double() * got_scale.double()[:, None] - exact).abs() / got_scale.double()[:, None]
        report[name] = {"share_differing": (got.view(torch.uint8) != reference.view(torch.uint8)).double().mean().item(),
                        "max_scale_relative_difference": ((got_scale - reference_scale).abs() / reference_scale).max().item(),
                        "max_error_in_row_scales": error.max().item()}
        states[name] = (got.clone(), got_scale.clone())
    patcher.apply(("one",), [({"a": factors[0]}, 1.0)])
    report["same_bits_after_switching"] = bool(torch.equal(module["a"].weight_fp8.view(torch.uint8),
                                                           states["one"][0].view(torch.uint8))
                                               and torch.equal(module["a"].weight_scale, states["one"][1]))
    patcher.restore()
    report["restored_exactly"] = bool(torch.equal(module["a"].weight_fp8.view(torch.uint8), original_fp8.view(torch.uint8))
                                      and torch.equal(module["a"].weight_scale, original_scale))
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (Triton's interpreter)")
    args = parser.parse_args()
    from ryla.flux.lora import E4M3_VALUED_LAYERS, WeightPatcher
    from ryla.speed import fp8
    from ryla.speed.kernels import add_round_to_e4m3_grid, lora_onto_e4m3_grid

    device = torch.device("cpu" if args.tiny else "cuda")
    generator = torch.Generator(device).manual_seed(0)
    rows, cols, rank = (96, 128, 16) if args.tiny else (3072, 12288, 64)
    original = (torch.randn(rows, cols, device=device, generator=generator) * 0.02).to(torch.float8_e4m3fn)
    factors = [((torch.randn(rank, cols, device=device, generator=generator) * 0.01).half().float(),
                (torch.randn(rows, rank, device=device, generator=generator) * 0.01).half().float(), scale)
               for scale in (0.8, -1.1)]
    report: dict = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                    "shape": [rows, cols], "rank": rank}

    one = original.double() + factors[0][2] * (factors[0][1].double() @ factors[0][0].double())
    out = torch.empty(rows, cols, device=device, dtype=torch.bfloat16)
    add_round_to_e4m3_grid(original, factors[0][1] @ factors[0][0], factors[0][2], 7, out)
    again = torch.empty_like(out)
    add_round_to_e4m3_grid(original, factors[0][1] @ factors[0][0], factors[0][2], 7, again)
    report["one_lora"] = {**rounding_report(out, one), "same_bits_again": bool(torch.equal(out, again))}

    two = one + factors[1][2] * (factors[1][1].double() @ factors[1][0].double())
    lora_onto_e4m3_grid(original, factors, 7, out)
    lora_onto_e4m3_grid(original, factors, 7, again)
    report["two_stacked"] = {**rounding_report(out, two), "same_bits_again": bool(torch.equal(out, again))}

    module = torch.nn.ModuleDict({"a": torch.nn.Linear(cols, rows, bias=False)}).to(device, torch.bfloat16)
    module["a"].weight.data.copy_(original)
    setattr(module, E4M3_VALUED_LAYERS, frozenset({"a"}))
    patcher = WeightPatcher(module)
    lora = lambda index: {"a": factors[index]}  # noqa: E731  (down, up, scale)
    patcher.apply(("1",), [(lora(0), 1.0)])
    first = module["a"].weight.clone()
    patcher.apply(("1+2",), [(lora(0), 1.0), (lora(1), 1.0)])
    stacked = module["a"].weight.clone()
    patcher.apply(("1",), [(lora(0), 1.0)])
    back = torch.equal(module["a"].weight, first)
    patcher.apply(("1+2",), [(lora(0), 1.0), (lora(1), 1.0)])
    back_stacked = torch.equal(module["a"].weight, stacked)
    patcher.restore()
    report["weight_patcher"] = {"one": rounding_report(first, one), "two": rounding_report(stacked, two),
                                "same_bits_after_switching": bool(back and back_stacked),
                                "restored_exactly": bool(torch.equal(module["a"].weight.float(), original.float()))}

    fp8._load_row_quantization_kernel()
    report["fp8_rows"] = fp8_rows_report(original.to(torch.bfloat16), factors)
    linear = torch.nn.Linear(cols, rows, device=device, dtype=torch.bfloat16)
    layer = fp8.Float8Linear(linear)
    x = torch.randn(8, cols, device=device, dtype=torch.bfloat16)
    got = layer(x).float()
    expected = torch.nn.functional.linear(x.float(), layer.dequantized(), linear.bias.float())
    report["fp8_linear_8_rows_with_bias"] = {
        "relative_error": ((got - expected).norm() / expected.norm()).item()}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lora_kernels_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
