"""What a LoRA costs per request over HTTP: `ryla serve` on one GPU, full-size random weights,
1024x1024, 28 steps.

A character studio sends a different LoRA with nearly every request. Three rank-64 LoRAs cover
every linear layer of FLUX.1-dev's blocks (494 of them: q, k, v, the projections, the MLPs and
the modulations); the LoRAs have no trigger words, so every request has the same prompt and
the text encoders' cache serves all arms alike. Per speed mode, one server:

  base        5 x /flux-dev
  same        6 x /flux-lora with LoRA 1 every time (patched once: no switching)
  cycling     6 x /flux-lora, LoRA 1, 2, 3, 1, 2, 3 (a switch on every request)
  stacked     6 x /flux-lora with two LoRAs, (1+2), (2+3), (3+1), ...
  identity    6 x /flux-instantid with one reference photo (scikit-image's astronaut), an
              InfuseNet of InfiniteYou-FLUX's size (5 double + 10 single blocks) and its
              Resampler, random weights; YuNet finds the face and the model set's stand-in
              network embeds it (antelopev2 cannot be downloaded here)

  base_after  5 x /flux-dev again, after the other arms

after warm-up (each LoRA once and each stacked pair once, so each is converted and cached, the
originals of every targeted layer saved, and each set's switch plan made: ryla.flux.lora
SwitchPlan; a set's first request costs what a switch cost before plans, bench/lora_patch.py
fp8_grouped). Reported: medians of the server's X-Generation-Time and of the wall
time, their ratios to the mean of base's and base_after's medians (the clock drifts down as
the GPU warms under its power cap; bracketing keeps that drift out of the ratios; the ratios
to the first base alone are reported too), and cycling's to same: what switching itself costs. The GPU's SM
clock and power draw are sampled during each arm (nvidia-smi, every 100 ms): with random
weights, a LoRA's changed values alone make the same kernels run slower (same vs base),
which the clocks show.

    python bench/adapters.py --out bench/results --work /tmp/adapters --speed exact,fast
    python bench/adapters.py --tiny --environment machine --speed eager --out /tmp/a --work /tmp/a
                                                  # a CPU dry run on the tiny model set
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

REQUEST = {"prompt": "a portrait of a woman in a red coat, city street at dusk", "width": 1024, "height": 1024,
           "steps": 28, "seed": 1, "output_format": "jpeg"}
TINY_REQUEST = {**REQUEST, "width": 64, "height": 64, "steps": 2}
RANK = 64
RUNS = {"base": 5, "same": 6, "cycling": 6, "stacked": 6, "identity": 6}
TINY_RUNS = dict.fromkeys(RUNS, 2)
INFUSENET_BLOCKS = (5, 10)  # InfiniteYou-FLUX v1.0's InfuseNet: double and single blocks


def write_loras(store: Path) -> list[str]:
    """Three rank-64 LoRAs on all block linears of the store's transformer (494 in FLUX.1-dev),
    PEFT key names, fp16 (as published files hold them), registered in the store without
    trigger words."""
    from safetensors.torch import save_file

    from ryla.flux.loading import architecture_shapes
    from ryla.models.loras import LoraStore
    from ryla.models.store import ModelStore

    all_shapes, clip_shapes = architecture_shapes(ModelStore(store))
    shapes = {k: v for k, v in all_shapes.items() if "transformer_blocks." in k}
    loras = LoraStore(store / "loras", lambda: (all_shapes, clip_shapes))
    ids = []
    for index in range(3):
        lora_id = f"character-{index + 1}"
        if lora_id not in [entry["id"] for entry in loras.list()]:
            generator = torch.Generator().manual_seed(100 + index)
            tensors = {}
            for name, (out_features, in_features) in shapes.items():
                tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(RANK, in_features, generator=generator)
                                                               * 0.01).half()
                tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_features, RANK, generator=generator)
                                                               * 0.01).half()
            path = store / f"{lora_id}.safetensors"
            save_file(tensors, str(path))
            loras.add_file(path, lora_id)
            path.unlink()
        ids.append(lora_id)
    print(f"LoRAs: {len(shapes)} layers each, rank {RANK}", flush=True)
    return ids


def write_identity(store: Path, device: torch.device) -> None:
    """InfuseNet (controlnet/InfuseNetModel/, a diffusers FluxControlNetModel folder) with
    INFUSENET_BLOCKS at the store's transformer width, the Resampler (instantid/
    image_proj_model.bin, InfiniteYou's key names) and the face-embedding stand-in
    (insightface/), all random, in the layouts the server loads."""
    from diffusers import FluxControlNetModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import save_file

    from ryla.flux.loading import _public, component_config
    from ryla.identity.adapter import RESAMPLER, resampler_to_original
    from ryla.identity.faces import TINY_EMBEDDER, TinyFaceEmbedder
    from ryla.models.store import ModelStore
    from ryla.models.tiny import TINY_RESAMPLER, TINY_TRANSFORMER

    models = ModelStore(store)
    models.ensure_layout()
    tiny = models.tiny
    folder = models.folder("controlnet") / "InfuseNetModel"
    config = {k: v for k, v in (TINY_TRANSFORMER if tiny else _public(component_config("transformer", {}))).items()
              if not k.startswith("_")}
    config.update(num_layers=INFUSENET_BLOCKS[0], num_single_layers=INFUSENET_BLOCKS[1])
    keep = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        controlnet = FluxControlNetModel(**{k: config[k] for k in keep}).to(dtype)
        resampler = IPAdapterPlusImageProjection(**(TINY_RESAMPLER if tiny else RESAMPLER)).to(dtype)
    controlnet.save_pretrained(str(folder), safe_serialization=True)
    torch.save({"image_proj": {k: v.cpu() for k, v in resampler_to_original(resampler.state_dict()).items()}},
               models.folder("instantid") / "image_proj_model.bin")
    save_file(TinyFaceEmbedder().state_dict(), str(models.folder("insightface") / TINY_EMBEDDER))
    print(f"identity: InfuseNet {sum(p.numel() for p in controlnet.parameters()) / 1e9:.2f} B parameters", flush=True)


def reference_photo() -> str:
    """A real face (scikit-image's astronaut, bundled with the package), PNG in base64."""
    import base64
    import io

    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def start(python: str, store: Path, cache: Path, speed: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RYLA_MODELS_DIR": str(store), "RYLA_COMPILE_CACHE": str(cache)}
    return subprocess.Popen([python, "-m", "ryla.cli.main", "serve", "--port", str(port), "--speed", speed,
                             "--timeout", "900"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def post(url: str, path: str, body: dict) -> tuple[float, float]:
    """(server generation seconds, client wall seconds) of one request."""
    import httpx

    start_time = time.perf_counter()
    response = httpx.post(url + path, json=body, timeout=900)
    wall = time.perf_counter() - start_time
    if response.status_code != 200:
        raise RuntimeError(f"{path}: {response.status_code} {response.text[:500]}")
    return float(response.headers["x-generation-time"]), wall


def gpu_samples(stop) -> list[tuple[float, float]]:
    """(SM clock MHz, power W) every 100 ms until `stop` is set."""
    try:
        proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:  # no NVIDIA GPU (--tiny on a CPU)
        return []
    samples = []
    for line in proc.stdout:
        try:
            clock, power = (float(v) for v in line.split(","))
            samples.append((clock, power))
        except ValueError:
            pass
        if stop.is_set():
            break
    proc.terminate()
    return samples


def arm(url: str, bodies: list[tuple[str, dict]]) -> dict:
    import threading

    stop = threading.Event()
    box: list = []
    sampler = threading.Thread(target=lambda: box.extend(gpu_samples(stop)))
    sampler.start()
    try:
        runs = [post(url, path, body) for path, body in bodies]
    finally:
        stop.set()
        sampler.join()
    busy = [s for s in box if s[1] > 200] or box  # while generating
    generation = [g for g, _ in runs]
    wall = [w for _, w in runs]
    return {"generation_median_s": statistics.median(generation), "wall_median_s": statistics.median(wall),
            "generation_s": generation, "wall_s": wall,
            "sm_clock_median_mhz": statistics.median(c for c, _ in busy) if busy else None,
            "power_median_w": statistics.median(p for _, p in busy) if busy else None}


def measure(url: str, ids: list[str], request: dict, runs: dict, reference: str) -> dict:
    lora = lambda i: ("/flux-lora", {**request, "lora_id": ids[i % 3]})  # noqa: E731
    stack = lambda i: ("/flux-lora", {**request, "lora_id": ids[i % 3],  # noqa: E731
                                      "loras": [{"id": ids[(i + 1) % 3], "strength": 0.8}]})
    identity = ("/flux-instantid", {**request, "reference_image": reference})
    # warm-up: each LoRA converted and cached once, every targeted layer's original saved, and
    # each set of LoRAs the arms use met once (its switch plan made, as a studio's recurring
    # characters have theirs)
    for body in [("/flux-dev", request)] * 2 + [lora(i) for i in range(3)] + [stack(i) for i in range(3)]:
        post(url, *body)
    results = {"base": arm(url, [("/flux-dev", request)] * runs["base"]),
               "same": arm(url, [lora(0)] * runs["same"]),
               "cycling": arm(url, [lora(i) for i in range(runs["cycling"])]),
               "stacked": arm(url, [stack(i) for i in range(runs["stacked"])])}
    try:  # InfuseNet loaded (and compiled) and the reference's face analysis done, then the arm
        for body in [identity] * 2:
            post(url, *body)
        results["identity"] = arm(url, [identity] * runs["identity"])
    except RuntimeError as exc:  # reported, without losing the LoRA arms
        results["identity"] = {"error": str(exc)[:2000]}
    # The GPU's clock drifts as it warms under its power cap (1665 -> 1650 MHz within one run,
    # 2026-12-02): base is measured again after the other arms, and ratios are to the mean of
    # both medians, so the arms in between are not charged the drift. The first base alone
    # gives the *_vs_first_base ratios.
    results["base_after"] = arm(url, [("/flux-dev", request)] * runs["base"])
    first, after = results["base"], results["base_after"]
    base = {key: (first[key] + after[key]) / 2 for key in ("generation_median_s", "wall_median_s")}
    results["base_mean"] = base
    for name in ("same", "cycling", "stacked", "identity"):
        if "error" in results[name]:
            continue
        for kind in ("generation", "wall"):
            results[name][f"{kind}_ratio"] = results[name][f"{kind}_median_s"] / base[f"{kind}_median_s"]
            results[name][f"{kind}_ratio_vs_first_base"] = results[name][f"{kind}_median_s"] / first[f"{kind}_median_s"]
    results["switching_cost_ratio"] = results["cycling"]["generation_median_s"] / results["same"]["generation_median_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/adapters")
    parser.add_argument("--speed", default="exact,fast")
    parser.add_argument("--environment", choices=("product", "machine"), default="product")
    parser.add_argument("--tiny", action="store_true",
                        help="a dry run on the CPU: the tiny model set, 64x64, 2 steps, 2 requests an arm")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "models"
    request, runs = (TINY_REQUEST, TINY_RUNS) if args.tiny else (REQUEST, RUNS)
    if not (store / "checkpoints" / "flux1-dev-fp8.safetensors").is_file():
        if args.tiny:
            from ryla.models.tiny import make_tiny_models

            make_tiny_models(store)
        else:
            from cold_start import write_store

            print("wrote the store in", round(write_store(store), 1), "s", flush=True)
    ids = write_loras(store)
    if not (store / "controlnet" / "InfuseNetModel" / "config.json").is_file() or args.tiny:
        write_identity(store, torch.device("cpu" if args.tiny else "cuda"))
    if args.environment == "product":
        import product_env

        python = product_env.make(work / "product-env")["python"]
    else:
        python = sys.executable
    results_path = out / "adapters.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
                   request=request, rank=RANK, runs=runs)
    reference = reference_photo()
    for speed in args.speed.split(","):
        log = out / f"adapters_serve_{speed}.log"
        proc = start(python, store, work / f"compile-cache-{speed}", speed, 8111, log)
        try:
            from cold_start import wait_healthy

            health = wait_healthy(proc, "http://127.0.0.1:8111", log)
            results[speed] = {"health_s": health, **measure("http://127.0.0.1:8111", ids, request, runs, reference)}
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        print(speed, json.dumps({k: v for k, v in results[speed].items()}), flush=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
