"""FLUX.1-dev serving speed on one GPU: stock diffusers vs ryla's engine in each speed mode.

Builds the full-size FLUX.1-dev architecture (transformer, VAE, T5-XXL, CLIP-L) with random
weights on the GPU (no downloads: speed does not depend on weight values), then, in one
process and on the same prompt embeddings and seeded noise, at 1024x1024 and 28 steps:

  * stock diffusers FluxPipeline, bf16, eager (the baseline), and once more with another
    SDPA kernel to see how much two correct runs differ;
  * ryla's engine in eager, exact, fast and turbo modes, each built from its own copy of the
    weights as `ryla serve --speed MODE` builds it (exact's variants and the LoRA benchmark
    reuse exact's);
  * per-request cost of switching among 3 rank-64 LoRAs on the compiled transformer, with
    recompilation turned into an error.

Reports the median of 5 timed runs after 2 warm-ups and a wait for the process to go quiet, the ratio to stock, peak GPU memory and the
relative L2 difference of the final latents against stock; writes JSON and a markdown table.

    python bench/flux_speed.py --out bench/results
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_floors import device_time_by_kernel, rel_l2  # noqa: E402

WIDTH = HEIGHT = 1024
STEPS = 28
GUIDANCE = 3.5
SEED = 0
# Timed runs start once the process is quiet. Right after a fresh compile, the process used
# extra CPU (0.3-0.6 s per image beyond the main thread's, which spins while it waits for the
# GPU) for some 10-20 s, and images were 1-20 % slower meanwhile (run 15: exact 3.525, 3.517,
# 3.514, then 3.484, 3.481 s once it stopped; bench/results/README.md). So after the 2
# warm-ups, wait (up to 30 s) until the idle process uses under 5 % of a core over a second,
# as a server is some seconds after start-up; then 5 timed runs.
TIMED_RUNS = 5
WARMUPS = 2
QUIET_CPU_SHARE = 0.05
QUIET_WAIT_MAX_S = 30
AUTOTUNE = "max-autotune-no-cudagraphs"
MEMORY_HISTORY = False  # --memory-history: decode_memory also says where live blocks were allocated


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def peaks_gib() -> dict[str, float]:
    """Peak GPU memory since the last reset: allocated (the caching allocator's blocks, what
    the table reports), requested (the tensors' own sizes, without the allocator's rounding,
    which depends on what was allocated and freed before) and reserved (what the process holds)."""
    if not torch.cuda.is_available():
        return {"peak_gib": 0.0}
    return {"peak_gib": peak_gib(),
            "peak_requested_gib": torch.cuda.memory_stats().get("requested_bytes.all.peak", 0) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def peak_during(fn) -> float:
    """Peak GPU memory (GiB) while fn runs, from what was allocated when it started."""
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return peak_gib()


def decode_memory(vae, run) -> dict:
    """GPU memory when `vae`'s decoder starts during run(): allocated (GiB), the live blocks
    by size (bytes: count), and how far decoding rises above it; which tensors an image keeps
    while it decodes, compared mode against mode (exact's peak was 2.7 MB over stock's, run 17)."""
    if not torch.cuda.is_available():
        return {}
    seen: dict = {}

    def before(module, args):
        torch.cuda.synchronize()
        seen["allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        sizes: dict[int, int] = {}
        for block in live_blocks():
            sizes[block["size"]] = sizes.get(block["size"], 0) + 1
        seen["live_blocks"] = dict(sorted(sizes.items(), reverse=True))
        if MEMORY_HISTORY:
            seen["live_by_origin"] = live_by_origin()
        torch.cuda.reset_peak_memory_stats()

    def after(module, args, output):
        torch.cuda.synchronize()
        seen["decoder_rise_gib"] = torch.cuda.max_memory_allocated() / 2**30 - seen["allocated_gib"]

    handles = [vae.decoder.register_forward_pre_hook(before), vae.decoder.register_forward_hook(after)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def live_blocks():
    """The caching allocator's blocks that hold tensors now (with where each was allocated, while
    memory history is recorded)."""
    for segment in torch.cuda.memory._snapshot()["segments"]:
        yield from (block for block in segment["blocks"] if block["state"] == "active_allocated")


def live_by_origin() -> dict:
    """The GPU's live blocks grouped by where they were allocated (our, diffusers' and the
    bench's innermost frames), largest total first: blocks (count), bytes (as the allocator
    counts them) and requested (what the tensors asked for)."""
    groups: dict[str, list[int]] = {}
    for block in live_blocks():
        frames = [f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"
                  for frame in block.get("frames", [])
                  if any(part in frame["filename"] for part in ("ryla", "bench", "diffusers"))]
        group = groups.setdefault(" < ".join(frames[:4]) or "(before recording, or no frame of ours)", [0, 0, 0])
        group[0] += 1
        group[1] += block["size"]
        group[2] += block.get("requested_size", block["size"])
    return {where: {"blocks": count, "bytes": size, "requested": requested}
            for where, (count, size, requested) in sorted(groups.items(), key=lambda item: -item[1][1])}


class GcPauses:
    """Seconds spent in Python's cyclic garbage collector while active (a full collection
    walks every object, the compiled model's included, while the GPU may run dry)."""

    def __init__(self):
        self.total, self._start = 0.0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.total += time.perf_counter() - self._start

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process's threads other than the main one, summed by thread
    name (Linux /proc; empty elsewhere): which background work costs the timed runs."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    totals: dict[str, float] = {}
    try:
        tasks = [t for t in os.listdir("/proc/self/task") if t != str(os.getpid())]
    except OSError:
        return totals
    for tid in tasks:
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


