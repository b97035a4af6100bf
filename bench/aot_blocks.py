"""Can the transformer's blocks be served from ahead-of-time compiled packages, and what would it
save at start? A feasibility measurement for the cold start (#27), not a speed mode.

A warm `ryla serve` start spends 2.1 s compiling from the cache (Dynamo traces every block
type again) after importing torch.compile's stack (bench/results/README.md). This script:

1. builds the transformer (full-size random weights on a GPU, the tiny architecture with
   --tiny on a CPU), applies the speed mode without torch.compile, and records the inputs of
   each repeated block type's first call at 1024x1024 (64x64 with --tiny);
2. exports each block type with torch.export and compiles it with AOTInductor into a package
   whose weights stay outside the shared library (aot_inductor.package_constants_in_so off);
3. in a fresh process: imports torch alone, opens one package loader per block of the model
   (torch._C._aoti.AOTIModelPackageLoader) after registering the speed mode's Python custom
   ops, which the packages call back, and records the time and which of torch.compile's
   modules were imported by then; then rebuilds the same weights, hands each loader its block's
   weights as user-managed constants (the loader uses the tensors in place, so a LoRA patch
   written into them is seen), runs each block type's recorded inputs, and compares with the
   eager block before and after patching one weight in place.

    python bench/aot_blocks.py --out bench/results --work /tmp/aot-blocks --speed exact
    python bench/aot_blocks.py --tiny --out /tmp/a --work /tmp/a    # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

COMPILE_STACK = ("torch._dynamo", "torch._inductor", "torch._inductor.compile_fx", "torch._functorch.aot_autograd",
                 "sympy", "networkx", "triton")


class PositionalBlock(torch.nn.Module):
    """A FLUX block with plain tensor inputs (hidden states, text states, temb, rope cos and
    sin), the form an exported program and its package loader take."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, encoder_hidden_states, temb, cos, sin):
        return self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                          image_rotary_emb=(cos, sin))


def build(tiny: bool, speed: str):
    from flux_speed import build_models

    from ryla.speed.modes import optimize_transformer

    device = torch.device("cpu" if tiny else "cuda")
    transformer, _, _, _ = build_models(device, tiny)
    info = optimize_transformer(transformer, speed, compile=False)
    return transformer, info


def blocks_by_type(transformer) -> dict[str, list]:
    from ryla.speed.modes import REPEATED_BLOCKS

    found: dict[str, list] = {}
    for module in transformer.modules():
        if type(module).__name__ in REPEATED_BLOCKS:
            found.setdefault(type(module).__name__, []).append(module)
    return found


def record_inputs(transformer, tiny: bool) -> dict[str, tuple]:
    """Each block type's first call: (hidden, text, temb, cos, sin), from one forward."""
    from ryla.speed.modes import REPEATED_BLOCKS

    config, device, dtype = transformer.config, transformer.device, transformer.dtype
    image_tokens, text_tokens = (64, 16) if tiny else (4096, 512)
    recorded: dict[str, tuple] = {}

    def hook(module, args, kwargs):
        name = type(module).__name__
        if name not in recorded:
            cos, sin = kwargs["image_rotary_emb"]
            recorded[name] = tuple(t.detach().clone() for t in (kwargs["hidden_states"], kwargs["encoder_hidden_states"],
                                                                 kwargs["temb"], cos, sin))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in transformer.modules()
               if type(m).__name__ in REPEATED_BLOCKS]
    generator = torch.Generator(device).manual_seed(3)
    with torch.inference_mode():
        transformer(hidden_states=torch.randn(1, image_tokens, config.in_channels, device=device, dtype=dtype,
                                              generator=generator),
                    encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, device=device,
                                                      dtype=dtype, generator=generator),
                    pooled_projections=torch.randn(1, config.pooled_projection_dim, device=device, dtype=dtype,
                                                   generator=generator),
                    timestep=torch.tensor([0.5], device=device, dtype=dtype),
                    img_ids=torch.zeros(image_tokens, 3, device=device), txt_ids=torch.zeros(text_tokens, 3, device=device),
                    guidance=torch.tensor([3.5], device=device, dtype=dtype), return_dict=False)
    for handle in handles:
        handle.remove()
    return recorded


def export_packages(transformer, inputs: dict[str, tuple], work: Path) -> dict:
    results = {}
    for name, blocks in blocks_by_type(transformer).items():
        wrapped = PositionalBlock(blocks[0])
        start = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(wrapped, inputs[name])
        exported = time.perf_counter() - start
        start = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(work / f"{name}.pt2"),
            inductor_configs={"aot_inductor.package_constants_in_so": False})
        results[name] = {"blocks": len(blocks), "export_s": round(exported, 2),
                         "aot_compile_s": round(time.perf_counter() - start, 2),
                         "package_mb": round(Path(path).stat().st_size / 1e6, 2)}
        print(name, json.dumps(results[name]), flush=True)
    return results


