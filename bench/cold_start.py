"""Cold start and throughput of `ryla serve` on one GPU, with full-size random weights.

1. Writes a model store with the spec's files at full FLUX.1-dev size (random weights, the
   real layouts): checkpoints/flux1-dev-fp8.safetensors (all-in-one, fp8 transformer) and
   generated tokenizers.
2. Starts `ryla serve --speed MODE` twice, with an empty and then a warm compile cache, and
   times process start -> /health up (models loaded, transformer compiled for 1024x1024)
   -> first 1024x1024, 28-step image served.
3. On the warm server of the first mode: 5 requests back to back, then 5 concurrent
   clients; images per second.

The servers run in ryla's own environment (bench/product_env.py: only the packages that
`pip install ryla[gpu]` brings, linked from the machine's), as in ryla's image; `--environment
machine` runs them with the machine's whole set instead, optional extras such as peft included.

    python bench/cold_start.py --out bench/results --speed exact,fast
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

REQUEST = {"prompt": "a red fox in the snow", "width": 1024, "height": 1024, "steps": 28, "seed": 1,
           "output_format": "jpeg"}


def write_store(root: Path) -> float:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ryla.flux.loading import _public, component_config
    from ryla.models import formats
    from ryla.models.store import ModelStore
    from ryla.models.tiny import _write_tokenizers

    start = time.perf_counter()
    store = ModelStore(root)
    store.ensure_layout()
    _write_tokenizers(store)
    p = formats.CHECKPOINT_PREFIXES
    tensors = {}
    with torch.device("cuda"):
        transformer = FluxTransformer2DModel(**_public(component_config("transformer", {}))).to(torch.bfloat16)
    for k, v in formats.flux_transformer_to_bfl(transformer.state_dict()).items():
        tensors[p["transformer"] + k] = (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v).cpu()
    del transformer
    with torch.device("cuda"):
        vae = AutoencoderKL(**_public(component_config("vae", {})))
    for k, v in formats.vae_to_ldm(vae.state_dict(), 4).items():
        tensors[p["vae"] + k] = v.to(torch.bfloat16).cpu()
    with torch.device("cuda"):
        clip = CLIPTextModel(CLIPTextConfig(**_public(component_config("clip_l", {}))))
        t5 = T5EncoderModel(T5Config(**_public(component_config("t5xxl", {}))))
    for k, v in clip.state_dict().items():
        if "position_ids" not in k:
            tensors[p["clip_l"] + ("text_model." + k if not k.startswith("text_model.") else k)] = v.half().cpu()
    for k, v in t5.state_dict().items():
        if k != "encoder.embed_tokens.weight":
            tensors[p["t5xxl"] + k] = v.half().cpu()
    del vae, clip, t5
    torch.cuda.empty_cache()
    save_file(tensors, str(root / "checkpoints" / "flux1-dev-fp8.safetensors"))
    return time.perf_counter() - start


def compare_readers(path: Path) -> dict:
    """Seconds to put the transformer's 12 GB on the GPU: safetensors' own device= loading
    vs ryla's streamed reader (page cache warm for both: the file was just written)."""
    from safetensors import safe_open

    from ryla.models.tensor_files import read_tensors_streamed
    from ryla.models.formats import CHECKPOINT_PREFIXES

    prefix = CHECKPOINT_PREFIXES["transformer"]
    times = {}
    for name in ("safetensors", "streamed", "safetensors", "streamed"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if name == "safetensors":
            with safe_open(str(path), framework="pt", device="cuda") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        else:
            tensors, _ = read_tensors_streamed(path, prefix, "cuda")
        torch.cuda.synchronize()
        times.setdefault(name, []).append(time.perf_counter() - start)
        del tensors
        torch.cuda.empty_cache()
    return {name: min(t) for name, t in times.items()}


def start_server(python: str, store: Path, cache: Path, port: int, speed: str, log: Path,
                 extra_env: dict | None = None):
    env = {**os.environ, "RYLA_MODELS_DIR": str(store), "RYLA_COMPILE_CACHE": str(cache),
           "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    return subprocess.Popen([python, "-m", "ryla.cli.main", "serve", "--port", str(port), "--speed", speed,
                             "--timeout", "600"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, poll_s: float = 0.5,
                 limit_s: float | None = None) -> float:
    """Seconds from this call until `url`/health answers 200, polling every `poll_s`; the end
    of the server's log as the error if the process exits first or `limit_s` passes. (The
    benches' one way to wait for a server they started.)"""
    import httpx

    t0 = time.perf_counter()
    while limit_s is None or time.perf_counter() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(poll_s)
    raise RuntimeError("no /health in time:\n" + log.read_text()[-4000:])


def cold_start(python: str, store: Path, cache: Path, port: int, speed: str,
               log: Path, extra_env: dict | None = None) -> tuple[dict, subprocess.Popen]:
    import httpx

    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = start_server(python, store, cache, port, speed, log, extra_env)
    wait_healthy(proc, url, log, poll_s=0.2)
    health = time.perf_counter() - t0  # from before the process started
    r = httpx.post(url + "/flux-dev", json=REQUEST, timeout=900)
    r.raise_for_status()
    first = time.perf_counter() - t0
    return {"health_s": health, "first_image_s": first,
            "first_generation_s": float(r.headers["x-generation-time"])}, proc


# Where a start's time goes: the server log's milestones, in the order they come (each with the
# texts that mark it: run 18's server logged "ryla: serving", later ones "... model set from").
PHASE_MARKS = (("imports and opening the store", ("ryla: serving", "model set from")),
               ("importing the model code (reads alongside)", ("imported the model code",)),
               ("transformer: read, build, speed mode", ("loaded transformer",)),
               ("CLIP, T5, the VAE", ("loaded vae",)),
               ("compiling from the cache", ("compiled the transformer",)),
               ("warming T5 and the VAE", ("warmed the text encoders and the VAE",)),
               ("until /health answered", ("GET /health",)))


def startup_phases(log: Path, launched_at: float) -> dict[str, float]:
    """Seconds of each phase of a server start, from its log's timestamps (this machine's
    local time, as the server wrote them) and the wall-clock launch time."""
    import datetime

    marks: dict[str, float] = {}
    for line in log.read_text().splitlines():
        if not line[:4].isdigit():
            continue
        for phase, texts in PHASE_MARKS:
            if phase not in marks and any(text in line for text in texts):
                marks[phase] = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    phases, previous = {}, launched_at
    for phase, _ in PHASE_MARKS:
        if phase in marks:
            phases[phase] = round(marks[phase] - previous, 2)
            previous = marks[phase]
    return phases


def part_reads(log: Path) -> dict[str, float]:
    """Seconds each checkpoint part's read took, as the server logged it (the reads run in a
    background thread beside the imports, so these overlap the phases above)."""
    import re

    reads = {}
    for match in re.finditer(r"read \S+ \(([\w.]+)\): ([\d.]+) GB in ([\d.]+)s", log.read_text()):
        reads[match[1]] = float(match[3])
    return reads


def import_profile(log: Path, top: int = 15) -> dict:
    """Python's -X importtime lines in a server log, summed: total seconds of module
    execution, module count, and the packages that took most (own time of their modules)."""
    by_package: dict[str, int] = {}
    modules = 0
    for line in log.read_text().splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = line.split(":", 1)[1].split("|")
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0) + int(own)
        modules += 1
    ranked = sorted(by_package.items(), key=lambda item: -item[1])
    return {"total_s": round(sum(by_package.values()) / 1e6, 2), "modules": modules,
            "by_package_s": {name: round(us / 1e6, 2) for name, us in ranked[:top]}}


