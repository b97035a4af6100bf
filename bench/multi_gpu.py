"""Several GPUs behind one `ryla serve`, over HTTP, full-size random weights, 1024x1024, 28 steps.

Each configuration is a real server started on the same store and compile cache:

  single-exact, single-fast        one GPU (the baseline of its mode)
  context-exact, context-fast      `--gpus N --parallel context`: each image on all N GPUs
  replicas-exact                   `--gpus N --parallel replicas`: one image per GPU

For each: seconds from launch to /health, then 2 warm-up requests and 5 timed ones (median of
the server's X-Generation-Time and of the client's wall time), and the first image kept, whose
relative L2 against the one-GPU image of the same mode is reported (same seed). For single-exact
and replicas-exact also images per second with 10 concurrent clients.

Results go to OUT/multi_gpu.json after every configuration (a run can be split over several
calls with --configs; the store and the compile cache stay in --work).

    python bench/multi_gpu.py --out bench/results --work /tmp/multi-gpu --gpus 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

REQUEST = {"prompt": "a red fox in the snow", "width": 1024, "height": 1024, "steps": 28, "seed": 1,
           "output_format": "png"}
CONFIGS = {
    "single-exact": ["--speed", "exact"],
    "single-fast": ["--speed", "fast"],
    "context-exact": ["--speed", "exact", "--parallel", "context"],
    "context-fast": ["--speed", "fast", "--parallel", "context"],
    "replicas-exact": ["--speed", "exact", "--parallel", "replicas"],
}
CLIENTS = 10


def start(config: str, gpus: int, store: Path, cache: Path, port: int, log: Path) -> subprocess.Popen:
    args = list(CONFIGS[config])
    if not config.startswith("single"):
        args += ["--gpus", str(gpus)]
    env = {**os.environ, "RYLA_MODELS_DIR": str(store), "RYLA_COMPILE_CACHE": str(cache),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    return subprocess.Popen([sys.executable, "-m", "ryla.cli.main", "serve", "--port", str(port), "--timeout", "900",
                             "--max-queue", "32", *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def request(url: str, seed: int = 1) -> tuple[float, float, bytes]:
    import httpx

    t = time.perf_counter()
    r = httpx.post(url + "/flux-dev", json={**REQUEST, "seed": seed}, timeout=900)
    r.raise_for_status()
    return time.perf_counter() - t, float(r.headers["x-generation-time"]), r.content


def images_per_second(url: str, clients: int = CLIENTS) -> float:
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: request(url, 100 + i), range(clients)))
    return clients / (time.perf_counter() - t)


def rel_l2(a: bytes, b: bytes) -> float:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(io.BytesIO(d))).astype(np.float64) for d in (a, b))
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/multi-gpu")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    store, cache = work / "store", work / "compile-cache"
    results_path = out / "multi_gpu.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not (store / "checkpoints" / "flux1-dev-fp8.safetensors").exists():
        from cold_start import write_store

        results["store_written_s"] = round(write_store(store), 1)
    import torch
    from cold_start import wait_healthy

    results["machine"] = {"gpus": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0),
                          "torch": torch.__version__}
    for config in args.configs.split(","):
        port = 18000 + list(CONFIGS).index(config)
        url = f"http://127.0.0.1:{port}"
        log = out / f"multi_gpu_{config}.log"
        launched = time.perf_counter()
        proc = start(config, args.gpus, store, cache, port, log)
        try:
            health_s = wait_healthy(proc, url, log, limit_s=900)
            warm = [request(url) for _ in range(2)]
            timed = [request(url) for _ in range(5)]
            entry = {"health_s": round(health_s, 1),
                     "generation_s": round(statistics.median(t[1] for t in timed), 3),
                     "wall_s": round(statistics.median(t[0] for t in timed), 3),
                     "generation_runs_s": [round(t[1], 3) for t in timed]}
            (work / f"{config}.png").write_bytes(warm[0][2])
            if config in ("single-exact", "replicas-exact"):
                entry["images_per_s"] = round(images_per_second(url), 3)
            results[config] = entry
        except Exception as exc:  # one configuration failing leaves the others' numbers
            results[config] = {"error": str(exc)[-2000:]}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            results.setdefault(config, {})["total_s"] = round(time.perf_counter() - launched, 1)
        mode = config.split("-")[1]
        if not config.startswith("single") and (work / f"single-{mode}.png").exists() and "error" not in results[config]:
            results[config]["rel_l2_vs_single"] = rel_l2((work / f"{config}.png").read_bytes(),
                                                         (work / f"single-{mode}.png").read_bytes())
            base = results.get(f"single-{mode}", {})
            if "generation_s" in base:
                results[config]["ratio_vs_single"] = round(results[config]["generation_s"] / base["generation_s"], 3)
            if "images_per_s" in base and "images_per_s" in results[config]:
                results[config]["throughput_vs_single"] = round(results[config]["images_per_s"] / base["images_per_s"], 3)
        results_path.write_text(json.dumps(results, indent=2))
        print(config, json.dumps(results[config]), flush=True)


if __name__ == "__main__":
    main()