def load_and_check(work: Path, tiny: bool, speed: str) -> dict:
    """The fresh process's part (run with --load): see the module docstring, step 3."""
    already = {m: m in sys.modules for m in COMPILE_STACK}  # after `import torch` alone
    # The speed mode's custom ops (torch.library.custom_op, Python functions: the precomputed
    # modulation's lookup, FA3's wrapper) must be registered before a package that calls them
    # opens: AOTInductor calls them back through Python.
    import ryla.speed.attention  # noqa: F401
    import ryla.speed.modulation  # noqa: F401

    with_ops = {m: m in sys.modules for m in COMPILE_STACK}
    packages = sorted(work.glob("*.pt2"))
    counts = json.loads((work / "blocks.json").read_text())
    device_index = -1 if tiny else 0
    start = time.perf_counter()
    loaders = {p.stem: [torch._C._aoti.AOTIModelPackageLoader(str(p), "model", False, 1, device_index)
                        for _ in range(counts[p.stem])] for p in packages}
    opened = time.perf_counter() - start
    compile_stack_after_opening = {m: m in sys.modules for m in COMPILE_STACK}

    transformer, _ = build(tiny, speed)  # the same seeded weights as the exporting process
    inputs = torch.load(work / "inputs.pt")
    results = {"compile_stack_imported_by_torch": already, "compile_stack_imported_with_ryla_ops": with_ops,
               "open_loaders_s": round(opened, 3),
               "loaders": sum(len(v) for v in loaders.values()),
               "compile_stack_imported_by_opening": compile_stack_after_opening, "block_types": {}}
    start = time.perf_counter()
    for name, blocks in blocks_by_type(transformer).items():
        for loader, block in zip(loaders[name], blocks):
            state = {f"block.{k}": v for k, v in PositionalBlock(block).block.state_dict(keep_vars=True).items()}
            loader.load_constants({fqn: state[fqn].data for fqn in loader.get_constant_fqns()}, False, True, True)
    results["hand_over_weights_s"] = round(time.perf_counter() - start, 3)
    for name, blocks in blocks_by_type(transformer).items():
        loader, block = loaders[name][0], blocks[0]
        with torch.inference_mode():
            eager = PositionalBlock(block)(*inputs[name])
        packaged = loader.run(list(inputs[name]))
        start = time.perf_counter()
        packaged = loader.run(list(inputs[name]))
        run_s = time.perf_counter() - start
        before = max((a.float() - b.float()).abs().max().item() for a, b in zip(packaged, eager))
        # a LoRA switch writes into the weights in place: the package must compute with them
        weight = next(p for n, p in block.named_parameters() if p.ndim == 2 and "norm" not in n)
        with torch.inference_mode():
            weight.add_(0.05 * torch.randn_like(weight))
            patched_eager = PositionalBlock(block)(*inputs[name])
        patched = loader.run(list(inputs[name]))
        after = max((a.float() - b.float()).abs().max().item() for a, b in zip(patched, patched_eager))
        changed = max((a.float() - b.float()).abs().max().item() for a, b in zip(patched, packaged))
        scale = max(t.float().abs().max().item() for t in eager)
        results["block_types"][name] = {"max_abs_difference": before, "after_in_place_patch": after,
                                        "patch_changed_output_by": changed, "output_scale": scale,
                                        "run_s": round(run_s, 4)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/aot-blocks")
    parser.add_argument("--speed", default="exact")
    parser.add_argument("--tiny", action="store_true", help="a dry run on the CPU, on the tiny architecture")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)  # the fresh process's part
    args = parser.parse_args()
    work = Path(args.work)
    if args.load:
        print(json.dumps(load_and_check(work, args.tiny, args.speed)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    transformer, info = build(args.tiny, args.speed)
    inputs = record_inputs(transformer, args.tiny)
    torch.save(inputs, work / "inputs.pt")
    packages = export_packages(transformer, inputs, work)
    (work / "blocks.json").write_text(json.dumps({name: p["blocks"] for name, p in packages.items()}))
    del transformer
    loaded = subprocess.run([sys.executable, __file__, "--load", "--work", str(work), "--speed", args.speed]
                            + (["--tiny"] if args.tiny else []), capture_output=True, text=True, timeout=1800)
    if loaded.returncode != 0:
        raise RuntimeError(loaded.stderr[-3000:])
    results = {"device": torch.cuda.get_device_name() if not args.tiny else "cpu", "torch": torch.__version__,
               "speed_mode": info, "packages": packages, "fresh_process": json.loads(loaded.stdout.splitlines()[-1])}
    (out / "aot_blocks.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