def busy_threads_since(before: dict[str, float]) -> dict[str, float]:
    now = thread_cpu_s()
    return {name: round(cpu - before.get(name, 0.0), 3) for name, cpu in now.items()
            if cpu - before.get(name, 0.0) >= 0.01}


def wait_until_quiet() -> tuple[float, dict[str, float]]:
    """Seconds waited until this process, idle, used under QUIET_CPU_SHARE of a core for one
    second (background work left by compilation), at most QUIET_WAIT_MAX_S; and which threads
    were busy meanwhile."""
    start, threads = time.perf_counter(), thread_cpu_s()
    while time.perf_counter() - start < QUIET_WAIT_MAX_S:
        cpu = time.process_time()
        time.sleep(1.0)
        if time.process_time() - cpu < QUIET_CPU_SHARE:
            break
    return time.perf_counter() - start, busy_threads_since(threads)


def measure(fn, warmups=WARMUPS, runs=TIMED_RUNS):
    warm = [sync_time(fn)[0] for _ in range(warmups)]
    quiet_after_s, busy_while_waiting = wait_until_quiet()
    threads = thread_cpu_s()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, cpu, pauses, out = [], [], [], None
    for _ in range(runs):
        cpu_start = time.process_time()
        with GcPauses() as gc_pauses:
            t, out = sync_time(fn)
        times.append(t)
        cpu.append(time.process_time() - cpu_start)
        pauses.append(gc_pauses.total)
    return {"median_s": statistics.median(times), "runs_s": times, "warmup_s": warm, "quiet_after_s": quiet_after_s,
            "busy_threads_while_waiting_cpu_s": busy_while_waiting,
            "busy_threads_during_runs_cpu_s": busy_threads_since(threads),
            "cpu_s": cpu, "gc_pause_s": pauses, **peaks_gib()}, out


KERNEL_KINDS = (("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
                ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "matmul", "scaled_mm")),
                ("triton (fused elementwise)", ("triton",)))


def profile_image(run) -> dict:
    """GPU kernel time of one image by kind (GEMM, attention, fused Triton, other), against
    the wall time: what is left to win, and where."""
    _sync()
    (wall, _), by_kernel = device_time_by_kernel(lambda: sync_time(run))
    kinds: dict[str, float] = {}
    kernels = []
    for key, (seconds, calls) in by_kernel.items():
        name = key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
        kernels.append((seconds, calls, key[:120]))
    kernels.sort(reverse=True)
    busy = sum(kinds.values())
    return {"wall_s": wall, "kernel_s": busy, "idle_share": 1 - busy / wall if wall else 0.0,
            "by_kind_s": kinds, "top_kernels": [{"s": t, "calls": c, "name": n} for t, c, n in kernels[:25]]}