def throughput(port: int, n: int = 5) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}/flux-dev"

    def call(i):
        r = httpx.post(url, json={**REQUEST, "seed": i}, timeout=900)
        return r.status_code

    t = time.perf_counter()
    sequential = [call(i) for i in range(n)]
    sequential_s = time.perf_counter() - t
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        concurrent_codes = list(pool.map(call, range(n)))
    concurrent_s = time.perf_counter() - t
    return {"requests": n, "sequential_s": sequential_s, "concurrent_s": concurrent_s,
            "sequential_images_per_s": n / sequential_s, "concurrent_images_per_s": n / concurrent_s,
            "ratio": sequential_s / concurrent_s, "all_ok": set(sequential + concurrent_codes) == {200}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--speed", default="exact", help="speed mode, or a comma list (one store for all)")
    parser.add_argument("--work", default=None, help="folder for the store and caches [default: a temp dir]")
    parser.add_argument("--environment", choices=("product", "machine"), default="product",
                        help="run the servers with ryla's dependencies only (as its image has them) or with "
                             "all of this machine's packages [default: product]")
    parser.add_argument("--warm-starts", type=int, default=1,
                        help="launches with the warm compile cache; the median is reported [default: 1]")
    parser.add_argument("--throughput-requests", type=int, default=5,
                        help="requests of the throughput test on the first warm server; 0 skips it [default: 5]")
    parser.add_argument("--compare-readers", action=argparse.BooleanOptionalAction, default=True,
                        help="time safetensors' own GPU loading against ryla's reader [default: on]")
    parser.add_argument("--profile-imports", action="store_true",
                        help="one more warm start under python -X importtime (not in the median): where "
                             "the import time goes, by package")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every server started (repeatable)")
    parser.add_argument("--tag", default="", help="appended to the output files' names (cold_start_exact_TAG.json)")
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.server_env)
    suffix = f"_{args.tag}" if args.tag else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp())
    if args.environment == "product":
        import product_env

        environment = product_env.make(work / "product-env")
    else:
        environment = {"python": sys.executable, "left_out": []}
    print("environment", json.dumps(environment), flush=True)
    store = work / "models"
    write_store_s = write_store(store)
    size = (store / "checkpoints" / "flux1-dev-fp8.safetensors").stat().st_size
    reads = compare_readers(store / "checkpoints" / "flux1-dev-fp8.safetensors") if args.compare_readers else {}
    print("readers", json.dumps(reads), flush=True)
    for index, speed in enumerate(args.speed.split(",")):
        cache = work / f"compile-cache-{speed}"
        results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "speed": speed,
                   "request": REQUEST, "write_store_s": write_store_s, "checkpoint_gb": size / 1e9,
                   "transformer_read_s": reads, "environment": args.environment,
                   "left_out_of_environment": environment["left_out"], "server_env": server_env}
        print(json.dumps(results), flush=True)
        runs = {}
        # Repeated warm starts: on a shared machine one start's CPU-bound phases (imports,
        # compiling from the cache) vary by several seconds between launches.
        labels = ["cold_cache", "warm_cache"] + [f"warm_cache_{i}" for i in range(2, args.warm_starts + 1)]
        if args.profile_imports:
            labels.append("import_profile")
        for label in labels:
            log = out / f"serve_{speed}{suffix}_{label}.log"
            extra_env = {**server_env, **({"PYTHONPROFILEIMPORTTIME": "1"} if label == "import_profile" else {})}
            # Wall-clock launch time, to line up with the server log's timestamps.
            launched = time.time()
            stats, proc = cold_start(environment["python"], store, cache, 8101, speed, log, extra_env)
            runs[label] = {**stats, "launched_at": launched}
            runs[label]["phases_s"] = {**startup_phases(log, launched),
                                       "first image": round(stats["first_image_s"] - stats["health_s"], 2)}
            runs[label]["part_reads_s"] = part_reads(log)
            if label == "import_profile":
                runs[label]["imports"] = import_profile(log)
            print(speed, label, json.dumps(runs[label]), flush=True)
            if label == "warm_cache" and index == 0 and args.throughput_requests:
                results["throughput"] = throughput(8101, args.throughput_requests)
                print("throughput", json.dumps(results["throughput"]), flush=True)
            proc.terminate()
            proc.wait(timeout=60)
            # written after every start: a run cut short keeps what it measured
            (out / f"cold_start_{speed}{suffix}.json").write_text(json.dumps({**results, "cold_start": runs}, indent=2))
        warm = sorted(run["first_image_s"] for label, run in runs.items() if label.startswith("warm_cache"))
        # (the import-profiled start runs slower under the profiler: not in the median)
        runs["warm_cache_median_first_image_s"] = warm[len(warm) // 2]
        results["cold_start"] = runs
        (out / f"cold_start_{speed}{suffix}.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
