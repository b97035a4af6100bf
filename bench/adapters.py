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

after warm-up (each LoRA once, so each is converted and cached, and the originals of every
targeted layer saved). Reported: medians of the server's X-Generation-Time and of the wall
time, their ratios to base, and cycling's to same: what switching itself costs. The GPU's SM
clock and power draw are sampled during each arm (nvidia-smi, every 100 ms): with random
weights, a LoRA's changed values alone make the same kernels run slower (same vs base),
which the clocks show.

    python bench/adapters.py --out bench/results --work /tmp/adapters --speed exact,fast
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
RANK = 64
RUNS = {"base": 5, "same": 6, "cycling": 6, "stacked": 6}


def write_loras(store: Path) -> list[str]:
    """Three rank-64 LoRAs on all 494 block linears of FLUX.1-dev, PEFT key names, fp16 (as
    published files hold them), registered in the store without trigger words."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from ryla.flux.loading import _empty, _public, component_config
    from ryla.flux.lora import linear_shapes
    from ryla.models.loras import LoraStore

    transformer = _empty(lambda: FluxTransformer2DModel.from_config(_public(component_config("transformer", {}))))
    all_shapes = linear_shapes(transformer)
    shapes = {k: v for k, v in all_shapes.items() if "transformer_blocks." in k}
    loras = LoraStore(store / "loras", lambda: (all_shapes, {}))
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


def start(python: str, store: Path, cache: Path, speed: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RYLA_MODELS_DIR": str(store), "RYLA_COMPILE_CACHE": str(cache)}
    return subprocess.Popen([python, "-m", "ryla.cli.main", "serve", "--port", str(port), "--speed", speed,
                             "--timeout", "900"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> float:
    import httpx

    start_time = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return time.perf_counter() - start_time
        except httpx.HTTPError:
            time.sleep(0.5)


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
    proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                             "-lms", "100"], stdout=subprocess.PIPE, text=True)
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


def measure(url: str, ids: list[str]) -> dict:
    lora = lambda i: ("/flux-lora", {**REQUEST, "lora_id": ids[i % 3]})  # noqa: E731
    stack = lambda i: ("/flux-lora", {**REQUEST, "lora_id": ids[i % 3],  # noqa: E731
                                      "loras": [{"id": ids[(i + 1) % 3], "strength": 0.8}]})
    # warm-up: each LoRA converted and cached once, every targeted layer's original saved
    for body in [("/flux-dev", REQUEST)] * 2 + [lora(i) for i in range(3)] + [stack(0)]:
        post(url, *body)
    results = {"base": arm(url, [("/flux-dev", REQUEST)] * RUNS["base"]),
               "same": arm(url, [lora(0)] * RUNS["same"]),
               "cycling": arm(url, [lora(i) for i in range(RUNS["cycling"])]),
               "stacked": arm(url, [stack(i) for i in range(RUNS["stacked"])])}
    base = results["base"]
    for name in ("same", "cycling", "stacked"):
        results[name]["generation_ratio"] = results[name]["generation_median_s"] / base["generation_median_s"]
        results[name]["wall_ratio"] = results[name]["wall_median_s"] / base["wall_median_s"]
    results["switching_cost_ratio"] = results["cycling"]["generation_median_s"] / results["same"]["generation_median_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/adapters")
    parser.add_argument("--speed", default="exact,fast")
    parser.add_argument("--environment", choices=("product", "machine"), default="product")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "models"
    if not (store / "checkpoints" / "flux1-dev-fp8.safetensors").is_file():
        from cold_start import write_store

        print("wrote the store in", round(write_store(store), 1), "s", flush=True)
    ids = write_loras(store)
    if args.environment == "product":
        import product_env

        python = product_env.make(work / "product-env")["python"]
    else:
        python = sys.executable
    results_path = out / "adapters.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, request=REQUEST, rank=RANK,
                   layers=494, runs=RUNS)
    for speed in args.speed.split(","):
        log = out / f"adapters_serve_{speed}.log"
        proc = start(python, store, work / f"compile-cache-{speed}", speed, 8111, log)
        try:
            health = wait_healthy(proc, "http://127.0.0.1:8111", log)
            results[speed] = {"health_s": health, **measure("http://127.0.0.1:8111", ids)}
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        print(speed, json.dumps({k: v for k, v in results[speed].items()}), flush=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
