"""Single-file loaders for FLUX.1-dev components, with configs bundled (no network).

One loader per component reads the real files' layouts (see ryla.models.formats) and builds
the diffusers / transformers module. The modules are built on the meta device and the file's
tensors are assigned into them, so a 12B transformer is never initialised twice in memory.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from ryla.models import formats
from ryla.models.tiny import METADATA_KEY

log = logging.getLogger(__name__)

BUNDLED_CONFIGS = {
    "transformer": "flux1-dev-transformer.json",
    "vae": "flux1-vae.json",
    "clip_l": "clip-l-text.json",
    "t5xxl": "t5-xxl-encoder.json",
}
# Tensors some published text-encoder files carry that the encoder does not use.
_IGNORED_TEXT_KEYS = ("text_model.embeddings.position_ids", "text_projection.weight", "logit_scale")


class ModelFormatError(ValueError):
    """A file that is not the component it was loaded as (wrong keys or shapes)."""


# safetensors' dtype names (its header format).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CHUNK_BYTES = 128 << 20
READ_AHEAD = 4


def read_tensors(path: Path, prefix: str = "", device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors whose key starts with `prefix` (prefix removed), and the parsed ryla metadata.
    On a CPU the file is memory-mapped (safetensors, no copy); on a GPU it is streamed."""
    start = time.perf_counter()
    try:
        if torch.device(device).type == "cuda":
            tensors, metadata = read_tensors_streamed(path, prefix, device)
        else:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except ModelFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelFormatError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    log.info("read %s%s: %.2f GB in %.2fs", path.name, f" ({prefix.rstrip('.')})" if prefix else "", size / 1e9,
             time.perf_counter() - start)
    ryla_meta = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    return tensors, ryla_meta


def _safetensors_header(f, file_size: int) -> tuple[dict, int]:
    (length,) = struct.unpack("<Q", f.read(8))
    if length > min(file_size - 8, 100 << 20):
        raise ModelFormatError(f"{Path(f.name).name}: header length {length} does not fit the file")
    header = json.loads(f.read(length))
    return header, 8 + length


def read_tensors_streamed(path: Path, prefix: str = "", device: torch.device | str = "cuda",
                          chunk_bytes: int = CHUNK_BYTES) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file's tensors onto `device` in large chunks: parallel reads into
    pinned host buffers, one asynchronous copy per chunk, then one tensor per entry.

    Why not safetensors' own device= loading: it copies tensor by tensor out of a memory map
    (page faults, pageable copies). bench/cold_start.py times both on the full-size file
    (bench/results/README.md has the numbers)."""
    import concurrent.futures
    import os

    device = torch.device(device)
    pin = device.type == "cuda"
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header, data_start = _safetensors_header(f, file_size)
        metadata = header.pop("__metadata__", None) or {}
        entries = []
        for key, info in header.items():
            if not key.startswith(prefix):
                continue
            begin, end = info["data_offsets"]
            dtype = _DTYPES.get(info["dtype"])
            count = 1
            for n in info["shape"]:
                count *= n
            if dtype is None or end - begin != count * dtype.itemsize or data_start + end > file_size:
                raise ModelFormatError(f"{path.name}: entry {key} is not a valid tensor ({info['dtype']}, "
                                       f"shape {info['shape']}, bytes {begin}..{end})")
            entries.append((begin, end, key, dtype, info["shape"]))
        entries.sort()
        # Chunks of whole tensors, in file order; a tensor larger than chunk_bytes gets its own.
        chunks: list[list] = []
        for entry in entries:
            if chunks and entry[1] - chunks[-1][0][0] <= chunk_bytes:
                chunks[-1].append(entry)
            else:
                chunks.append([entry])
        largest = max((c[-1][1] - c[0][0] for c in chunks), default=0)
        buffers = [torch.empty(largest, dtype=torch.uint8, pin_memory=pin) for _ in range(min(READ_AHEAD, len(chunks)))]

        def read(index: int) -> int:
            first, last = chunks[index][0][0], chunks[index][-1][1]
            view = memoryview(buffers[index % len(buffers)].numpy())[:last - first]
            done = 0
            while done < len(view):  # preadv releases the GIL: READ_AHEAD reads run in parallel
                n = os.preadv(f.fileno(), [view[done:]], data_start + first + done)
                if n <= 0:
                    raise ModelFormatError(f"{path.name} ended early (truncated download?)")
                done += n
            return index

        tensors: dict[str, torch.Tensor] = {}
        with concurrent.futures.ThreadPoolExecutor(len(buffers) or 1) as pool:
            pending = {i: pool.submit(read, i) for i in range(len(buffers))}
            for index, chunk in enumerate(chunks):
                pending.pop(index).result()
                slot = index % len(buffers)
                first, last = chunk[0][0], chunk[-1][1]
                staged = torch.empty(last - first, dtype=torch.uint8, device=device)
                staged.copy_(buffers[slot][:last - first], non_blocking=pin)
                for begin, end, key, dtype, shape in chunk:
                    # A copy per tensor: aligned for its dtype, and the chunk is freed after.
                    tensors[key[len(prefix):]] = staged[begin - first:end - first].clone().view(dtype).reshape(shape)
                if index + len(buffers) < len(chunks):
                    if pin:
                        torch.cuda.current_stream(device).synchronize()  # refill the buffer once copied
                    pending[index + len(buffers)] = pool.submit(read, index + len(buffers))
    if pin:
        torch.cuda.synchronize(device)
    return tensors, metadata


def component_config(component: str, ryla_meta: dict) -> dict:
    """The file's own config (tiny files carry one), else the bundled FLUX.1-dev config."""
    configs = ryla_meta.get("configs", {})
    if component in configs:
        return dict(configs[component])
    text = resources.files("ryla.models").joinpath("configs", BUNDLED_CONFIGS[component]).read_text()
    return json.loads(text)


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _assign(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str,
            dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Load tensors into a meta-initialised module, strictly, cast to dtype on device."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"{what}: keys do not match the architecture "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelFormatError(f"{what}: {key} has shape {tuple(tensor.shape)}, "
                                   f"expected {tuple(expected[key].shape)}")
    cast = {k: v.to(device=device, dtype=dtype if v.dtype.is_floating_point else v.dtype)
            for k, v in state_dict.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    # Buffers made at construction (CLIP's position ids) are still on the CPU.
    return module.to(device).eval().requires_grad_(False)


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta; buffers (rope tables, ids) real
        return factory()


def build_transformer(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype,
                      device: torch.device, what: str = "transformer"):
    start = time.perf_counter()
    from diffusers import FluxTransformer2DModel  # the first import of diffusers' models: seconds

    imported = time.perf_counter()
    config = component_config("transformer", ryla_meta)
    try:
        converted = formats.flux_transformer_from_bfl(tensors)
    except KeyError as exc:
        raise ModelFormatError(f"{what} is not a FLUX transformer: {exc}") from exc
    model = _assign(_empty(lambda: FluxTransformer2DModel.from_config(_public(config))), converted, what, dtype, device)
    log.info("built %s in %.2fs (of which importing diffusers' model %.2fs)", what, time.perf_counter() - start,
             imported - start)
    return model


def build_vae(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype, device: torch.device,
              what: str = "vae"):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = component_config("vae", ryla_meta)
    converted = convert_ldm_vae_checkpoint(tensors, config)
    model = _empty(lambda: AutoencoderKL.from_config(_public(config)))
    return _assign(model, converted, what, dtype, device)


def build_clip(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype, device: torch.device,
               what: str = "clip_l"):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**_public(component_config("clip_l", ryla_meta)))
    tensors = {k: v for k, v in tensors.items() if k not in _IGNORED_TEXT_KEYS}
    model = _empty(lambda: CLIPTextModel(config))
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # Published files say `text_model.encoder...`; transformers 5 names it `encoder...`.
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    return _assign(model, tensors, what, dtype, device)


