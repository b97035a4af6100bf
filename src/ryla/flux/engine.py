"""The FLUX.1-dev engine: loads components once, encodes prompts, samples, decodes.

It knows nothing of HTTP or graphs; the graph nodes call it. Loaded models stay in memory
between runs (keyed by file and options), and prompt encodings are kept in a bounded LRU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ryla import imaging
from ryla.caches import LruCache
from ryla.flux import loading, samplers, sampling
from ryla.flux.components import Cond, Conditioning, ControlHint, ControlNet, FluxModel, LoraPatch, TextEncoder, Vae
from ryla.flux.lora import PlanMemorySettingError, WeightPatcher, linear_shapes, plan_memory_share_from_environment
from ryla.speed.graphs import (StepGraphs, StepGraphsSettingError, capture_cuda_graph, step_graphs_wanted,
                               storage_fingerprint)
from ryla.speed.modulation import ModulationPlan
from ryla.speed.modes import check_speed_mode, optimize_transformer, optimize_vae
from ryla.models import formats, gguf_files, tensor_files
from ryla.models.lora_format import convert
from ryla.models.store import ModelStore

log = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512  # diffusers' FluxPipeline default for FLUX.1-dev
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")

ProgressCallback = Callable[[int, int], None]

# A bad value in one of the engine's environment settings: FluxEngine() raises it, naming the setting.
SETTING_ERRORS = (PlanMemorySettingError, StepGraphsSettingError)


class Cancelled(Exception):
    """The caller gave up (client disconnected, time limit): stop sampling at the next step."""


class IncompatibleInputs(ValueError):
    """A request combines inputs the loaded model cannot take together (reference latents on a
    model with concatenated input channels, say): the client's choice, not a server fault."""


@dataclass
class EngineStats:
    loads: int = 0
    load_seconds: float = 0.0
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0


# What loading a checkpoint and a speed mode import on first use. They are imported late, so
# that `ryla --help`, a CPU `ryla generate` and the tests do not pay for them; a process that is
# snapshotted after its imports (Modal's memory snapshots) imports them before the snapshot.
MODEL_CODE = ("diffusers.models.transformers.transformer_flux", "diffusers.models.autoencoders.autoencoder_kl",
              "diffusers.loaders.single_file_utils", "transformers.models.auto.tokenization_auto",
              "transformers.models.clip.modeling_clip", "transformers.models.clip.tokenization_clip",
              "transformers.models.t5.modeling_t5", "transformers.models.t5.tokenization_t5",
              "ryla.speed.blocks", "ryla.speed.attention", "ryla.speed.vae_norms")
COMPILED_MODE_CODE = ("torch._dynamo", "torch._inductor.compile_fx", "torch._inductor.config",
                      "ryla.speed.inductor_heuristics", "ryla.speed.kernels")
FP8_MODE_CODE = ("ryla.speed.fp8_attention", "diffusers.hooks")


# The parts of an all-in-one checkpoint, in the order load_checkpoint builds them.
CHECKPOINT_PARTS = ("transformer", "clip_l", "t5xxl", "vae")
# Free GPU memory, in multiples of the checkpoint file's size, needed to read its parts ahead
# (FluxEngine._prefetch_fits).
PREFETCH_MEMORY_FACTOR = 2.5
# Control images' latents kept (FluxEngine.encode_control_image): ~1 MB each at 1024x1024.
CONTROL_LATENT_CACHE_SIZE = 8


