"""Several GPUs behind one server (`ryla serve --gpus N --parallel context|replicas`).

* replicas: one engine per GPU in this process (Runtime's `replicas`), one work-queue worker
  each; a request runs whole on whichever GPU is free.
* context: every image computed by all N GPUs together (ryla.speed.context_parallel). One
  process per GPU, started here with torch.multiprocessing, joined by torch.distributed (NCCL
  on GPUs, gloo on CPUs). Rank 0 serves HTTP; for each job it sends the API graph and the
  request's images to the other ranks (over a gloo group, as Python objects), and every rank
  runs the same graph through the same executor: the text encoders, the sampler and the VAE
  run everywhere on identical inputs, the transformer's calls are split by tokens. The ranks
  must make the same calls in the same order; that holds because they run the same code on
  the same inputs, and cancellation is decided by rank 0 and broadcast at every check
  (SharedCancel), so all ranks stop at the same step.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ryla.runtime import RunResult, Runtime

log = logging.getLogger(__name__)

# NVLink SHARP (multicast) is off unless the user says otherwise: on the shared H200 hosts it
# is not available to containers, and NCCL's probe of it fails the whole group.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def gpu_devices(count: int) -> list[str]:
    if not torch.cuda.is_available():
        raise ValueError("--gpus needs CUDA GPUs; on a CPU, name devices with --devices (e.g. cpu,cpu)")
    if count > torch.cuda.device_count():
        raise ValueError(f"--gpus {count}: this machine has {torch.cuda.device_count()} GPU(s)")
    return [f"cuda:{index}" for index in range(count)]


class SharedCancel:
    """A cancel flag every rank reads alike: is_set() broadcasts rank 0's event, so the ranks
    stop at the same check. Every rank must call is_set() at the same points (same code, same
    inputs)."""

    def __init__(self, event: threading.Event, group) -> None:
        self.event, self.group = event, group

    def is_set(self) -> bool:
        flag = torch.tensor([1 if self.event.is_set() else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self.group)
        return bool(flag.item())

    def set(self) -> None:
        self.event.set()

    def clear(self) -> None:
        self.event.clear()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)


class ContextParallelRuntime(Runtime):
    """Rank 0's runtime in a context-parallel group: each execute() is mirrored on the others."""

    def __init__(self, *args, control_group, **kwargs):
        super().__init__(*args, **kwargs)
        self.control_group = control_group
        self._lock = threading.Lock()  # one job at a time through the group

    def execute(self, validated, context) -> RunResult:
        with self._lock:
            job = {"graph": validated.prompt, "images": dict(context.request_images),
                   "request_id": context.request_id}
            dist.broadcast_object_list([job], src=0, group=self.control_group)
            context.cancel = SharedCancel(context.cancel, self.control_group)
            return super().execute(validated, context)

    def describe_parallel(self) -> dict:
        parallel = self.engine.context_parallel
        return {"mode": "context", "devices": [f"rank {rank}" for rank in range(parallel.world)],
                "device": str(self.engine.device)}

    def stop_followers(self) -> None:
        dist.broadcast_object_list([None], src=0, group=self.control_group)


def _init_group(rank: int, world: int, port: int, backend: str):
    # MULTICAST_OFF is in the environment already: start_context_group sets it before the
    # children start, and they inherit it
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # Python objects (jobs) and the per-check cancel flag travel over gloo, on the CPU.
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return control


def _engine_options(rank: int, backend: str) -> dict[str, Any]:
    from ryla.speed.context_parallel import ContextParallel

    options: dict[str, Any] = {"context_parallel": ContextParallel.from_default_group()}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        options["device"] = f"cuda:{rank}"
    return options


def _preload(runtime: Runtime, preload: bool) -> None:
    """What rank 0's server does before it answers /health (ryla.api.app's lifespan): the
    same calls on every rank, since the transformer's warm-up runs the group's collectives."""
    from ryla.workflows import FLUX_DEV

    default_checkpoint = FLUX_DEV.graph["1"]["inputs"]["ckpt_name"]
    if preload and default_checkpoint in runtime.store.list("checkpoints"):
        runtime.engine.preload(default_checkpoint)


def _follower(index: int, world: int, port: int, backend: str, models_dir: str | None, speed: str,
              preload: bool, verbose: bool) -> None:
    """Ranks 1..N-1 (torch.multiprocessing numbers its children from 0): build the same runtime,
    then run every job rank 0 sends until it sends None."""
    rank = index + 1
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    control = _init_group(rank, world, port, backend)
    runtime = Runtime.open(models_dir, speed=speed, **_engine_options(rank, backend))
    _preload(runtime, preload)
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        job = message[0]
        if job is None:
            break
        context = runtime.context(request_id=job["request_id"], request_images=job["images"])
        context.cancel = SharedCancel(threading.Event(), control)
        try:
            runtime.run(job["graph"], context)
        except Exception as exc:  # rank 0 meets the same error on the same inputs and reports it
            log.info("[%s] rank %d: %s", job["request_id"], rank, exc)
    dist.destroy_process_group()


def start_context_group(world: int, models_dir: str | Path | None, speed: str, *, port: int | None = None,
                        backend: str | None = None, preload: bool = True,
                        verbose: bool = False) -> tuple[ContextParallelRuntime, Any]:
    """Start ranks 1..world-1 as processes and join them as rank 0. Returns rank 0's runtime
    and the processes' context (join it after stop_followers). `port`: the group's rendezvous
    on 127.0.0.1 [default: a free one]."""
    import socket

    import torch.multiprocessing as mp

    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)  # the children inherit them
    processes = mp.start_processes(_follower, args=(world, port, backend, str(models_dir) if models_dir else None,
                                                    speed, preload, verbose),
                                   nprocs=world - 1, join=False, start_method="spawn")
    control = _init_group(0, world, port, backend)
    options = _engine_options(0, backend)
    base = Runtime.open(models_dir, speed=speed, **options)
    runtime = ContextParallelRuntime(base.store, base.engine, control_group=control)
    return runtime, processes