def build_models(device, tiny: bool = False):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ryla.flux.loading import _public, component_config

    if tiny:  # a CPU dry run of this script, on the tiny architecture
        from ryla.models import tiny as t

        configs = {"transformer": t.TINY_TRANSFORMER, "vae": t.TINY_VAE, "clip_l": {**t.TINY_CLIP, "vocab_size": 49408},
                   "t5xxl": {**t.TINY_T5, "vocab_size": 32128}}
        component_config = lambda name, meta: configs[name]  # noqa: E731
    torch.manual_seed(0)
    with torch.device(device):
        dtype = torch.float32 if tiny else torch.bfloat16
        transformer = FluxTransformer2DModel(**_public(component_config("transformer", {}))).to(dtype)
        vae = AutoencoderKL(**_public(component_config("vae", {}))).to(dtype)
        clip = CLIPTextModel(CLIPTextConfig(**_public(component_config("clip_l", {})))).to(dtype)
        t5 = T5EncoderModel(T5Config(**_public(component_config("t5xxl", {})))).to(dtype)
    for m in (transformer, vae, clip, t5):
        m.eval().requires_grad_(False)
    return transformer, vae, clip, t5


@torch.inference_mode()
def encode(clip, t5, device):
    ids = torch.randint(0, 49407, (1, 77), generator=torch.Generator().manual_seed(1)).to(device)
    pooled = clip(ids).pooler_output
    t5_ids = torch.randint(0, 32127, (1, 512), generator=torch.Generator().manual_seed(2)).to(device)
    return t5(t5_ids)[0], pooled