def import_model_code(speed: str) -> list[str]:
    """Imports the code that loading FLUX and running `speed` will need, and nothing that
    touches a GPU. Returns the module names. (Triton, which ryla.speed.kernels imports, is
    skipped where it is not installed: speed modes then fall back to PyTorch's kernels.)"""
    import importlib

    check_speed_mode(speed)
    names = list(MODEL_CODE)
    if speed != "eager":
        names += COMPILED_MODE_CODE
    if speed in ("fast", "turbo"):
        names += FP8_MODE_CODE
    imported = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional kernel's dependency (Triton on a CPU machine):
            # its own import, where it is used, decides what happens without it
            log.debug("not imported ahead: %s (%s)", name, exc)
            continue
        imported.append(name)
    return imported


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is FLUX's native precision on GPUs; CPUs run float32 (bf16 matmuls are slow there).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class FluxEngine:
    def __init__(self, store: ModelStore, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, prompt_cache_size: int = 64, speed: str = "eager",
                 context_parallel=None):
        check_speed_mode(speed)
        self.store = store
        self.speed = speed
        # ryla.speed.context_parallel.ContextParallel: every rank of a group runs the same
        # requests, each transformer call computed on this rank's share of the tokens
        self.context_parallel = context_parallel
        if context_parallel is not None and speed not in ("exact", "fast"):
            raise ValueError(f"context parallel runs in the exact and fast speed modes, not {speed!r}: it needs "
                             "ryla's attention processors (and turbo's first-block cache decides per rank)")
        self.speed_info: dict = {"speed": speed}  # the transformer's speed mode and the VAE's (/health)
        self._vae_speed_info: dict = {}
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.stats = EngineStats()
        self._models: dict[tuple, object] = {}
        self._load_lock = threading.Lock()
        # one checkpoint load at a time: two first requests must not both prefetch 22 GB
        self._checkpoint_lock = threading.Lock()
        self._prompt_cache = LruCache(prompt_cache_size)  # (encoders, LoRAs, texts) -> Cond
        # Held while a module's weights are patched and used, and around every model call:
        # LoRA application and the model calls of one request never interleave with another's.
        self._use_lock = threading.RLock()
        self._patchers: dict[int, WeightPatcher] = {}
        # checked here, so a bad value stops the server at start rather than a request later
        self._plan_memory_share = plan_memory_share_from_environment()
        self._loras = LruCache(8)  # (file, version, model) -> LoraWeights
        # encode_control_image's latents: (VAE, width, height, picture digest) -> (VAE ref, latents)
        self._control_latents = LruCache(CONTROL_LATENT_CACHE_SIZE)
        self._target_shapes: tuple[dict, dict] | None = None
        # whole transformer steps replayed from CUDA graphs (ryla.speed.graphs): fast mode on one GPU
        self.step_graphs = step_graphs_wanted(speed, self.device, context_parallel is not None)
        self.step_graph_capture = capture_cuda_graph

    # ------------------------------------------------------------------ loading

    def _cached(self, key: tuple, build: Callable[[], object], release_memory: bool = True):
        with self._load_lock:
            if key not in self._models:
                start = time.perf_counter()
                self._models[key] = build()
                if release_memory:
                    release_freed_gpu_memory(self.device)
                elapsed = time.perf_counter() - start
                self.stats.loads += 1
                self.stats.load_seconds += elapsed
                log.info("loaded %s %s in %.2fs", key[0], key[1], elapsed)
            return self._models[key]

    def _optimized(self, transformer, compile: bool = True):
        self.speed_info = {**optimize_transformer(transformer, self.speed, compile=compile), **self._vae_speed_info}
        if self.context_parallel is not None:
            from ryla.speed.context_parallel import enable_context_parallel

            enable_context_parallel(transformer, self.context_parallel)
            self.speed_info["context_parallel"] = self.context_parallel.world
        return transformer

    def _optimized_vae(self, vae):
        self._vae_speed_info = optimize_vae(vae, self.speed)
        self.speed_info.update(self._vae_speed_info)
        return vae

    def loaded_models(self) -> list[str]:
        return sorted(f"{key[0]}:{key[1]}" for key in self._models)

    def load_checkpoint(self, name: str) -> tuple[FluxModel, TextEncoder, Vae]:
        """CheckpointLoaderSimple: an all-in-one file (transformer, CLIP-L, T5-XXL, VAE)."""
        path = self.store.resolve("checkpoints", name)
        with self._checkpoint_lock:
            missing = [part for part in CHECKPOINT_PARTS if _part_key(part, path) not in self._models]
            if missing and path.suffix in (".safetensors", ".sft"):
                # Another family's checkpoint (SD 1.x, SDXL, SD3) is named from its header
                # before anything is read
                names = tensor_files.tensor_names(path)
                prefix = formats.CHECKPOINT_PREFIXES["transformer"]
                if not any(key.startswith(prefix + "img_in.") for key in names):
                    other = formats.describe_other_model(names)
                    if other is not None:
                        raise tensor_files.ModelFormatError(f"{name} is not a FLUX checkpoint: it looks like {other}")
            with self._prefetched_parts(path, missing) as prefetched:
                transformer, clip, t5, vae = (self._checkpoint_part(name, path, part, prefetched)
                                              for part in CHECKPOINT_PARTS)
        if missing:  # once, after the parts read ahead have landed (releasing waits on the GPU)
            release_freed_gpu_memory(self.device)
        return (FluxModel(name, transformer), self._text_encoder(name, clip, t5), Vae(name, vae))

    @contextlib.contextmanager
    def _prefetched_parts(self, path, missing: list[str]):
        """The checkpoint's `missing` parts (not loaded yet), read in that order by one
        background thread while this one imports the code that builds and speeds them up. The
        imports are CPU work that holds the GIL; the reads mostly wait on the disk and the copy
        to the GPU, without it. A cold start then spends its read time (2.7 s of 21.8 GB on the
        H200 machines) inside the imports' time instead of after it. Yields component -> Future
        of read_tensors' result; the caller builds in the same order, so each waits only on its
        own read."""
        import concurrent.futures
        import contextvars

        if len(missing) < 2 or not self._prefetch_fits(path):  # nothing to overlap, or no room
            yield {}
            return
        reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ryla-prefetch")
        try:
            # each read in a copy of this context: its log lines keep the request id
            prefetched = {c: reader.submit(contextvars.copy_context().run, tensor_files.read_tensors, path,
                                           formats.CHECKPOINT_PREFIXES[c], self.device) for c in missing}
            start = time.perf_counter()
            import_model_code(self.speed)
            log.info("imported the model code for %s in %.2fs", self.speed, time.perf_counter() - start)
            yield prefetched
        finally:
            # after a failed build: no read left running, and unread parts never start
            reader.shutdown(wait=True, cancel_futures=True)

    def _prefetch_fits(self, path) -> bool:
        """Room on the GPU for the parts read ahead beside the transformer's build. That build
        holds the file's fp8 weights and their bf16 copies at once (~36 GB for FLUX.1-dev's fp8
        checkpoint); read ahead, T5's 9.5 GB join them: ~2.1x the file. Below
        PREFETCH_MEMORY_FACTOR x the file free (48 GB GPUs), parts are read one by one, as
        before, when each is built."""
        if self.device.type != "cuda":
            return True  # memory-mapped on a CPU: nothing is copied ahead
        free, _ = torch.cuda.mem_get_info(self.device)
        return free >= PREFETCH_MEMORY_FACTOR * path.stat().st_size

    def _checkpoint_part(self, name: str, path, component: str, prefetched: dict):
        prefix = formats.CHECKPOINT_PREFIXES[component]
        build = {"transformer": lambda *a, **k: self._optimized(loading.build_transformer(*a, **k)),
                 "clip_l": loading.build_clip, "t5xxl": loading.build_t5,
                 "vae": lambda *a, **k: self._optimized_vae(loading.build_vae(*a, **k))}[component]

        def load():
            read = prefetched.pop(component, None)
            tensors, meta = read.result() if read is not None else tensor_files.read_tensors(path, prefix, self.device)
            if not tensors:
                raise tensor_files.ModelFormatError(f"{name} has no {component} tensors (prefix {prefix!r})")
            return build(tensors, meta, self.dtype, self.device, what=f"{name} ({component})")

        return self._cached(_part_key(component, path), load, release_memory=False)

    def preload(self, name: str, width: int = 1024, height: int = 1024) -> None:
        """Load a checkpoint and, in a compiled speed mode, compile the transformer for one
        width x height image and warm the text encoders and the VAE, before serving: the first
        request then pays for none of it.
        (Compiling in a thread beside the loading was measured slower on the H200: both
        need the GIL, and the loader's many small steps waited on the compiler's.)"""
        model, text_encoder, vae = self.load_checkpoint(name)
        self.warm_up(model, width, height)
        self.warm_up_text_and_vae(text_encoder, vae, width, height)

    def warm_up(self, model: FluxModel, width: int = 1024, height: int = 1024) -> float:
        """One transformer step on zeros at this size, so torch.compile builds its kernels
        now rather than in a request (a no-op for uncompiled modes). Returns the seconds taken."""
        if "compiled" not in self.speed_info:
            return 0.0
        start = time.perf_counter()
        config = model.transformer.config
        cond = Cond(t5=torch.zeros(1, T5_MAX_LENGTH, config.joint_attention_dim, dtype=self.dtype),
                    pooled=torch.zeros(1, config.pooled_projection_dim, dtype=self.dtype))
        latent = torch.zeros(1, latent_channels(model.transformer), height // 8, width // 8)
        # With step graphs, a second step captures the step's graph (a key's first call runs
        # eagerly), so the first request replays it from its first step.
        sigmas = torch.tensor([1.0, 0.5, 0.0] if self.step_graphs else [1.0, 0.0])
        self.sample(model, (cond,), None, latent, latent, sigmas, 1.0)
        elapsed = time.perf_counter() - start
        log.info("compiled the transformer for %dx%d in %.2fs (%s)", width, height, elapsed, _compile_phases())
        return elapsed

    def warm_up_text_and_vae(self, text_encoder: TextEncoder, vae: Vae, width: int = 1024, height: int = 1024) -> float:
        """Encode the empty prompt and decode one width x height latent, in compiled modes. In
        bench run 17 the first image's text encoding took 0.44 s and its decode 0.29 s, against
        0.04-0.05 s for later decodes (kernels loaded, cuDNN's choices made, on first use): the
        first request would pay that. The empty prompt stays cached, as any prompt would."""
        if "compiled" not in self.speed_info:
            return 0.0
        start = time.perf_counter()
        self.encode(text_encoder, "")
        self.decode(vae, torch.zeros(1, vae.vae.config.latent_channels, height // 8, width // 8))
        elapsed = time.perf_counter() - start
        log.info("warmed the text encoders and the VAE for %dx%d in %.2fs", width, height, elapsed)
        return elapsed

    def load_diffusion_model(self, name: str, weight_dtype: str = "default") -> FluxModel:
        """UNETLoader: a transformer-only file (BFL keys, or diffusers' own), or a diffusers
        folder (config.json and its shards) in diffusion_models/."""
        if name in self.store.list_folders("diffusion_models"):
            path = self.store.resolve_folder("diffusion_models", name)
        else:
            path = self.store.resolve("diffusion_models", name)

        def load():
            if gguf_files.is_gguf(path):
                arch = gguf_files.architecture(path)
                if arch not in gguf_files.TRANSFORMER_ARCHITECTURES:
                    raise tensor_files.ModelFormatError(
                        f"{name} is not a FLUX transformer: it is {gguf_files.describe_architecture(arch)}")
            tensors, meta = self._read_weights(path)
            # The speed mode first: fusing QKV builds new layers, in the compute dtype. Not
            # compiled with fp8 storage: diffusers' per-layer casting (module.to in a hook)
            # cannot be traced into a graph (seen on the H200: torch.compile fails on it).
            fp8_storage = weight_dtype.startswith("fp8")
            model = self._optimized(loading.build_transformer(tensors, meta, self.dtype, self.device, what=name),
                                    compile=not fp8_storage)
            if fp8_storage:
                # Keep weights in fp8 in memory and upcast layer by layer for compute, as
                # ComfyUI's fp8 weight_dtype does: half the memory of bf16.
                storage = torch.float8_e5m2 if weight_dtype == "fp8_e5m2" else torch.float8_e4m3fn
                model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=self.dtype)
            return model

        return FluxModel(name, self._cached(("transformer", str(path), weight_dtype), load))

    def load_text_encoders(self, name1: str, name2: str) -> TextEncoder:
        """DualCLIPLoader (type flux): a CLIP-L and a T5-XXL file, in either order."""
        paths = {}
        for name in (name1, name2):
            path = self.store.resolve("text_encoders", name)
            paths[loading.detect_text_encoder(path)] = (name, path)
        if set(paths) != {"clip_l", "t5xxl"}:
            raise tensor_files.ModelFormatError(f"FLUX needs one CLIP-L and one T5 file, got {name1!r} and {name2!r}")
        builders = {"clip_l": loading.build_clip, "t5xxl": loading.build_t5}
        loaded = {}
        for component, (name, path) in paths.items():
            def load(path=path, name=name, build=builders[component]):
                tensors, meta = self._read_weights(path)
                return build(tensors, meta, self.dtype, self.device, what=name)
            loaded[component] = self._cached(_part_key(component, path), load)
        return self._text_encoder(f"{paths['clip_l'][0]}+{paths['t5xxl'][0]}", loaded["clip_l"], loaded["t5xxl"])

    def _read_weights(self, path) -> tuple[dict, dict]:
        """A transformer's or text encoder's file: safetensors, or GGUF (dequantised on the
        device into the compute dtype); or a diffusers folder: its shards' tensors, and its
        config.json as the config."""
        if path.is_dir():
            import json

            tensors: dict = {}
            for shard in sorted(path.glob("*.safetensors")):
                tensors.update(tensor_files.read_tensors(shard, device=self.device)[0])
            if not tensors:
                raise tensor_files.ModelFormatError(f"{path.name} has a config.json but no .safetensors weights")
            config = json.loads((path / "config.json").read_text())
            return tensors, {"configs": {"transformer": config}}
        if gguf_files.is_gguf(path):
            return gguf_files.read_gguf(path, self.device, self.dtype)
        return tensor_files.read_tensors(path, device=self.device)

    def load_vae(self, name: str) -> Vae:
        path = self.store.resolve("vae", name)

        def load():
            tensors, meta = tensor_files.read_tensors(path, device=self.device)
            return self._optimized_vae(loading.build_vae(tensors, meta, self.dtype, self.device, what=name))

        return Vae(name, self._cached(_part_key("vae", path), load))

    def _text_encoder(self, name: str, clip, t5) -> TextEncoder:
        folder = self.store.folder("tokenizers")
        clip_tok, t5_tok = (self._cached(("tokenizer", str(folder / kind)),
                                         lambda kind=kind: loading.load_tokenizer(folder / kind),
                                         release_memory=False)  # CPU objects
                            for kind in ("clip_l", "t5xxl"))
        return TextEncoder(name, clip, clip_tok, t5, t5_tok)

    # ------------------------------------------------------------------ LoRA

    def load_lora(self, name: str, strength_model: float, model: FluxModel,
                  strength_clip: float = 0.0, clip: TextEncoder | None = None) -> tuple[FluxModel, TextEncoder | None]:
        """LoraLoader: new handles with the LoRA added. The file is converted once per base
        model and kept in a bounded LRU, so switching among recent LoRAs reads no disk."""
        import dataclasses

        path = self.store.resolve("loras", name)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, id(model.transformer), id(clip.clip) if clip else None)
        weights = self._loras.get(key)
        if weights is None:
            tensors, _ = tensor_files.read_tensors(path, device=self.device)
            weights = convert(tensors, linear_shapes(model.transformer),
                              linear_shapes(clip.clip) if clip is not None else None).to(self.device)
            self._loras.put(key, weights)
        model = dataclasses.replace(model, loras=model.loras + (
            LoraPatch(name, str(path), stat.st_mtime_ns, strength_model, weights.transformer),))
        if clip is not None and weights.text_encoder:
            clip = dataclasses.replace(clip, loras=clip.loras + (
                LoraPatch(name, str(path), stat.st_mtime_ns, strength_clip, weights.text_encoder),))
        return model, clip

    # ------------------------------------------------------------------ identity

    def cached(self, key: tuple, build: Callable[[], object]):
        """Load-once for auxiliary models (face analysis, identity networks)."""
        return self._cached(key, build)

    def load_resampler(self, name: str):
        from ryla.identity.adapter import load_resampler

        path = self.store.resolve("instantid", name)
        return self._cached(("resampler", str(path)), lambda: load_resampler(path, self.device, self.dtype))

    def load_controlnet(self, name: str):
        """A diffusers-format FluxControlNetModel folder in controlnet/ (InfuseNet)."""
        from ryla.identity.adapter import load_infusenet

        folder = self.store.resolve_folder("controlnet", name)

        def load():
            controlnet = load_infusenet(folder, self.device, self.dtype)
            # The server's speed mode applies to InfuseNet too: its blocks are FLUX blocks,
            # and an eager InfuseNet beside a compiled transformer costs a third more per step.
            optimize_transformer(controlnet, self.speed, controlnet=True)
            return controlnet

        return self._cached(("controlnet", str(folder)), load)

    def load_controlnet_file(self, name: str) -> ControlNet:
        """ControlNetLoader on a single file in controlnet/: InstantX, Shakker-Labs Union or
        XLabs FLUX ControlNets (ryla.models.formats names the layouts)."""
        def build(*args, **kwargs):
            model, layout = loading.build_controlnet(*args, **kwargs)
            optimize_transformer(model, self.speed, controlnet=True)
            return model, layout

        model, layout = self._built_from_file("controlnet", name, build)
        return ControlNet(name, model, layout)

    def _built_from_file(self, kind: str, name: str, build: Callable):
        """A model of one file in the store's `kind` folder, built once by `build(tensors,
        ryla metadata, dtype, device, what=name)` and kept."""
        path = self.store.resolve(kind, name)

        def load():
            tensors, meta = tensor_files.read_tensors(path, device=self.device)
            return build(tensors, meta, self.dtype, self.device, what=name)

        return self._cached((kind, str(path)), load)

    def load_clip_vision(self, name: str):
        """CLIPVisionLoader: a SigLIP vision tower from clip_vision/ (FLUX.1 Redux's encoder)."""
        return self._built_from_file("clip_vision", name, loading.build_clip_vision)

    @torch.inference_mode()
    def encode_clip_vision(self, model, image: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """CLIPVisionEncode: IMAGE [B, H, W, C] -> the tower's last hidden state [B, tokens,
        width] (post-layernorm), what Redux projects."""
        config = model.config
        pixels = clip_vision_pixels(image, config.image_size, crop)
        with self._use_lock:
            out = model(pixel_values=pixels.to(self.device, model.dtype)).last_hidden_state
        return out.float().cpu()

    def load_style_model(self, name: str):
        """StyleModelLoader: FLUX.1 Redux's projection from style_models/."""
        return self._built_from_file("style_models", name, loading.build_redux)

    @torch.inference_mode()
    def redux_tokens(self, style_model, image_tokens: torch.Tensor) -> torch.Tensor:
        """StyleModelApply's tokens: Redux's projection of the SigLIP tokens, [B, tokens, T5 width]."""
        with self._use_lock:
            out = style_model(image_tokens.to(self.device, style_model.dtype)).image_embeds
        return out.float().cpu()

    @torch.inference_mode()
    def encode_control_image(self, vae, image, width: int, height: int) -> torch.Tensor:
        """A control image -> packed latents in model space (FluxControlNetPipeline's way).
        Kept per VAE, size and picture: an identity request without a pose image has a black
        control image, the same every time (InfiniteYou's pipeline), and a pose photo sent
        again draws the same keypoints, so a repeat skips a full-size VAE encode."""
        import hashlib
        import weakref

        import numpy as np

        from PIL import Image

        if image is None:
            image = Image.new("RGB", (width, height))
        pixels = np.asarray(image.resize((width, height), Image.BILINEAR).convert("RGB"))
        key = (id(vae), width, height, hashlib.sha256(pixels.tobytes()).digest())
        entry = self._control_latents.get(key)
        if entry is not None and entry[0]() is vae:  # the same VAE, not one at a reused id
            return entry[1]
        x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with self._use_lock:
            latents = vae.encode(x.to(self.device, vae.dtype)).latent_dist.mode()
        packed = sampling.pack_latents((latents.float() - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE)
        self._control_latents.put(key, (weakref.ref(vae), packed))
        return packed

    def _control_input(self, hint: ControlHint, h: int, w: int, padded_h: int, padded_w: int) -> torch.Tensor:
        """A hint's control image as its ControlNet takes it, for a latent of h x w, as
        comfy/controlnet.py ControlNet.get_control prepares it: scaled (nearest-exact, centre
        crop) to the latent's pixel size; for InstantX/Union VAE-encoded and put in model space
        (latent_format.process_in), then packed; for XLabs the pixels in -1..1 (its
        input_hint_block reads them). Odd latent sizes are padded to whole patches, as the
        latent is."""
        image = hint.image[..., :3].movedim(-1, 1).float()
        image = imaging.upscale(image, w * 8, h * 8, "nearest-exact", "center")
        if hint.controlnet.layout == formats.CONTROLNET_XLABS:
            pixels = image * 2.0 - 1.0
            if (padded_h, padded_w) != (h, w):
                pixels = torch.nn.functional.pad(pixels, (0, (padded_w - w) * 8, 0, (padded_h - h) * 8),
                                                 mode="circular")
            return pixels
        if hint.vae is None:
            raise IncompatibleInputs(f"the ControlNet {hint.controlnet.name} takes a VAE-encoded control image: "
                                     "connect a VAE to ControlNetApplyAdvanced's vae input")
        latent = self.encode_image(hint.vae, image.movedim(1, -1))
        return sampling.pack_latents(sampling.pad_to_patches(
            (latent - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE))

    def lora_target_shapes(self) -> tuple[dict, dict]:
        """Linear-layer shapes of the store's transformer and CLIP-L, from their configs on
        the meta device (no weights): what an uploaded LoRA is checked against."""
        if self._target_shapes is None:
            self._target_shapes = loading.architecture_shapes(self.store)
        return self._target_shapes

    def _patch(self, module: torch.nn.Module, patches: tuple[LoraPatch, ...]) -> None:
        """Make `module` carry exactly these patches (call with _use_lock held)."""
        patcher = self._patchers.get(id(module))
        if patcher is None:
            if not patches:
                return
            patcher = self._patchers[id(module)] = WeightPatcher(module, self._plan_memory_share)
        patcher.apply(tuple((p.path, p.version, p.strength) for p in patches),
                      [(p.weights, p.strength) for p in patches])

    # ------------------------------------------------------------------ text

    @torch.inference_mode()
    def encode(self, encoder: TextEncoder, text: str, t5_text: str | None = None) -> Cond:
        """CLIPTextEncode for FLUX: CLIP-L pooled vector + T5 token sequence (as diffusers'
        FluxPipeline.encode_prompt), cached by encoder and texts. `t5_text` gives T5 its own
        text (CLIPTextEncodeFlux's t5xxl beside its clip_l)."""
        t5_text = text if t5_text is None else t5_text
        key = (id(encoder.clip), id(encoder.t5), encoder.loras, text, t5_text)
        cached = self._prompt_cache.get(key)
        if cached is not None:
            self.stats.prompt_cache_hits += 1
            return cached
        self.stats.prompt_cache_misses += 1
        clip_ids = encoder.clip_tokenizer([text], padding="max_length", max_length=CLIP_MAX_LENGTH,
                                          truncation=True, return_tensors="pt").input_ids
        t5_ids = encoder.t5_tokenizer([t5_text], padding="max_length", max_length=T5_MAX_LENGTH,
                                      truncation=True, return_tensors="pt").input_ids
        with self._use_lock:
            self._patch(encoder.clip, encoder.loras)
            pooled = encoder.clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
            t5 = encoder.t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        cond = Cond(t5=t5.to(self.dtype), pooled=pooled.to(self.dtype))
        self._prompt_cache.put(key, cond)
        return cond

    # ------------------------------------------------------------------ sampling

    @torch.inference_mode()
    def sample(self, model: FluxModel, positive: Conditioning, negative: Conditioning | None,
               latent: torch.Tensor, noise: torch.Tensor | None, sigmas: torch.Tensor, cfg: float,
               callback: ProgressCallback | None = None, cancel: threading.Event | None = None,
               sampler: str = "euler", denoise_mask: torch.Tensor | None = None, seed: int = 0,
               mask_function=None, sampler_options: dict | None = None,
               denoised_out: list | None = None, middle: Conditioning | None = None, cfg2: float = 1.0,
               nested: bool = False) -> torch.Tensor:
        """Run a sampler, as comfy/samplers.py CFGGuider.inner_sample and KSAMPLER.sample do.
        `latent` and the result are in VAE latent space ([B,16,H/8,W/8]), as ComfyUI's LATENT;
        `noise` is ComfyUI's seeded noise (None: DisableNoise's zeros). `denoise_mask` (the
        latent's noise_mask, any size) repaints where it is 1 and keeps the latent where it is 0;
        `seed` seeds the noise that stochastic samplers add on the way; `sampler_options` are a
        sampler node's settings (SamplerEulerAncestral's eta, say). `denoised_out`, a list,
        receives the last step's denoised prediction (SamplerCustom's denoised_output).
        With `middle`, the guidance is DualCFGGuider's (comfy_extras/nodes_custom_sampler.py
        Guider_DualCFG): `positive` is its cond1, `middle` its cond2, `cfg` cfg_conds and `cfg2`
        cfg_cond2_negative, combined "regular"ly or `nested`."""
        if len(sigmas) < 2:
            return latent
        latent = latent.float()
        # An all-zero latent (an empty one) is not shifted into model space: ComfyUI's
        # inner_sample skips process_latent_in for it, so a denoise < 1 run from an empty latent
        # starts from zeros there too.
        x0 = ((latent - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE if torch.count_nonzero(latent) > 0
              else torch.zeros_like(latent))
        noise = torch.zeros_like(x0) if noise is None else noise.float()
        sigma0 = float(sigmas[0])
        x = (sigma0 * noise + (1.0 - sigma0) * x0).to(self.device)  # CONST.noise_scaling
        if middle is None:
            use_cfg = negative is not None and not _isclose(cfg, 1.0)
            streams = [("cond", positive)] + ([("uncond", negative)] if use_cfg else [])
        else:  # DualCFGGuider: like ComfyUI, a stream whose weight is exactly 1 is not computed
            use_negative = negative is not None and (nested or not _isclose(cfg2, 1.0))
            use_middle = use_negative or nested or not _isclose(cfg, 1.0)
            streams = ([("cond", positive)] + ([("mid", middle)] if use_middle else [])
                       + ([("uncond", negative)] if use_negative else []))
        mask = None
        if denoise_mask is not None:
            mask = sampling.latent_mask(denoise_mask, x.shape).to(self.device)
            if sampler == "ddim":
                # comfy/samplers.py: ddim is euler with inpaint_options {"random": True}, the masked
                # region's noise drawn from torch.manual_seed(seed + 1).
                generator = torch.Generator(device="cpu").manual_seed(seed + 1)
                noise = torch.randn(noise.shape, generator=generator, device="cpu")

        with self._use_lock:
            self._patch(model.transformer, model.loras)
            # after the LoRA patch: the modulation rows come from the patched weights
            plan = self._modulation_plan(model.transformer, x.shape[0], streams, sigmas)
            predict = self._velocity_fn(model, x.shape, plan, mask)
            schedule = [float(s) for s in sigmas]

            def velocity(x_t: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                # A sampler's intermediate sigma (dpm_2's midpoint) has no planned modulation rows.
                planned = step < len(schedule) and _isclose(sigma, schedule[step])
                key = step if planned else None
                v = {name: predict(x_t, sigma, conds, key, len(schedule) - 1, step, name) for name, conds in streams}
                if middle is None:
                    if "uncond" not in v:
                        return v["cond"]
                    return v["uncond"] + cfg * (v["cond"] - v["uncond"])
                # The weights of each combination sum to 1, so combining velocities is combining
                # ComfyUI's denoised predictions (denoised = x - sigma * v).
                if "mid" not in v:
                    return v["cond"]
                if nested:
                    text = v["mid"] + (v["cond"] - v["mid"]) * cfg
                    return v["uncond"] + cfg2 * (text - v["uncond"])
                base = v["mid"] if "uncond" not in v else v["uncond"] + (v["mid"] - v["uncond"]) * cfg2
                return base + (v["cond"] - v["mid"]) * cfg

            flow = samplers.FlowModel(velocity, shift=model.sampling_shift,
                                      denoise_mask=mask, latent=x0.to(self.device) if mask is not None else None,
                                      noise=noise.to(self.device) if mask is not None else None,
                                      mask_function=mask_function, seed=seed)
            try:
                x = samplers.SAMPLERS[sampler](flow, x, sigmas, callback, **(sampler_options or {}))
            finally:
                if plan is not None:
                    plan.close()
                if getattr(model.transformer, "is_cache_enabled", False):
                    model.transformer._reset_stateful_cache()  # first-block cache: per image
        if denoised_out is not None:
            denoised = flow.last_denoised()
            denoised_out.append(None if denoised is None else
                                (denoised / sampling.LATENT_SCALE + sampling.LATENT_SHIFT).cpu())
        last = float(sigmas[-1])
        if last != 0.0:
            x = x / (1.0 - last)  # CONST.inverse_noise_scaling, for a schedule that stops early
        return (x / sampling.LATENT_SCALE + sampling.LATENT_SHIFT).cpu()

    def _time_inputs(self, transformer, cond: Cond, sigma: float, batch: int):
        """The transformer's (timestep, guidance, pooled_projections) for one conditioning."""
        timestep = torch.full((batch,), sigma, device=self.device, dtype=self.dtype)
        guidance = cond.guidance if cond.guidance is not None else 3.5  # ComfyUI's default
        guidance_tensor = (torch.full((batch,), guidance, device=self.device, dtype=self.dtype)
                           if transformer.config.guidance_embeds else None)
        return timestep, guidance_tensor, cond.pooled.to(self.device).expand(batch, -1)

    def _modulation_plan(self, transformer, batch: int, streams: list[tuple[str, Conditioning]],
                         sigmas: torch.Tensor) -> ModulationPlan | None:
        """Every step's block modulations at once, where the speed mode routes them through
        ryla.speed.modulation (exact) and they fit in its MAX_PLAN_BYTES."""
        steps = len(sigmas) - 1
        calls = steps * sum(len(conds) for _, conds in streams)
        if not ModulationPlan.affordable(transformer, calls, batch, self.dtype):
            return None
        inputs = {(step, f"{name}{index}"): self._time_inputs(transformer, cond, float(sigmas[step]), batch)
                  for step in range(steps) for name, conds in streams for index, cond in enumerate(conds)}
        return ModulationPlan(transformer, inputs, self.dtype)

    def _velocity_fn(self, model: FluxModel, shape: torch.Size, plan: ModulationPlan | None = None,
                     denoise_mask: torch.Tensor | None = None):
        batch, channels, h, w = shape
        shift = model.sampling_shift
        transformer = model.transformer
        identity = model.identity
        ids: dict[tuple[int, int], torch.Tensor] = {}
        control = None
        identity_steps = None
        if identity is not None:
            control = self.encode_control_image(identity.vae, identity.control_image, (w + w % 2) * 8, (h + h % 2) * 8)
            identity_steps = identity.steps()  # InfuseNet's step-invariant inputs computed once a run
        # CUDA graphs of whole steps (fast mode): keyed on where the weights lie (ryla.speed.graphs)
        graphs = self._step_graphs(transformer)
        fingerprints = None
        if graphs is not None:
            fingerprints = (storage_fingerprint(transformer),
                            None if identity is None else storage_fingerprint(identity.controlnet))
        concats: dict[int, torch.Tensor | None] = {}
        hint_inputs: dict[tuple[int, int, int], torch.Tensor] = {}
        references: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def concat_channels(cond: Cond) -> torch.Tensor | None:
            """The channels FLUX.1 Fill, Canny and Depth take beside the latent, whole-latent
            sized, in model space; None for a model that takes the latent alone."""
            if id(cond) not in concats:
                concats[id(cond)] = model_concat(transformer, cond, (batch, channels, h, w), denoise_mask,
                                                 self.device, self.dtype)
            return concats[id(cond)]

        def reference_tokens(cond: Cond, padded_h: int, padded_w: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            """ReferenceLatent's images as extra tokens and their rope positions (Kontext)."""
            latents = cond.option("reference_latents")
            if not latents:
                return None
            key = (id(cond), padded_h, padded_w)
            if key not in references:
                if input_channels(transformer) != latent_channels(transformer):
                    raise IncompatibleInputs(
                        f"reference latents (ReferenceLatent) need a model that takes the latent alone, such as "
                        f"FLUX.1 Kontext; this one ({model.name}) takes {input_channels(transformer)} input channels")
                references[key] = sampling.reference_tokens(
                    [(latent.float() - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE for latent in latents],
                    cond.option("reference_latents_method", "offset"), padded_h, padded_w, self.device, self.dtype)
            return references[key]

        def transformer_velocity(x: torch.Tensor, sigma: float, cond: Cond, key, total: int, step: int,
                                 stream: str, box: tuple[int, int, int, int]) -> torch.Tensor:
            """The transformer's velocity for one conditioning entry, on x or a region of it
            (box: top, left, bottom, right). A model with concatenated input channels (Fill,
            Canny, Depth) gets them beside x, as comfy/model_base.py BaseModel._apply_model joins
            c_concat; a latent of odd height or width (an image size not a multiple of 16) is
            padded to whole 2x2 patches and the prediction cropped back, as
            comfy/ldm/flux/model.py does (common_dit.pad_to_patch_size, circular padding).
            Reference latents join the image tokens and are cut from the output, as that
            file's Flux._forward does with ref_latents."""
            part_h, part_w = x.shape[-2:]
            top, left, bottom, right = box
            whole = box == (0, 0, h, w)
            padded_h, padded_w = part_h + part_h % 2, part_w + part_w % 2
            extra = concat_channels(cond)
            model_input = x if extra is None else torch.cat(
                [x.to(self.device), extra[:, :, top:bottom, left:right].to(self.device, x.dtype)], dim=1)
            if (padded_h, padded_w) not in ids:
                ids[(padded_h, padded_w)] = sampling.latent_image_ids(padded_h, padded_w, self.device, self.dtype)
            img_ids = ids[(padded_h, padded_w)]
            packed = sampling.pack_latents(sampling.pad_to_patches(model_input)).to(self.device, self.dtype)
            image_tokens = packed.shape[1]
            hidden_states = packed
            refs = reference_tokens(cond, padded_h, padded_w)
            if refs is not None:
                hidden_states = torch.cat([packed, refs[0].expand(batch, -1, -1)], dim=1)
                img_ids = torch.cat([img_ids, refs[1]], dim=0)
            txt_ids = torch.zeros(cond.t5.shape[1], 3, device=self.device, dtype=self.dtype)
            timestep, guidance_tensor, pooled = self._time_inputs(transformer, cond, sigma, batch)
            kwargs = dict(
                hidden_states=hidden_states,
                encoder_hidden_states=cond.t5.to(self.device).expand(batch, -1, -1),
                pooled_projections=pooled,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance_tensor,
                return_dict=False,
            )
            use_identity = whole and identity is not None and identity.active(step, total)
            # ControlNetApplyAdvanced's hints act on the whole latent only (not on an area's part)
            hints = [hint for hint in (cond.option("controls", ()) if whole else ())
                     if _hint_active(hint, sigma, shift)]
            # ControlNets see the latent alone, and their residuals land on the image tokens
            latent_tokens = None if not (use_identity or hints) else (
                packed if extra is None else sampling.pack_latents(sampling.pad_to_patches(x)).to(self.device, self.dtype))
            if graphs is not None and plan is None and not hints and refs is None:
                out = self._graphed_step(graphs, transformer, kwargs, identity_steps if use_identity else None,
                                         latent_tokens, control, ids[(padded_h, padded_w)], pooled, batch, fingerprints)
                if out is not None:
                    return sampling.unpack_latents(out[:, :image_tokens].float(), padded_h, padded_w)[:, :, :part_h, :part_w]
            if use_identity or hints:
                parts = []
                if use_identity:
                    parts.append((identity_steps(latent_tokens, control, timestep, ids[(padded_h, padded_w)],
                                                 guidance_tensor, pooled, batch), formats.CONTROLNET_INSTANTX))
                for hint in hints:
                    if (id(hint), padded_h, padded_w) not in hint_inputs:
                        hint_inputs[(id(hint), padded_h, padded_w)] = self._control_input(hint, h, w, padded_h,
                                                                                          padded_w)
                    parts.append((_control_residuals(hint, hint_inputs[(id(hint), padded_h, padded_w)],
                                                     latent_tokens, cond, timestep, guidance_tensor, pooled,
                                                     ids[(padded_h, padded_w)]), hint.controlnet.layout))
                residuals = _merge_residuals(parts, len(transformer.transformer_blocks),
                                             len(transformer.single_transformer_blocks))
                kwargs.update(_pad_residuals(residuals, hidden_states.shape[1]))
            if plan is not None:
                plan.select((key, stream))
            # First-block caching (turbo) keeps one cache per conditioning stream.
            with _cache_context(transformer, stream):
                out = transformer(**kwargs)[0][:, :image_tokens]
            return sampling.unpack_latents(out.float(), padded_h, padded_w)[:, :, :part_h, :part_w]

        def predict(x: torch.Tensor, sigma: float, conds: Conditioning, key: int | None, total: int,
                    step: int, name: str) -> torch.Tensor:
            active = [(index, cond) for index, cond in enumerate(conds) if _active_at(cond, sigma, shift)]
            if not active:
                # comfy/samplers.py calc_cond_batch: no entry in its timestep range leaves the
                # denoised prediction at zero, whose velocity is x / sigma.
                return x / sigma
            if all(cond.option("area") is None and cond.option("strength", 1.0) == 1.0 for _, cond in active):
                outputs = [transformer_velocity(x, sigma, cond, key, total, step, f"{name}{index}", (0, 0, h, w))
                           for index, cond in active]
                return torch.stack(outputs).mean(0) if len(outputs) > 1 else outputs[0]
            # calc_cond_batch with areas and strengths: each entry predicts its region, weighted
            # by its strength with feathered inner edges (get_area_and_mult); the weighted mean
            # of denoised predictions is the same weighted mean of velocities where the weights
            # cover a pixel, and zero (velocity x / sigma) where none does.
            total_v = torch.zeros_like(x)
            weights = torch.zeros_like(x)
            for index, cond in active:
                top, left, bottom, right = _area_box(cond.option("area"), h, w)
                if bottom <= top or right <= left:
                    continue
                region = (slice(None), slice(None), slice(top, bottom), slice(left, right))
                v = transformer_velocity(x[region], sigma, cond, key, total, step, f"{name}{index}",
                                         (top, left, bottom, right))
                mult = _area_weights(v.shape, (top, left, bottom, right), h, w, float(cond.option("strength", 1.0)),
                                     v.device)
                total_v[region] += v * mult
                weights[region] += mult
            covered = weights > 0
            return torch.where(covered, total_v / torch.where(covered, weights, torch.ones_like(weights)), x / sigma)

        return predict

    def _step_graphs(self, transformer) -> StepGraphs | None:
        """The transformer's captured steps, where this engine replays steps from CUDA graphs."""
        if not self.step_graphs:
            return None
        graphs = getattr(transformer, "_ryla_step_graphs", None)
        if graphs is None:
            graphs = transformer._ryla_step_graphs = StepGraphs(capture=self.step_graph_capture)
        return None if graphs.disabled else graphs

    def _graphed_step(self, graphs: StepGraphs, transformer, kwargs: dict, identity_steps, latent_tokens, control,
                      img_ids, pooled, batch: int, fingerprints: tuple) -> torch.Tensor | None:
        """The transformer's output for one call, from a CUDA graph where one is kept (or kept
        from this call on); None where this call's kind is not graphed (a ControlNet that its
        forward treats otherwise)."""
        inputs = {name: kwargs[name] for name in STEP_INPUTS}
        if identity_steps is None:
            return graphs.run(("plain", fingerprints[0]), _plain_step(transformer), inputs)
        fixed = identity_steps.prepared(latent_tokens, control, img_ids, pooled, batch)
        if fixed is None:
            return None
        if latent_tokens is not kwargs["hidden_states"]:
            inputs["latent_tokens"] = latent_tokens
        inputs.update(fixed)
        controlnet, strength = identity_steps.adapter.controlnet, identity_steps.adapter.strength
        key = ("identity", fingerprints[0], id(controlnet), fingerprints[1], strength)
        return graphs.run(key, _identity_step(transformer, identity_steps.step_residuals, controlnet, strength), inputs)

    # ------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def encode_image(self, vae: Vae, pixels: torch.Tensor, cancel: threading.Event | None = None) -> torch.Tensor:
        """VAEEncode: IMAGE [B, H, W, C] in 0..1 -> LATENT samples, as ComfyUI's VAE.encode does
        it: the first three channels, cropped to whole 8-pixel blocks around the centre
        (vae_encode_crop_pixels), scaled to -1..1, the posterior's mode (its
        DiagonalGaussianRegularizer does not sample). One image at a time, as decode."""
        pixels = pixels[..., :3]
        for dim in (1, 2):
            size = pixels.shape[dim]
            whole = (size // 8) * 8
            if whole != size:
                pixels = pixels.narrow(dim, (size % 8) // 2, whole)
        latents = []
        for index in range(pixels.shape[0]):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            x = pixels[index:index + 1].movedim(-1, 1).float() * 2.0 - 1.0
            with self._use_lock:
                posterior = vae.vae.encode(x.to(self.device, vae.vae.dtype)).latent_dist
                latents.append(posterior.mode().float().cpu())
        return torch.cat(latents)

    @torch.inference_mode()
    def decode(self, vae: Vae, latent: torch.Tensor, cancel: threading.Event | None = None) -> torch.Tensor:
        """VAEDecode: LATENT -> IMAGE, ComfyUI's [B, H, W, 3] float in 0..1. One image at a
        time: the decoder's activations of a large batch would multiply its peak memory, and a
        cancelled request stops between images."""
        images = []
        for index in range(latent.shape[0]):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            # Under the same lock as sampling: two threads computing at once can make CPU kernels
            # split reductions differently, and the same request must give the same bytes.
            with self._use_lock:
                pixels = vae.vae.decode(latent[index:index + 1].to(self.device, vae.vae.dtype), return_dict=False)[0]
            images.append((pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        return torch.cat(images)

    @staticmethod
    def vae_latent_channels(vae: Vae) -> int:
        return int(vae.vae.config.latent_channels)


def latent_channels(transformer) -> int:
    """The latent's channels (16 for every FLUX.1): the transformer's output, unpatched."""
    config = transformer.config
    return int(config.out_channels or config.in_channels) // 4


def input_channels(transformer) -> int:
    """The transformer's input channels, unpatched: the latent's 16, plus 16 for FLUX.1 Canny and
    Depth (the control image's latent), plus 16 + 64 for FLUX.1 Fill (the masked image's latent
    and the mask, 8x8 pixels per latent pixel)."""
    return int(transformer.config.in_channels) // 4


def model_concat(transformer, cond: Cond, shape, denoise_mask: torch.Tensor | None, device,
                 dtype) -> torch.Tensor | None:
    """comfy/model_base.py Flux.concat_cond: for a model with more input channels than the
    latent has, InpaintModelConditioning's or InstructPixToPixConditioning's image latent
    (zeros without one), scaled to the latent's size, in model space; for Fill's 384-wide
    input also the mask (concat_mask, else the latent's noise mask, else all ones), averaged over
    channels, scaled to the image's pixels and folded 8x8 into 64 channels."""
    batch, _, h, w = shape
    wanted, latent = input_channels(transformer), latent_channels(transformer)
    if wanted <= latent:
        return None
    image = cond.option("concat_latent_image")
    image = torch.zeros(batch, latent, h, w) if image is None else image.float()
    if tuple(image.shape[-2:]) != (h, w):
        image = imaging.upscale(image, w, h, "bilinear", "center")
    image = (sampling.repeat_to_batch(image, batch) - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE
    if image.shape[1] != latent:
        raise IncompatibleInputs(f"the conditioning image latent has {image.shape[1]} channels; this model's latent "
                                 f"has {latent}")
    parts = [image]
    if wanted > 2 * latent:  # the inpainting model
        mask = cond.option("concat_mask", denoise_mask)
        mask = torch.ones(batch, 1, h, w) if mask is None else mask.float().cpu()
        if mask.ndim < 4:  # a MASK [B, H, W] or [H, W]
            mask = mask.reshape(-1, 1, *mask.shape[-2:])
        mask = mask.mean(dim=1, keepdim=True)
        mask = imaging.upscale(mask, w * 8, h * 8, "bilinear", "center")
        mask = mask.view(mask.shape[0], h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(mask.shape[0], 64, h, w)
        parts.append(sampling.repeat_to_batch(mask, batch))
    out = torch.cat(parts, dim=1)
    if out.shape[1] != wanted - latent:
        raise IncompatibleInputs(f"this model takes {wanted} input channels; the conditioning gives "
                                 f"{latent + out.shape[1]}")
    return out.to(device, dtype)


# SigLIP's pixel normalisation (comfy/clip_vision.py's config for it; CLIP's own differs)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def clip_vision_pixels(image: torch.Tensor, size: int, crop: bool = True) -> torch.Tensor:
    """comfy/clip_model.py clip_preprocess for SigLIP: IMAGE [B, H, W, C] in 0..1 scaled
    (bicubic, antialiased) so its short side is `size` and centre-cropped (crop), or squashed
    to size x size; rounded to 8-bit levels; normalised with mean and std 0.5."""
    pixels = image[..., :3].movedim(-1, 1).float()
    if pixels.shape[2] != size or pixels.shape[3] != size:
        if crop:
            scale = size / min(pixels.shape[2], pixels.shape[3])
            target = (round(scale * pixels.shape[2]), round(scale * pixels.shape[3]))
        else:
            target = (size, size)
        pixels = torch.nn.functional.interpolate(pixels, size=target, mode="bicubic", antialias=True)
        top, left = (pixels.shape[2] - size) // 2, (pixels.shape[3] - size) // 2
        pixels = pixels[:, :, top:top + size, left:left + size]
    pixels = torch.clip(255.0 * pixels, 0, 255).round() / 255.0
    mean = torch.tensor(SIGLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SIGLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _hint_active(hint: ControlHint, sigma: float, shift: float) -> bool:
    """comfy/controlnet.py ControlNet.get_control: a hint is off when sigma lies outside its
    [start_percent, end_percent] of the schedule, as sigmas (ModelSamplingFlux.percent_to_sigma)."""
    if hint.start <= 0.0 and hint.end >= 1.0:
        return True
    return not (sigma > samplers.percent_to_sigma(shift, hint.start) or sigma < samplers.percent_to_sigma(shift, hint.end))


@contextlib.contextmanager
def _union_mode(model, on: bool):
    """A Union ControlNet without a control type (SetUnionControlNetType's `auto`): ComfyUI's
    ControlNetFlux then leaves the mode token out; diffusers' FluxControlNetModel insists on one
    while its `union` flag is set, so the flag is lowered for the call."""
    union = getattr(model, "union", False)
    if not union or on:
        yield
        return
    model.union = False
    try:
        yield
    finally:
        model.union = union


def _control_residuals(hint: ControlHint, control_input: torch.Tensor, latent_tokens: torch.Tensor, cond: Cond,
                       timestep, guidance, pooled, img_ids) -> dict:
    """One ControlNet's residuals for one conditioning entry, scaled by its strength, called as
    diffusers' FluxControlNetPipeline calls it (the Union mode as a (batch, 1) index)."""
    controlnet = hint.controlnet
    model = controlnet.model
    batch = latent_tokens.shape[0]
    device, dtype = latent_tokens.device, latent_tokens.dtype
    mode = None
    if controlnet.modes and controlnet.union_mode is not None:
        mode = torch.full((batch, 1), controlnet.union_mode, device=device, dtype=torch.long)
    with _union_mode(model, mode is not None):
        blocks, single = model(
            hidden_states=latent_tokens,
            controlnet_cond=sampling.repeat_to_batch(control_input, batch).to(device, dtype),
            controlnet_mode=mode,
            conditioning_scale=hint.strength,
            encoder_hidden_states=cond.t5.to(device, dtype).expand(batch, -1, -1),
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=torch.zeros(cond.t5.shape[1], 3, device=device, dtype=dtype),
            guidance=guidance if model.config.guidance_embeds else None,
            return_dict=False,
        )
    return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single}


def _compile_phases(top: int = 6) -> str:
    """torch.compile's own timings so far (torch._dynamo.utils.compile_times, seconds summed per
    timed function, the longest first): where a start's compiling went. They nest (Dynamo's
    whole compile holds Inductor's), so they do not add up."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:
        return "no timings"
    totals = sorted(((sum(values), name) for name, values in compilation_time_metrics.items()), reverse=True)
    timings = ", ".join(f"{name} {seconds:.2f}s" for seconds, name in totals[:top]) or "nothing compiled"
    # hits, misses and bypasses of AOTAutograd's and Inductor's on-disk caches
    caches = {name: count for group in ("aot_autograd", "inductor") for name, count in counters[group].items()
              if "cache" in name}
    return f"{timings}; caches {caches}"


# The transformer call's tensor arguments that a graphed step copies in (ryla.speed.graphs)
STEP_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
               "guidance")


def _plain_step(transformer):
    """A transformer call as a function of its tensors alone."""
    def step(**inputs):
        return transformer(**inputs, return_dict=False)[0]
    return step


def _identity_step(transformer, step_residuals, controlnet, strength: float):
    """InfuseNet's residuals (ryla.identity.adapter.InfuseNetSteps.step_residuals) and the
    transformer call that adds them, as a function of their tensors alone."""
    doubles, singles = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)

    def step(latent_tokens=None, *, infusenet_control, infusenet_context, infusenet_rotary_cos, infusenet_rotary_sin,
             infusenet_pooled, **inputs):
        residuals = step_residuals(
            controlnet, strength, inputs["hidden_states"] if latent_tokens is None else latent_tokens,
            inputs["timestep"], inputs["guidance"], inputs["pooled_projections"].dtype,
            infusenet_control=infusenet_control, infusenet_context=infusenet_context,
            infusenet_rotary_cos=infusenet_rotary_cos, infusenet_rotary_sin=infusenet_rotary_sin,
            infusenet_pooled=infusenet_pooled)
        merged = _merge_residuals([(residuals, formats.CONTROLNET_INSTANTX)], doubles, singles)
        return transformer(**inputs, **_pad_residuals(merged, inputs["hidden_states"].shape[1]), return_dict=False)[0]
    return step


def _merge_residuals(parts: list[tuple[dict, str]], double: int, single: int) -> dict:
    """Several ControlNets' residuals as one per transformer block, summed, as
    comfy/controlnet.py control_merge adds a chain's outputs. A ControlNet with fewer blocks
    than the transformer spreads its outputs as comfy/ldm/flux/controlnet.py does: InstantX's
    (latent input) each repeated over consecutive blocks (diffusers' interval_control), XLabs'
    cycled (block i takes output i mod n, diffusers' controlnet_blocks_repeat). The result has
    one entry a block, which diffusers' transformer then takes one to one."""
    def spread(samples, blocks: int, layout: str):
        if not samples:
            return None
        n = len(samples)
        if layout == formats.CONTROLNET_XLABS:
            return [samples[i % n] for i in range(blocks)]
        interval = -(-blocks // n)
        return [samples[i // interval] for i in range(blocks)]

    merged: dict[str, list | None] = {}
    for name, blocks in (("controlnet_block_samples", double), ("controlnet_single_block_samples", single)):
        total = None
        for residuals, layout in parts:
            spread_out = spread(residuals.get(name), blocks, layout)
            if spread_out is not None:
                total = spread_out if total is None else [a + b for a, b in zip(total, spread_out)]
        merged[name] = total
    return merged


def _pad_residuals(residuals: dict, tokens: int) -> dict:
    """InfuseNet's per-block residuals, extended with zeros over tokens beyond the image's
    (reference latents), so they add to the image tokens only."""
    def pad(t):
        if t is None or t.shape[1] >= tokens:
            return t
        return torch.nn.functional.pad(t, (0, 0, 0, tokens - t.shape[1]))
    return {name: None if samples is None else [pad(t) for t in samples] for name, samples in residuals.items()}


def _part_key(component: str, path) -> tuple[str, str]:
    """Where a loaded part of a model file is kept in FluxEngine._models."""
    return (component, str(path))


def release_freed_gpu_memory(device: torch.device) -> None:
    """Hand the GPU memory a build has freed back to the driver. Builds free a lot: the file's
    raw tensors, fp8 checkpoints' copies, q/k/v once fused, bf16 weights once quantised to fp8.
    PyTorch's allocator keeps such blocks reserved for reuse: fast held 40.9 GiB for 13.7 GiB
    of tensors (bench run 17d), which nvidia-smi, the next model and other processes see as
    used, and weights loaded later are carved from those blocks. After builds only: between
    requests it would hand back their activations' blocks, to be allocated again."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _area_box(area, h: int, w: int) -> tuple[int, int, int, int]:
    """A conditioning entry's region of an h x w latent as (top, left, bottom, right), clipped:
    ConditioningSetArea's (height, width, y, x) in latent units, or its Percentage form,
    resolved as comfy/samplers.py resolve_areas_and_cond_masks does; the whole latent without."""
    if area is None:
        return 0, 0, h, w
    if area[0] == "percentage":
        height, width, y, x = area[1:]
        area = (max(1, round(height * h)), max(1, round(width * w)), round(y * h), round(x * w))
    height, width, y, x = (int(v) for v in area)
    return min(y, h), min(x, w), min(y + height, h), min(x + width, w)


def _area_weights(shape, box: tuple[int, int, int, int], h: int, w: int, strength: float, device) -> torch.Tensor:
    """get_area_and_mult's weights: the strength, feathered over 8 latent pixels on each side of
    the region that is inside the latent (not on its border)."""
    top, left, bottom, right = box
    mult = torch.full(shape, strength, device=device)
    feather = 8
    for t in range(feather):
        weight = (1.0 / feather) * (t + 1)
        if top != 0:
            mult[:, :, t:1 + t, :] *= weight
        if bottom < h:
            mult[:, :, mult.shape[2] - 1 - t:mult.shape[2] - t, :] *= weight
        if left != 0:
            mult[:, :, :, t:1 + t] *= weight
        if right < w:
            mult[:, :, :, mult.shape[3] - 1 - t:mult.shape[3] - t] *= weight
    return mult


def _cache_context(transformer, name: str):
    if getattr(transformer, "is_cache_enabled", False):
        return transformer.cache_context(name)
    return contextlib.nullcontext()


def _active_at(cond: Cond, sigma: float, shift: float) -> bool:
    """Whether a conditioning entry applies at sigma: ConditioningSetTimestepRange's
    start_percent / end_percent, as sigmas (ModelSamplingFlux.percent_to_sigma), compared as
    comfy/samplers.py calc_cond_batch compares them."""
    start, end = cond.option("start_percent", 0.0), cond.option("end_percent", 1.0)
    if start <= 0.0 and end >= 1.0:
        return True
    return not (sigma > samplers.percent_to_sigma(shift, start) or sigma < samplers.percent_to_sigma(shift, end))


def _isclose(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)
