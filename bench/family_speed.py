"""FLUX.1 Kontext and Fill on one GPU: stock diffusers vs ryla's engine in exact mode.

Builds the full-size architectures with random weights (no downloads: speed does not depend on
weight values): the FLUX.1-dev transformer (Kontext's is the same architecture), a Fill
transformer (img_in 384 wide), the VAE, and prompt embeddings from random token ids. Then, in
one process, at 1024x1024 and 28 steps, each image end to end (the reference or masked image
encoded by the VAE, sampling, decoding):

  * Kontext with one 1024x1024 reference: diffusers' FluxKontextPipeline (bf16, eager) vs
    the engine with a ReferenceLatent, as ComfyUI's Kontext graph runs it (guidance 2.5);
  * Fill with a 1024x1024 image and mask: diffusers' FluxFillPipeline vs the engine with
    InpaintModelConditioning's inputs (guidance 30).

Both sides get the same sigmas (ComfyUI's simple schedule), embeddings and seeded noise.
Median of 5 timed runs after 2 warm-ups; writes JSON.

    python bench/family_speed.py --out bench/results
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flux_speed  # noqa: E402
from flux_speed import build_models, encode, measure  # noqa: E402

STEPS = 28


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny architecture")
    parser.add_argument("--kinds", default="kontext,fill")
    args = parser.parse_args()
    size = 128 if args.tiny else 1024
    steps = 3 if args.tiny else STEPS
    if args.tiny:
        flux_speed.TIMED_RUNS, flux_speed.WARMUPS, flux_speed.QUIET_WAIT_MAX_S = 2, 1, 0
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16

    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxKontextPipeline, \
        FluxTransformer2DModel

    from ryla.flux import sampling
    from ryla.flux.components import Cond, FluxModel, Vae
    from ryla.flux.engine import FluxEngine, release_freed_gpu_memory
    from ryla.models.store import ModelStore
    from ryla.speed.modes import configure_compile_cache, optimize_transformer, optimize_vae

    results: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "diffusers": diffusers.__version__, "size": f"{size}x{size}",
                     "steps": steps, "architecture": "tiny (CPU dry run)" if args.tiny else "full-size", "kinds": {}}
    transformer, vae, clip, t5 = build_models(device, args.tiny)
    t5_embeds, pooled = encode(clip, t5, device)
    del clip, t5
    sigmas = sampling.calculate_sigmas(sampling.FluxModelSampling(sampling.resolution_shift(size, size)), "simple",
                                       steps)
    noise = sampling.prepare_noise((1, 16, size // 8, size // 8), 0)
    packed_noise = sampling.pack_latents(noise).to(device, dtype)
    generator = torch.Generator().manual_seed(7)
    image = torch.rand(1, 3, size, size, generator=generator)  # 0..1
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)

    store_dir = Path(tempfile.mkdtemp())
    configure_compile_cache(store_dir / "compile-cache")
    engine = FluxEngine(ModelStore(store_dir), device=device, dtype=dtype)
    speed = "eager" if args.tiny else "exact"

    def ryla_model(source) -> tuple[FluxModel, Vae]:
        model = FluxModel("bench", copy.deepcopy(source).to(device))
        if speed != "eager":
            engine.speed_info = optimize_transformer(model.transformer, speed)
        release_freed_gpu_memory(device)
        mode_vae = copy.deepcopy(vae).to(device)
        optimize_vae(mode_vae, speed)
        return model, Vae("ae", mode_vae)

    pixels = image.permute(0, 2, 3, 1)  # ComfyUI's IMAGE
    from ryla import imaging

    reference_pil = imaging.to_pil(pixels)[0]  # what the pipeline's image processor takes
    for kind in args.kinds.split(","):
        if kind == "kontext":
            guidance = 2.5
            pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                       text_encoder_2=None, tokenizer_2=None, transformer=transformer)
            pipe.set_progress_bar_config(disable=True)

            def stock():
                return pipe(image=reference_pil, prompt_embeds=t5_embeds, pooled_prompt_embeds=pooled, height=size, width=size,
                            num_inference_steps=steps, sigmas=sigmas[:-1].tolist(), guidance_scale=guidance,
                            latents=packed_noise.clone(), output_type="pt", _auto_resize=False,
                            max_area=size * size).images
            source = transformer
        else:
            guidance = 30.0
            fill_config = {**transformer.config, "in_channels": 384, "out_channels": 64}
            with torch.device(device):
                torch.manual_seed(1)
                fill = FluxTransformer2DModel.from_config(
                    {k: v for k, v in fill_config.items() if not k.startswith("_")}).to(dtype).eval()
            pipe = FluxFillPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, transformer=fill)
            pipe.set_progress_bar_config(disable=True)

            def stock():
                return pipe(image=image, mask_image=mask, prompt_embeds=t5_embeds, pooled_prompt_embeds=pooled,
                            height=size, width=size, num_inference_steps=steps, sigmas=sigmas[:-1].tolist(),
                            guidance_scale=guidance, latents=packed_noise.clone(), output_type="pt").images
            source = fill
        with torch.inference_mode():
            stock_stats, stock_out = measure(stock)
        del pipe
        print(kind, "stock", json.dumps(stock_stats), flush=True)

        start = time.perf_counter()
        model, mode_vae = ryla_model(source)
        build_s = time.perf_counter() - start
        if kind == "fill":
            del fill, source
        cond = Cond(t5=t5_embeds, pooled=pooled, guidance=guidance)

        def ryla_image():
            if kind == "kontext":
                reference = engine.encode_image(mode_vae, pixels)
                conds = (cond.with_options(reference_latents=(reference,)),)
            else:  # InpaintModelConditioning: the masked image greyed out, and the image itself
                greyed = pixels * (1.0 - mask.permute(0, 2, 3, 1)) + 0.5 * mask.permute(0, 2, 3, 1)
                concat = engine.encode_image(mode_vae, greyed)
                conds = (cond.with_options(concat_latent_image=concat, concat_mask=mask),)
            latent = torch.zeros(1, 16, size // 8, size // 8)
            out = engine.sample(model, conds, None, latent, noise, sigmas, 1.0)
            return engine.decode(mode_vae, out)

        first_s = flux_speed.sync_time(ryla_image)[0]  # compiles for this shape
        ours, our_out = measure(ryla_image)
        # the same image? (bf16 rounding and attention kernels differ; a wrong input would be ~1)
        ours.update(build_s=build_s, first_image_s=first_s, speed_info=engine.speed_info,
                    rel_l2_vs_stock=flux_speed.rel_l2(our_out.permute(0, 3, 1, 2).float().cpu(),
                                                      stock_out.float().cpu()))
        results["kinds"][kind] = {"stock": stock_stats, "ryla_" + speed: ours,
                                  "ratio_vs_stock": ours["median_s"] / stock_stats["median_s"]}
        print(kind, speed, json.dumps(ours, default=str), "ratio", results["kinds"][kind]["ratio_vs_stock"], flush=True)
        del model, mode_vae
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "family_speed_tiny.json" if args.tiny else "family_speed.json"
    (out / name).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("wrote", out / name)


if __name__ == "__main__":
    main()