def stock_pipeline(transformer, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    # The same sigmas as ryla (ComfyUI's simple schedule with ModelSamplingFlux at 1024x1024),
    # passed as they are: a scheduler with no shift of its own.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--modes", default="fast,turbo,exact,lora",
                        help="comma list, run in this order, of eager, exact, exact-cudnn, exact-looped, "
                             "exact-per-step-modulation, exact-diffusers-inputs, exact-tuned, exact-autotune, exact-cudagraphs, "
                             "exact-vae-nchw, lora, "
                             "fast-linear, fast, turbo (variants of exact right after exact)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny architecture")
    parser.add_argument("--profile", action="store_true", help="also profile one image per mode (kernel time by kind)")
    parser.add_argument("--memory-history", action="store_true",
                        help="record where each GPU allocation was made, and list what lives at each mode's decode "
                             "(slows the runs: not for timing)")
    args = parser.parse_args()
    global WIDTH, HEIGHT, STEPS, MEMORY_HISTORY
    if args.memory_history and torch.cuda.is_available():
        MEMORY_HISTORY = True
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    if args.tiny:
        WIDTH = HEIGHT = 128
        STEPS = 4
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16

    from ryla.flux import sampling
    from ryla.flux.components import Cond, FluxModel, Vae
    from ryla.flux.engine import FluxEngine, release_freed_gpu_memory
    from ryla.speed.modes import configure_compile_cache, optimize_transformer, optimize_vae
    from ryla.models.store import ModelStore

    import diffusers
    import transformers

    results: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "size": f"{WIDTH}x{HEIGHT}", "steps": STEPS,
                     "architecture": "tiny (CPU dry run)" if args.tiny else "full-size", "modes": {}}
    t0 = time.perf_counter()
    transformer, vae, clip, t5 = build_models(device, args.tiny)
    t5_embeds, pooled = encode(clip, t5, device)
    del clip, t5
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    results["build_s"] = time.perf_counter() - t0

    sigmas = sampling.calculate_sigmas(sampling.FluxModelSampling(sampling.resolution_shift(WIDTH, HEIGHT)),
                                       "simple", STEPS)
    noise = sampling.prepare_noise((1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    packed_noise = sampling.pack_latents(noise).to(device, dtype)

    # ---------------------------------------------------------------- stock diffusers
    pipe = stock_pipeline(transformer, vae)

    def stock(output_type="pt"):
        return pipe(prompt_embeds=t5_embeds, pooled_prompt_embeds=pooled, height=HEIGHT, width=WIDTH,
                    num_inference_steps=STEPS, sigmas=sigmas[:-1].tolist(), guidance_scale=GUIDANCE,
                    latents=packed_noise.clone(), output_type=output_type).images

    with torch.inference_mode():
        stats, _ = measure(stock)
        stats["peak_sampling_gib"] = peak_during(lambda: stock("latent"))  # the pipeline without its decode
        stats["decode_memory"] = decode_memory(vae, stock)
        # on the CPU: held on the GPU, these 2 MiB counted in every later mode's peak (run 17)
        stock_latents = stock("latent").float().cpu()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH):
            other_kernel = stock("latent").float().cpu()
    stats["rel_l2_vs_stock"] = 0.0
    results["modes"]["stock-eager"] = stats
    results["stock_vs_stock_other_kernel_rel_l2"] = rel_l2(other_kernel, stock_latents)
    baseline = stats["median_s"]
    print("stock", json.dumps(stats), flush=True)

    # ---------------------------------------------------------------- ryla
    store_dir = Path(tempfile.mkdtemp())
    configure_compile_cache(store_dir / "compile-cache")
    store = ModelStore(store_dir)
    engine = FluxEngine(store, device=device, dtype=dtype)
    cond = Cond(t5=t5_embeds, pooled=pooled, guidance=GUIDANCE)
    # PyTorch's VAE waits on the CPU (see pristine below); each mode gets its own GPU copy, which
    # the engine optimises as `ryla serve --speed MODE` does
    latent = torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8)

    def ryla_sample(model):
        return engine.sample(model, (cond,), None, latent, noise, sigmas, 1.0)

    def ryla_image(model):
        out = ryla_sample(model)
        return out, engine.decode(current["vae"], out)

    def packed_model_space(vae_space):
        return sampling.pack_latents((vae_space - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE)

    def run_mode(name, model):
        stats, (out, _) = measure(lambda: ryla_image(model))
        # which half of an image sets the peak (stock's is the pipeline's sampling peak above)
        stats["peak_sampling_gib"] = peak_during(lambda: ryla_sample(model))
        stats["peak_decode_gib"] = peak_during(lambda: engine.decode(current["vae"], out))
        stats["decode_memory"] = decode_memory(current["vae"].vae, lambda: ryla_image(model))
        stats["ratio_vs_stock"] = stats["median_s"] / baseline
        stats["rel_l2_vs_stock"] = rel_l2(packed_model_space(out), stock_latents)
        stats["speed_info"] = engine.speed_info
        stats["decode_s"] = statistics.median(
            sync_time(lambda: engine.decode(current["vae"], out))[0] for _ in range(3))
        if "decode_pytorch_vae_s" not in results:  # the same latents through PyTorch's own GroupNorm
            pytorch_vae = Vae("ae", copy.deepcopy(pristine_vae).to(device))  # after the peak was taken
            results["decode_pytorch_vae_s"] = statistics.median(
                sync_time(lambda: engine.decode(pytorch_vae, out))[0] for _ in range(3))
            del pytorch_vae
        if args.profile and torch.cuda.is_available():
            with torch.inference_mode():
                stats["profile"] = profile_image(lambda: ryla_image(model))
        results["modes"][name] = stats
        print(name, json.dumps(stats, default=str), flush=True)

    modes = args.modes.split(",")
    # Each served mode starts from its own copy of the stock weights, as `ryla serve --speed MODE`
    # would (a fast transformer built on top of exact's compiled one idled the GPU more: run 7).
    # The stock copies wait on the CPU so that only the mode's own copies count in its peak memory.
    del pipe
    pristine, pristine_vae = transformer.to("cpu"), vae.to("cpu")
    current: dict = {}

    def fresh_model(speed: str) -> FluxModel:
        nonlocal engine
        current.clear()  # the previous mode's transformer, compiled code and all
        engine = FluxEngine(store, device=device, dtype=dtype)  # and its LoRA state
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # The VAE is copied after the speed mode has reshaped the transformer's weights, as a
        # server loads it. Copied before, its blocks were rounded up by 4.5 MB more (run 17d):
        # the allocated peak moves by a few MB with allocation order, the tensors' own doesn't.
        model = FluxModel("flux1-dev", copy.deepcopy(pristine).to(device))
        engine.speed_info = optimize_transformer(model.transformer, speed) if speed != "eager" else {"speed": speed}
        release_freed_gpu_memory(device)  # as the engine does after each build
        mode_vae = copy.deepcopy(pristine_vae).to(device)
        engine.speed_info.update(optimize_vae(mode_vae, speed))
        current.update(model=model, vae=Vae("ae", mode_vae))
        return model

    known = ("eager", "exact", "exact-cudnn", "exact-looped", "exact-per-step-modulation", "exact-diffusers-inputs",
             "exact-tuned", "exact-autotune", "exact-cudagraphs", "exact-vae-nchw", "lora", "fast-linear", "fast",
             "turbo")
    if unknown := [mode for mode in modes if mode not in known]:
        parser.error(f"--modes: unknown {unknown}; known: {', '.join(known)}")
    # In the order given: FlashAttention-3's build (exact, where installed) loads the CUDA 12
    # runtime beside torch's CUDA 13 one, after which cudnn-frontend refuses fp8 attention
    # ("Multiple libcudart libraries found"); list fast and turbo before exact (the default does).
    plan_bytes = None  # ryla.speed.modulation's plan limit, while exact-per-step-modulation sets it to 0
    planned_layers = None
    for mode in modes:
        try:
            start = time.perf_counter()
            if mode in ("eager", "exact", "fast-linear", "fast", "turbo"):
                model = None  # so that fresh_model can free the last mode's copy first
            if mode in ("eager", "exact", "fast", "turbo"):
                model = fresh_model(mode)
            elif mode == "fast-linear":  # exact + fp8 linear layers, attention still bf16 (attributes fast's gain)
                from ryla.speed.modes import quantize_fp8

                model = fresh_model("exact")
                engine.speed_info = {**engine.speed_info, "speed": "fast (bf16 attention)",
                                     "fp8_linear_layers": quantize_fp8(model.transformer)}
            else:  # variants measured on exact's transformer, which must come first
                model = current.get("model")
                if model is None or engine.speed_info.get("speed") != "exact":
                    raise RuntimeError(f"{mode} needs exact just before it in --modes")
                if mode == "lora":
                    results["lora"] = lora_bench(engine, store, model, ryla_image, device)
                    print("lora", json.dumps(results["lora"]), flush=True)
                    continue
                torch._dynamo.reset()
                if mode == "exact-cudnn":  # cuDNN's attention where FlashAttention-3 is installed (attributes FA3)
                    from ryla.speed.attention import FusedInputsFluxAttnProcessor

                    for module in model.transformer.modules():
                        if isinstance(getattr(module, "processor", None), FusedInputsFluxAttnProcessor):
                            module.processor.flash_attention_3 = False
                    engine.speed_info = {**engine.speed_info, "attention": "_native_cudnn"}
                    compiled = engine.speed_info.get("compiled", "not compiled")
                elif mode == "exact-looped":  # Inductor's own reduction rule (attributes the persistent rows)
                    import torch._inductor.config as inductor_config
                    from torch._inductor.choices import InductorChoices
                    from torch._inductor.virtualized import V

                    if hasattr(inductor_config, "inductor_choices_class"):
                        inductor_config.inductor_choices_class = None
                    V.set_choices_handler(InductorChoices())
                    engine.speed_info = {k: v for k, v in engine.speed_info.items() if k != "persistent_row_reductions"}
                    compiled = engine.speed_info.get("compiled", "not compiled")
                elif mode == "exact-per-step-modulation":  # no plan: each step's products (attributes the plan)
                    from ryla.speed import modulation

                    plan_bytes, modulation.MAX_PLAN_BYTES = modulation.MAX_PLAN_BYTES, 0
                    planned_layers = engine.speed_info.get("precomputed_modulation_layers")
                    engine.speed_info = {**engine.speed_info, "precomputed_modulation_layers": 0}
                    compiled = engine.speed_info.get("compiled", "not compiled")
                elif mode == "exact-vae-nchw":  # the VAE's old layout (attributes channels-last; list it last)
                    # optimize_vae puts the VAE in channels-last: in NCHW, cuDNN transposes the
                    # decoder's 1024x1024 activations to NHWC and back, and the decode set the
                    # image's peak 0.87 GiB higher (run 18).
                    current["vae"].vae.to(memory_format=torch.contiguous_format)
                    engine.speed_info = {**engine.speed_info, "vae_memory_format": "NCHW"}
                    compiled = engine.speed_info.get("compiled", "not compiled")
                elif mode == "exact-diffusers-inputs":  # attention inputs by diffusers' processor (attributes the gain)
                    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

                    for module in model.transformer.modules():
                        if isinstance(module, FluxAttention):
                            backend = module.processor._attention_backend
                            module.set_processor(FluxAttnProcessor())
                            module.processor._attention_backend = backend
                    compiled = engine.speed_info.get("compiled", "not compiled")
                elif mode == "exact-tuned":  # same graph, Triton kernels' launch configs tuned by search
                    import torch._inductor.config as inductor_config

                    inductor_config.coordinate_descent_tuning = True
                    model.transformer.compile_repeated_blocks(fullgraph=True)
                    compiled = "repeated blocks (coordinate descent tuning)"
                elif mode == "exact-autotune":  # same graph, GEMM kernels chosen by benchmarking
                    model.transformer.compile_repeated_blocks(fullgraph=True, mode=AUTOTUNE)
                    compiled = f"repeated blocks ({AUTOTUNE})"
                else:  # exact-cudagraphs: same kernels, replayed as CUDA graphs (less launch overhead)
                    model.transformer.compile_repeated_blocks(fullgraph=True, mode="reduce-overhead")
                    compiled = "repeated blocks (reduce-overhead)"
                engine.speed_info = {**engine.speed_info, "compiled": compiled}
            results.setdefault("setup_s", {})[mode] = time.perf_counter() - start
            run_mode(f"ryla-{mode}", model)
            if mode == "exact-tuned":  # later modes compile as the engine does
                import torch._inductor.config as inductor_config

                inductor_config.coordinate_descent_tuning = False
            if mode == "turbo":
                results["modes"]["ryla-turbo"]["full_steps_per_image"] = count_full_steps(
                    model.transformer, lambda: ryla_image(model))
        except Exception as exc:
            results["modes"][f"ryla-{mode}"] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        finally:
            if plan_bytes is not None:  # later modes plan as the engine does
                from ryla.speed import modulation

                modulation.MAX_PLAN_BYTES, plan_bytes = plan_bytes, None
                # and say so: the next variant reuses this model's speed_info (run 16's
                # exact-cudnn row read 0 planned layers while its plan ran)
                engine.speed_info = {**engine.speed_info, "precomputed_modulation_layers": planned_layers}
        (out_dir / "flux_speed.json").write_text(json.dumps(results, indent=2, default=str))

    (out_dir / "flux_speed.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "flux_speed.md").write_text(markdown(results))
    print(markdown(results))


def count_full_steps(transformer, run) -> int:
    """Steps of one image on which the whole network ran. First-block caching decides each
    step in FBCHeadBlockHook._should_compute_remaining_blocks, a compiler-disabled (so plain
    Python) call; wrapping it records the decisions of one extra image."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    original = FBCHeadBlockHook._should_compute_remaining_blocks
    decisions = []

    @torch.compiler.disable
    def recording(self, *args, **kwargs):
        decision = original(self, *args, **kwargs)
        decisions.append(bool(decision))
        return decision

    FBCHeadBlockHook._should_compute_remaining_blocks = recording
    try:
        with torch.inference_mode():
            run()
    finally:
        FBCHeadBlockHook._should_compute_remaining_blocks = original
    return sum(decisions)


def lora_bench(engine, store, model, ryla_image, device):
    """Three rank-64 LoRAs on every linear layer of the blocks, in the PEFT/ai-toolkit format:
    base requests vs requests that switch LoRA every time, on the compiled transformer."""
    import torch._dynamo

    from safetensors.torch import save_file

    from ryla.flux.lora import linear_shapes

    shapes = {k: v for k, v in linear_shapes(model.transformer).items()
              if "transformer_blocks." in k and not k.endswith(("to_qkv", "to_added_qkv"))}
    (store.root / "loras").mkdir(parents=True, exist_ok=True)
    names = []
    for i, rank in enumerate((64, 48, 32)):
        g = torch.Generator(device="cpu").manual_seed(100 + i)
        tensors = {}
        for name, (out_f, in_f) in shapes.items():
            tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).half()
            tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).half()
        path = store.root / "loras" / f"lora{i}.safetensors"
        save_file(tensors, str(path))
        names.append(path.name)
    result = {"ranks": [64, 48, 32], "layers": len(shapes)}
    with torch.inference_mode():
        base_stats, _ = measure(lambda: ryla_image(model))
        handles = [engine.load_lora(n, 1.0, model)[0] for n in names]  # first load: convert + cache
        ryla_image(handles[0])  # first patch allocates the originals' backup
        torch._dynamo.config.error_on_recompile = True
        try:
            times = []
            for i in range(6):
                handle = engine.load_lora(names[i % 3], 1.0, model)[0]
                t, _ = sync_time(lambda handle=handle: ryla_image(handle))
                times.append(t)
            recompiled = False
        except Exception as exc:  # a recompilation raises here
            recompiled = f"{type(exc).__name__}: {exc}"[:300]
            times = times or [float("nan")]
        finally:
            torch._dynamo.config.error_on_recompile = False
        patch_t, _ = sync_time(lambda: engine._patch(model.transformer, handles[1].loras))
        restore_t, _ = sync_time(lambda: engine._patch(model.transformer, ()))
    result.update(base_median_s=base_stats["median_s"], switching_median_s=statistics.median(times),
                  switching_runs_s=times, overhead=statistics.median(times) / base_stats["median_s"] - 1,
                  recompiled=recompiled, patch_s=patch_t, restore_s=restore_t,
                  peak_gib=peak_gib())
    return result


def markdown(results: dict) -> str:
    lines = [f"# FLUX.1-dev speed, {results['size']}, {results['steps']} steps",
             "",
             f"{results['gpu']}; torch {results['torch']}, diffusers {results['diffusers']}, "
             f"transformers {results['transformers']}. Random weights, {results.get('architecture', 'full-size')} "
             "architecture. "
             f"Median of {TIMED_RUNS} runs after {WARMUPS} warm-ups and a wait until the process was quiet; "
             "latency includes VAE decoding.",
             "",
             "| mode | latency (s) | vs stock | peak GPU memory (GiB) | of which tensors (GiB) | rel. L2 of latents vs stock "
             "| notes |",
             "|---|---|---|---|---|---|---|"]
    for name, stats in results["modes"].items():
        if "error" in stats:
            lines.append(f"| {name} | - | - | - | - | - | failed: {stats['error'][:120]} |")
            continue
        notes = ""
        if "full_steps_per_image" in stats:
            notes = f"{stats['full_steps_per_image']} of {results['steps']} steps fully computed"
        ratio = stats["median_s"] / results["modes"]["stock-eager"]["median_s"]
        requested = f"{stats['peak_requested_gib']:.4f}" if "peak_requested_gib" in stats else "-"
        lines.append(f"| {name} | {stats['median_s']:.3f} | {ratio:.3f}x | {stats['peak_gib']:.4f} | {requested} | "
                     f"{stats['rel_l2_vs_stock']:.4f} | {notes} |")
    lines += ["", "Peak GPU memory is torch.cuda.max_memory_allocated (the caching allocator's blocks); "
              "'of which tensors' is the peak of what the tensors themselves requested, without the "
              "allocator's rounding.",
              "", f"Two stock runs with different SDPA kernels (flash vs memory-efficient) differ by "
              f"rel. L2 {results['stock_vs_stock_other_kernel_rel_l2']:.4f}."]
    if "lora" in results:
        lo = results["lora"]
        lines += ["", "## LoRA switching (exact mode, compiled)", "",
                  f"3 LoRAs (ranks {lo['ranks']}) on {lo['layers']} linear layers; each request uses a different one.",
                  "", "| request | median latency (s) |", "|---|---|",
                  f"| no LoRA | {lo['base_median_s']:.3f} |",
                  f"| switching LoRA every request | {lo['switching_median_s']:.3f} |", "",
                  f"Overhead {lo['overhead'] * 100:.1f}%; patch {lo['patch_s'] * 1000:.0f} ms, restore "
                  f"{lo['restore_s'] * 1000:.0f} ms; recompiled: {lo['recompiled']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
