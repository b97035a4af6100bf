"""What holding the garbage collector back during start-up (ryla.startup) does to `ryla serve`.

Starts real `ryla serve` processes on the tiny model set, alternately as they are and with
ryla.startup's begin() and finish() made no-ops, and times process start -> /health answering
-> the first 64x64 image; reads the young generation's collections and the frozen objects from
/metrics once the server is up. Runs on a CPU.

    python bench/startup_gc.py --out bench/results --runs 6
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_start import wait_healthy  # noqa: E402  (the benches' one wait for a started server)

SERVE = ("import sys, ryla.startup as startup\n"
         "{patch}"
         "from ryla.cli.main import main\n"
         "sys.exit(main(sys.argv[1:]))")
NO_STARTUP_GC = "startup.begin = startup.finish = (lambda: None)\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def start_once(tiny: Path, held_back: bool) -> dict:
    port = free_port()
    env = dict(os.environ, RYLA_MODELS_DIR=tempfile.mkdtemp(), RYLA_TINY_MODELS_DIR=str(tiny),
               RYLA_DATA_DIR=tempfile.mkdtemp())
    code = SERVE.format(patch="" if held_back else NO_STARTUP_GC)
    log = Path(env["RYLA_DATA_DIR"]) / "serve.log"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", str(port)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, poll_s=0.05)
        health = time.perf_counter() - start  # from before the process started
        metrics = httpx.get(url + "/metrics").text
        response = httpx.post(url + "/flux-dev", json={"prompt": "a fox", "width": 64, "height": 64, "steps": 2},
                              timeout=300)
        response.raise_for_status()
        return {"health_s": health, "first_image_s": time.perf_counter() - start,
                "gen0_collections": metric(metrics, 'python_gc_collections_total{generation="0"}'),
                "frozen_objects": metric(metrics, "ryla_gc_frozen_objects")}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--runs", type=int, default=6, help="starts of each kind, alternating")
    args = parser.parse_args()
    from ryla.models.tiny import make_tiny_models

    tiny = Path(tempfile.mkdtemp()) / "tiny"
    make_tiny_models(tiny)
    runs: dict[str, list[dict]] = {"collector_as_is": [], "held_back": []}
    for _ in range(args.runs):
        for kind in runs:
            runs[kind].append(start_once(tiny, held_back=kind == "held_back"))
            print(kind, json.dumps(runs[kind][-1]), flush=True)
    summary = {kind: {"health_median_s": statistics.median(r["health_s"] for r in rs),
                      "first_image_median_s": statistics.median(r["first_image_s"] for r in rs),
                      "gen0_collections_at_health": rs[0]["gen0_collections"],
                      "frozen_objects": rs[0]["frozen_objects"], "runs": rs} for kind, rs in runs.items()}
    summary["machine"] = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    print(json.dumps({kind: {k: v for k, v in s.items() if k != "runs"} if isinstance(s, dict) else s
                      for kind, s in summary.items()}))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "startup_gc.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
