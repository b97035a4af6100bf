"""Identity request cost on one GPU: /flux-instantid's sampling vs plain /flux-dev.

Full-size FLUX.1-dev transformer and VAE with random weights, plus an InfuseNet-sized
FluxControlNetModel (5 double + 10 single blocks at FLUX width, as InfiniteYou-FLUX v1.0's
~3B-parameter InfuseNet) and the InfiniteYou Resampler (512 -> 8 x 4096), 1024x1024, 28 steps,
same embeddings and noise, median of 3 after warm-up, in the engine's exact mode.

    python bench/identity_speed.py --out bench/results        # target: identity <= 1.35x
    python bench/identity_speed.py --tiny --out /tmp/x        # CPU dry run of the script
    python bench/identity_speed.py --speed fast --graphs --out /tmp/g  # steps from CUDA graphs

With --graphs (ryla.speed.graphs): every arm measured with the steps launched from Python and
then replayed from CUDA graphs, in one process (`step_graphs.json`), and both kinds of step
checked bit for bit against eager launches on a second request (other identity tokens, other
text, other noise) after the graphs were captured on the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flux_speed import build_models, encode, measure  # noqa: E402  (same builders as the speed bench)

INFUSENET_BLOCKS = (5, 10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--speed", default="exact")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one plain and one identity run (identity_profile.json): GPU time by "
                             "kernel, both runs' kernel time against their wall time")
    parser.add_argument("--graphs", action="store_true",
                        help="measure with steps launched from Python and replayed from CUDA graphs, and check the "
                             "replays bit for bit (step_graphs.json)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size, steps = (128, 4) if args.tiny else (1024, 28)

    from diffusers import FluxControlNetModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from ryla.flux import sampling
    from ryla.flux.components import Cond, FluxModel
    from ryla.flux.engine import FluxEngine
    from ryla.speed.modes import optimize_transformer
    from ryla.identity.adapter import RESAMPLER, IdentityAdapter
    from ryla.models.store import ModelStore

    transformer, vae, clip, t5 = build_models(device, args.tiny)
    t5_embeds, pooled = encode(clip, t5, device)
    del clip, t5
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    if args.tiny:
        config.update(num_layers=1, num_single_layers=1)
        resampler_config = {**RESAMPLER, "output_dims": config["joint_attention_dim"], "hidden_dims": 64,
                            "heads": 1, "depth": 1}
    else:
        config.update(num_layers=INFUSENET_BLOCKS[0], num_single_layers=INFUSENET_BLOCKS[1])
        resampler_config = RESAMPLER
    keep = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    with torch.device(device):
        controlnet = FluxControlNetModel(**{k: config[k] for k in keep}).to(dtype).eval()
        resampler = IPAdapterPlusImageProjection(**resampler_config).to(dtype).eval()
    engine = FluxEngine(ModelStore(tempfile.mkdtemp()), device=device, dtype=dtype)
    if args.speed != "eager":
        engine.speed_info = optimize_transformer(transformer, args.speed, compile=not args.tiny)
        # As FluxEngine.load_controlnet does: InfuseNet runs in the server's speed mode too.
        optimize_transformer(controlnet, args.speed, compile=not args.tiny, controlnet=True)
    with torch.inference_mode():
        tokens = resampler(torch.randn(1, 1, 512, device=device, dtype=dtype))
    cond = Cond(t5=t5_embeds, pooled=pooled, guidance=3.5)
    sigmas = sampling.calculate_sigmas(sampling.FluxModelSampling(sampling.resolution_shift(size, size)), "simple",
                                       steps)
    noise = sampling.prepare_noise((1, 16, size // 8, size // 8), 0)
    latent = torch.zeros_like(noise)
    plain = FluxModel("flux1-dev", transformer)
    identity = FluxModel("flux1-dev", transformer,
                         identity=IdentityAdapter(controlnet, tokens, None, vae, 0.8, 0.0, 1.0))

    def run(model):
        from ryla.flux.components import Vae

        return engine.decode(Vae("ae", vae), engine.sample(model, (cond,), None, latent, noise, sigmas, 1.0))

    if args.graphs:
        graphs_report(engine, run, plain, identity, out, IdentityAdapter, resampler, controlnet, vae, cond, latent,
                      sigmas, device, dtype)
        return
    with torch.inference_mode():
        base, _ = measure(lambda: run(plain))
        ident, _ = measure(lambda: run(identity))
        # Plain requests after identity ones: InfuseNet's compiled graphs must not slow them.
        base_after, _ = measure(lambda: run(plain), warmups=0)
    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "size": size, "steps": steps, "speed": engine.speed_info,
               # fast mode's fp8 layers hold their weights in buffers, not parameters
               "infusenet_parameters_b": (sum(p.numel() for p in controlnet.parameters()) + sum(
                   b.numel() for name, b in controlnet.named_buffers() if name.endswith("weight_fp8"))) / 1e9,
               "flux_dev": base, "flux_instantid": ident, "ratio": ident["median_s"] / base["median_s"],
               "flux_dev_after_identity": base_after, "plain_after_identity_ratio": base_after["median_s"] / base["median_s"]}
    (out / "identity_speed.json").write_text(json.dumps(results, indent=2, default=str))
    if args.profile:
        with torch.inference_mode():
            profile = {"plain": profile_run(lambda: run(plain)), "identity": profile_run(lambda: run(identity))}
        kernels = set(profile["plain"]["kernels"]) | set(profile["identity"]["kernels"])
        extra = {name: profile["identity"]["kernels"].get(name, [0, 0.0])[1] - profile["plain"]["kernels"].get(name, [0, 0.0])[1]
                 for name in kernels}
        profile["identity_extra_ms_by_kernel"] = dict(sorted(extra.items(), key=lambda item: -abs(item[1]))[:60])
        for run_name in ("plain", "identity"):
            top = sorted(profile[run_name]["kernels"].items(), key=lambda item: -item[1][1])[:40]
            profile[run_name]["kernels"] = dict(top)
        (out / "identity_profile.json").write_text(json.dumps(profile, indent=2))
        print(json.dumps({k: {key: v[key] for key in ("wall_ms", "kernel_ms")} for k, v in profile.items()
                          if k in ("plain", "identity")}))
    print(json.dumps({k: results[k] for k in ("gpu", "infusenet_parameters_b", "ratio", "plain_after_identity_ratio")}),
          statistics.median(base["runs_s"]), statistics.median(ident["runs_s"]))


def graphs_report(engine, run, plain, identity, out: Path, IdentityAdapter, resampler, controlnet, vae, cond, latent,
                  sigmas, device, dtype) -> None:
    """Plain and identity sampling with eager launches, then from step graphs; then a second
    request's latents from replayed graphs against eager launches, bit for bit."""
    from dataclasses import replace

    from ryla.flux import sampling
    from ryla.flux.components import Cond

    report: dict = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                    "speed": engine.speed_info}
    with torch.inference_mode():
        for graphs in (False, True):
            engine.step_graphs = graphs
            arm = "graphs" if graphs else "eager"
            report[arm] = {"flux_dev": measure(lambda: run(plain))[0], "flux_instantid": measure(lambda: run(identity))[0]}
            report[arm]["ratio"] = report[arm]["flux_instantid"]["median_s"] / report[arm]["flux_dev"]["median_s"]
        graphs = plain.transformer._ryla_step_graphs
        report["graphs"]["captures"], report["graphs"]["replays"] = graphs.captures, graphs.replays
        report["graphs_vs_eager"] = {name: report["graphs"][name]["median_s"] / report["eager"][name]["median_s"]
                                     for name in ("flux_dev", "flux_instantid")}
        # a second request: other identity tokens, text, pooled vector and noise
        generator = torch.Generator(device="cpu").manual_seed(2)
        tokens = resampler(torch.randn(1, 1, 512, generator=generator).to(device, dtype))
        other_identity = replace(identity, identity=IdentityAdapter(controlnet, tokens, None, vae, 0.8, 0.0, 1.0))
        other_cond = Cond(t5=cond.t5.flip(1), pooled=cond.pooled * 0.5, guidance=3.5)
        noise = sampling.prepare_noise(tuple(latent.shape), 7)
        checks = {}
        for name, model in (("flux_dev", plain), ("flux_instantid", other_identity)):
            latents = []
            for graphs in (True, False):
                engine.step_graphs = graphs
                latents.append(engine.sample(model, (other_cond,), None, latent, noise, sigmas, 1.0))
            checks[name] = {"bit_equal": bool(torch.equal(*latents)),
                            "max_abs_difference": float((latents[0] - latents[1]).abs().max())}
        report["replay_vs_eager_second_request"] = checks
    (out / "step_graphs.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({"ratio_eager": report["eager"]["ratio"], "ratio_graphs": report["graphs"]["ratio"],
                      "graphs_vs_eager": report["graphs_vs_eager"], "checks": checks}))


def profile_run(fn) -> dict:
    """One run under torch.profiler: wall time, summed GPU kernel time, and per kernel name
    [calls, milliseconds] (names cut to 120 characters)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels: dict[str, list] = {}
    for event in prof.events():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name[:120], [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time / 1000
    return {"wall_ms": wall * 1000, "kernel_ms": sum(v[1] for v in kernels.values()), "kernels": kernels}


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - start:.0f}s")