def build_t5(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype, device: torch.device,
             what: str = "t5xxl"):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**_public(component_config("t5xxl", ryla_meta)))
    model = _empty(lambda: T5EncoderModel(config))
    tensors = dict(tensors)
    expected = model.state_dict()
    # The encoder's token embedding is tied to `shared`; files store only one of the two.
    if "encoder.embed_tokens.weight" in expected and "encoder.embed_tokens.weight" not in tensors:
        if "shared.weight" in tensors:
            tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    return _assign(model, tensors, what, dtype, device)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"tokenizer files missing in {folder}; run `ryla models download --preset flux-dev`")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def detect_text_encoder(path: Path) -> str:
    """'clip_l' or 't5xxl' from the file's keys, as ComfyUI's DualCLIPLoader tells them apart."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise ModelFormatError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    if any(k.startswith("text_model.") for k in keys):
        return "clip_l"
    if any(k.startswith("encoder.block.") for k in keys):
        return "t5xxl"
    raise ModelFormatError(f"{path.name} is neither a CLIP-L nor a T5 text encoder")


def architecture_shapes(store) -> tuple[dict, dict]:
    """Linear shapes of the store's FLUX transformer and CLIP-L, built on the meta device
    from the configs their files carry (or the bundled FLUX.1-dev ones)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ryla.flux.lora import linear_shapes
    from ryla.models.store import CLIP_L, FLUX_CHECKPOINT, FLUX_TRANSFORMER

    meta: dict = {}
    for kind, name in (("checkpoints", FLUX_CHECKPOINT), ("diffusion_models", FLUX_TRANSFORMER),
                       ("text_encoders", CLIP_L)):
        if name in store.list(kind):
            with safe_open(str(store.resolve(kind, name)), framework="pt") as f:
                file_meta = f.metadata() or {}
            if METADATA_KEY in file_meta:
                configs = json.loads(file_meta[METADATA_KEY]).get("configs", {})
                meta.setdefault("configs", {}).update({k: v for k, v in configs.items()
                                                       if k not in meta.get("configs", {})})
    transformer = _empty(lambda: FluxTransformer2DModel.from_config(_public(component_config("transformer", meta))))
    clip = _empty(lambda: CLIPTextModel(CLIPTextConfig(**_public(component_config("clip_l", meta)))))
    return linear_shapes(transformer), linear_shapes(clip)
