"""The runtime shared by `ryla generate`, `ryla serve` and the Modal app: one store, one
engine, one node registry, and the function that runs a workflow and returns images."""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ryla import imaging
from ryla.flux.engine import FluxEngine
from ryla.graph.executor import Executor, RunContext, ValidatedGraph
from ryla.graph.nodes import default_registry
from ryla.models.loras import LoraStore
from ryla.models.store import ModelStore, default_models_dir, default_tiny_dir
from ryla.models.tiny import ensure_tiny_models

log = logging.getLogger(__name__)


_announced_tiny = False


def open_store(models_dir: Path | str | None = None) -> ModelStore:
    """The store to serve from: the configured one when it holds FLUX weights, otherwise the
    embedded tiny random-weight model set (generated on first use), announced once. Decided
    here, above the store, which knows nothing of the tiny set's generator."""
    global _announced_tiny
    store = ModelStore(models_dir or default_models_dir())
    if store.has_flux_weights():
        return store
    tiny = ModelStore(ensure_tiny_models(default_tiny_dir()).root, tiny=True, user_root=store.root)
    if not _announced_tiny:
        _announced_tiny = True
        log.warning(
            "No FLUX.1-dev weights in %s: using the embedded TINY random-weight model from %s. "
            "Images will be noise. For real images run `ryla models download --preset flux-dev` "
            "or point RYLA_MODELS_DIR/--models-dir at a folder that has them.",
            store.root, tiny.root,
        )
    return tiny


def describe_model(store: ModelStore) -> str:
    """The model a LoRA is checked against, as a refusal names it."""
    if store.tiny:
        return (f"the tiny random-weight FLUX.1-dev stand-in ({store.user_root or store.root} has no FLUX weights), "
                "which LoRAs for the real model do not fit: `ryla loras make-example` writes one that does")
    return f"the FLUX transformer in {store.root}"


def model_label(store: ModelStore, name: str) -> str:
    """The model named in an image's parameters: the file, marked when it is the tiny stand-in."""
    return f"{name} (tiny random weights)" if store.tiny else name


def random_seed() -> int:
    # Below 2**53 so the seed survives JSON clients that parse numbers as doubles.
    return secrets.randbelow(2**53)


@dataclass
class RunResult:
    images: list[Image.Image]
    seconds: float
    node_seconds: dict[str, float] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)
    prefixes: list[str] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)  # the output node of each image


class Runtime:
    def __init__(self, store: ModelStore, engine: FluxEngine | None = None, replicas: list[FluxEngine] | None = None):
        self.store = store
        self.engine = engine or (replicas[0] if replicas else FluxEngine(store))
        # One engine per GPU (`ryla serve --parallel replicas`): each request runs whole on one;
        # the store, the LoRA store and the compile cache are shared.
        self.engines = list(replicas) if replicas else [self.engine]
        self.registry = default_registry()
        self.executor = Executor(self.registry)
        self.loras = LoraStore(store.folder("loras"), self.engine.lora_target_shapes, model=describe_model(store))

    @classmethod
    def open(cls, models_dir: Path | str | None = None, speed: str = "auto", devices: list[str] | None = None,
             **engine_options) -> Runtime:
        """The runtime for a models folder. speed "auto" is "exact" on a GPU, "eager" on a CPU;
        compiled kernels are cached beside the models (RYLA_COMPILE_CACHE overrides). With
        several `devices`, one engine on each (replicas)."""
        import torch

        from ryla.speed.modes import configure_compile_cache

        store = open_store(models_dir)
        if missing := store.missing_tokenizers():
            # Checked up front: otherwise the first request fails deep inside model loading.
            raise FileNotFoundError(f"{store.root} has FLUX weights but no tokenizers/{' or tokenizers/'.join(missing)}; "
                                    "run `ryla models download --preset flux-dev` (it fetches them)")
        if speed == "auto":
            speed = "exact" if torch.cuda.is_available() else "eager"
        if speed != "eager":
            configure_compile_cache(os.environ.get("RYLA_COMPILE_CACHE") or store.root / ".compile-cache")
        if devices and len(devices) > 1:
            return cls(store, replicas=[FluxEngine(store, device=device, speed=speed, **engine_options)
                                        for device in devices])
        if devices:
            engine_options["device"] = devices[0]
        return cls(store, FluxEngine(store, speed=speed, **engine_options))

    def describe_parallel(self) -> dict:
        """How this runtime spreads work over devices (/health)."""
        devices = [str(engine.device) for engine in self.engines]
        return {"mode": "replicas" if len(devices) > 1 else "single", "devices": devices}

    def context(self, **kwargs) -> RunContext:
        return RunContext(engine=self.engine, **kwargs)

    def validate(self, graph: dict, context: RunContext | None = None):
        return self.executor.validate(graph, context or self.context())

    def run(self, graph: dict, context: RunContext | None = None) -> RunResult:
        context = context or self.context()
        return self.execute(self.executor.validate(graph, context), context)

    def execute(self, validated: ValidatedGraph, context: RunContext) -> RunResult:
        start = time.perf_counter()
        outputs = self.executor.execute(validated, context)
        images, prefixes, node_ids = [], [], []
        for saved in outputs:
            for image in imaging.to_pil(saved.images):
                images.append(image)
                prefixes.append(saved.filename_prefix)
                node_ids.append(saved.node_id)
        seconds = time.perf_counter() - start
        # Each node's share, slowest first: where a slow request (the first after a start, one
        # with a new LoRA) spent its time, without a profiler.
        slowest = sorted(context.node_seconds.items(), key=lambda item: -item[1])
        log.info("[%s] workflow done: %d image(s) in %.2fs (%s)", context.request_id, len(images), seconds,
                 ", ".join(f"{validated.nodes[node_id][0].class_type} #{node_id} {spent:.2f}s"
                           for node_id, spent in slowest if spent >= 0.005))
        return RunResult(images, seconds, dict(context.node_seconds), dict(context.annotations), prefixes, node_ids)

