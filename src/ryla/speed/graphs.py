"""CUDA graphs of whole transformer steps, for the speed mode whose steps the host cannot launch
fast enough (`fast`).

Why: a `fast` step is ~2,000 kernels (~3,000 with InfuseNet for identity), each launched from
Python. On the H200 machines (gVisor, as Modal's are) a launch costs the host ~45 us, and fast's
kernels are short enough that the GPU waits for the host: under the profiler it idled 93 ms of
a 2.51 s plain image and 365 ms of a 3.37 s identity image (bench/results/README.md). A replayed
graph is one launch for the whole step (PyTorch's torch.cuda.CUDAGraph, its "whole network
capture" recipe in torch/cuda/graphs.py).

How a step is graphed:
- The caller hands over a step function and its inputs by name. The function may read only
  those inputs and module weights; every other thing it depends on (which modules, Python
  settings such as a ControlNet's strength) belongs in the caller's key.
- A key's first call runs eagerly (torch.compile may still compile for a new shape then, and
  compiling cannot be captured). Its second call captures: one run on the capture stream to
  warm it, then the capture into the graph's own memory pool, then a replay.
- Later calls copy their inputs into the graph's inputs (one _foreach_copy_) and replay.
- Weights are read where they lie. LoRA switches edit them in place (ryla.flux.lora), so a
  replay computes with the switched weights. A module whose tensors have moved gets new
  graphs: callers key on `storage_fingerprint`.
- The output is copied out of the graph's memory before it is returned: the next replay (the
  other CFG stream's, say) overwrites it.
- A capture that fails (an operation that cannot be captured) turns graphs off for this
  process with one warning, and the step runs eagerly.

A replay runs the same kernels on the same operands as the eager step, so the numbers are the
eager step's (the GPU check in bench/step_graphs_check.py compares them bit for bit).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Graphs kept per transformer (each holds its step's intermediate memory: ~1 GB at 1024x1024
# in fast mode): a plain and an identity step at two image sizes.
GRAPHS_KEPT = 4
# Keys seen once (run eagerly), waiting for their second call to be captured.
KEYS_SEEN = 64

Step = Callable[..., torch.Tensor]

# The speed modes whose steps are graphed. exact's steps are GPU-bound (and read their modulation
# rows through a lookup made at call time, ryla.speed.modulation); turbo's first-block cache
# decides per step, outside any graph.
GRAPHED_SPEED_MODES = ("fast",)
SETTING = "RYLA_CUDA_GRAPHS"


class StepGraphsSettingError(ValueError):
    """RYLA_CUDA_GRAPHS holds something other than 0 or 1."""


def step_graphs_wanted(speed: str, device: torch.device, context_parallel: bool) -> bool:
    """Whether an engine replays its steps from CUDA graphs: fast mode on one CUDA GPU, unless
    RYLA_CUDA_GRAPHS=0 (1 is the default)."""
    value = os.environ.get(SETTING, "1").strip()
    if value not in ("0", "1"):
        raise StepGraphsSettingError(f"{SETTING}={value!r}: 1 replays fast mode's steps from CUDA graphs (the "
                                     "default), 0 launches every kernel from Python")
    return value == "1" and speed in GRAPHED_SPEED_MODES and device.type == "cuda" and not context_parallel


def storage_fingerprint(*modules: torch.nn.Module | None) -> int:
    """Where the modules' parameters and buffers lie: equal as long as every weight is edited
    in place, as LoRA switches do."""
    return hash(tuple(tensor.data_ptr() for module in modules if module is not None
                      for tensor in itertools.chain(module.parameters(), module.buffers())))


def _put(entries: OrderedDict, key: Hashable, value, size: int) -> None:
    entries[key] = value
    while len(entries) > size:
        entries.popitem(last=False)


def _signature(inputs: dict[str, torch.Tensor | None]) -> tuple:
    return tuple((name, None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.device))
                 for name, tensor in sorted(inputs.items()))


@dataclass
class CapturedStep:
    replay: Callable[[], None]
    inputs: dict[str, torch.Tensor | None]  # the graph's own input tensors
    output: torch.Tensor  # where a replay writes the step's output


def capture_cuda_graph(step: Step, inputs: dict[str, torch.Tensor | None]) -> CapturedStep:
    """A CUDA graph of step(**inputs) over copies of the inputs (torch.cuda.graphs' recipe:
    warm on the capture stream, then capture)."""
    static = {name: None if tensor is None else tensor.clone() for name, tensor in inputs.items()}
    device = next(tensor.device for tensor in static.values() if tensor is not None)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step(**static)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's CUDA work (a decode's copy to the host) does not break
    # this capture, and this capture does not break it
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        output = step(**static)
    return CapturedStep(graph.replay, static, output)


class StepGraphs:
    """Captured steps of one transformer, by the caller's key and the inputs' shapes."""

    def __init__(self, capture: Callable[[Step, dict], CapturedStep] = capture_cuda_graph, size: int = GRAPHS_KEPT):
        self._capture = capture
        self._size = size
        # (the engine's lock serialises every call: these need none of their own)
        self._graphs: OrderedDict[Hashable, CapturedStep] = OrderedDict()
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self.disabled = False
        self.captures = 0
        self.replays = 0

    def run(self, key: Hashable, step: Step, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """step(**inputs), from a graph once this key has been seen before."""
        if self.disabled:
            return step(**inputs)
        full_key = (key, _signature(inputs))
        captured = self._graphs.get(full_key)
        if captured is None:
            if full_key not in self._seen:
                _put(self._seen, full_key, None, KEYS_SEEN)
                return step(**inputs)
            start = time.perf_counter()
            try:
                captured = self._capture(step, inputs)
            except Exception as exc:  # an operation that cannot be captured: eager from now on
                self.disabled = True
                self.clear()
                log.warning("CUDA graphs of the transformer step are off for this process: capturing failed (%s: %s)",
                            type(exc).__name__, exc)
                return step(**inputs)
            _put(self._graphs, full_key, captured, self._size)
            self.captures += 1
            log.info("captured the transformer step as a CUDA graph (%s) in %.2fs", key[0] if isinstance(key, tuple)
                     else key, time.perf_counter() - start)
        self._graphs.move_to_end(full_key)
        pairs = [(captured.inputs[name], tensor) for name, tensor in inputs.items() if tensor is not None]
        torch._foreach_copy_([static for static, _ in pairs], [tensor for _, tensor in pairs])
        captured.replay()
        self.replays += 1
        return captured.output.clone()

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._graphs)
