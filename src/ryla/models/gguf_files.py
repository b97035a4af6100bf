"""GGUF weight files, as city96's ComfyUI-GGUF node pack reads them (UnetLoaderGGUF,
DualCLIPLoaderGGUF): FLUX transformers quantised by its tools/convert.py and T5 encoders
converted by llama.cpp.

The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (a key-value header,
then each tensor's blocks). What is in the files:

- A transformer keeps Black Forest Labs' key names (`double_blocks.0.img_attn.qkv.weight`)
  and says `general.architecture = flux`; matrices are quantised (Q8_0, Q4_K, ...), biases and
  norms stay F32/F16 (ComfyUI-GGUF loader.py, `gguf_sd_loader`).
- A T5 encoder uses llama.cpp's tensor names (`enc.blk.0.attn_q.weight`, `token_embd.weight`)
  and says `general.architecture = t5encoder` (or `t5`). gguf-py's own TensorNameMap names each
  of transformers' T5 keys; ComfyUI-GGUF's `T5_SD_MAP` is the same table.

Reading uses gguf-py's GGUFReader and diffusers' GGUF dequantisation in torch
(diffusers.quantizers.gguf.utils, ported from ComfyUI-GGUF's dequant.py): each tensor is moved
to the device as raw blocks and expanded there. The weights are then ordinary tensors in the
compute dtype: GGUF saves disk and download, not GPU memory, in ryla (ComfyUI-GGUF expands
layer by layer at every step instead, which trades speed for memory a 141 GB H200 does not need).

Writing (the tiny test files) uses gguf-py's GGUFWriter; gguf-py quantises Q8_0 itself, and
Q4_K is written here (`quantize_q4_k`) because gguf-py only dequantises it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ryla.models.tensor_files import METADATA_KEY, ModelFormatError

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
TRANSFORMER_ARCHITECTURES = ("flux",)
T5_ARCHITECTURES = ("t5encoder", "t5")
# Architectures ComfyUI-GGUF also reads (loader.py IMG_ARCH_LIST / TXT_ARCH_LIST), named in refusals.
_OTHER_ARCHITECTURES = {
    "sd1": "a Stable Diffusion 1.x model", "sdxl": "a Stable Diffusion XL model", "sd3": "a Stable Diffusion 3 model",
    "aura": "an AuraFlow model", "hidream": "a HiDream model", "cosmos": "a Cosmos model", "ltxv": "an LTX-Video model",
    "hyvid": "a HunyuanVideo model", "wan": "a Wan video model", "lumina2": "a Lumina 2 model",
    "qwen_image": "a Qwen-Image model", "llama": "a Llama language model", "qwen2vl": "a Qwen2-VL language model",
}


def is_gguf(path: Path | str) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError, IndexError or numpy errors on bad bytes
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":  # a GGUF header whose tensors run past the end of the file
            raise ModelFormatError(f"{path.name} is a damaged or truncated GGUF file ({exc})") from exc
        raise ModelFormatError(f"{path.name} is not a readable GGUF file: {exc}") from exc


def _string_field(reader, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None:
        return None
    try:
        return bytes(field.parts[field.data[-1]]).decode("utf-8")
    except Exception as exc:
        raise ModelFormatError(f"GGUF field {name} is not a string") from exc


def architecture(path: Path) -> str:
    """The file's `general.architecture` ('flux', 't5encoder', ...)."""
    arch = _string_field(_reader(path), "general.architecture")
    if arch is None:
        raise ModelFormatError(f"{path.name} has no general.architecture: not a GGUF file ComfyUI-GGUF or ryla reads")
    return arch


def describe_architecture(arch: str) -> str:
    return _OTHER_ARCHITECTURES.get(arch, f"a {arch!r} model")


def read_gguf(path: Path, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """A GGUF file's tensors, dequantised on `device` into `dtype`, and ryla's metadata (the
    tiny files carry their configs under the string key `ryla`, as safetensors ones do)."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions

    start = time.perf_counter()
    path = Path(path)
    reader = _reader(path)
    unquantised = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16}
    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for entry in reader.tensors:
        kind = entry.tensor_type
        counts[kind.name] = counts.get(kind.name, 0) + 1
        shape = tuple(int(n) for n in reversed(entry.shape))  # GGUF lists the innermost dimension first
        try:
            with warnings.catch_warnings():  # a memory map is read-only; torch warns on wrapping it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                raw = torch.from_numpy(entry.data).to(device)
            if kind in unquantised:
                tensor = raw.view(unquantised[kind]).reshape(shape)
            elif kind in dequantize_functions:
                block_size, type_size = GGML_QUANT_SIZES[kind]
                blocks = raw.view(torch.uint8).reshape(-1, type_size)
                tensor = dequantize_functions[kind](blocks, block_size, type_size, dtype=torch.float32).reshape(shape)
            else:
                raise ModelFormatError(f"{path.name}: {entry.name} is {kind.name}, a GGUF type ryla cannot dequantise "
                                       f"(it reads F32, F16 and {', '.join(sorted(k.name for k in dequantize_functions))})")
        except ModelFormatError:
            raise
        except Exception as exc:  # a truncated file leaves the last tensors short
            raise ModelFormatError(f"{path.name}: tensor {entry.name} cannot be read ({exc}); "
                                   "the file is damaged or truncated") from exc
        tensors[entry.name] = tensor.to(dtype)
    meta = _string_field(reader, METADATA_KEY)
    log.info("read %s: %d tensors (%s) in %.2fs", path.name, len(tensors),
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), time.perf_counter() - start)
    return tensors, (json.loads(meta) if meta else {})


def tensor_names(path: Path) -> list[str]:
    return [entry.name for entry in _reader(path).tensors]


def t5_from_llama_cpp_names(tensors: dict[str, torch.Tensor], expected: list[str]) -> dict[str, torch.Tensor]:
    """llama.cpp's T5 names -> transformers' T5EncoderModel keys (`expected`), through gguf-py's
    own TensorNameMap. transformers' tied `encoder.embed_tokens` is left for the caller."""
    import gguf

    blocks = 1 + max((int(k.split(".")[2]) for k in tensors if k.startswith("enc.blk.")), default=-1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, blocks)
    out = {}
    for key in expected:
        gguf_key = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_key is not None and gguf_key in tensors:
            out[key] = tensors[gguf_key]
    unused = sorted(set(tensors) - {names.get_name(k, try_suffixes=(".weight", ".bias")) for k in out})
    if unused:
        raise ModelFormatError(f"T5 GGUF tensors with no place in the encoder: {unused[:5]}")
    return out


def t5_to_llama_cpp_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import gguf

    blocks = 1 + max((int(k.split(".")[2]) for k in tensors if k.startswith("encoder.block.")), default=-1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, blocks)
    return {names.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------
# Writing (the tiny model set)
# --------------------------------------------------------------------------------------------

QK_K = 256  # the k-quants' super-block (ggml-common.h)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Rows of float32 (length a multiple of 256) as ggml's block_q4_K bytes: per super-block
    of 256, an fp16 scale `d` and min `dmin`, eight 6-bit sub-block scales and mins packed in
    12 bytes, and 256 4-bit quants, so that x = d * scale_j * q - dmin * min_j (ggml-common.h
    block_q4_K; the layout gguf-py's Q4_K.dequantize_blocks and diffusers' dequantize_blocks_Q4_K
    read). A plain min/max fit per sub-block of 32, not llama.cpp's iterative search: valid
    blocks whose error is a little larger than llama-quantize's."""
    rows = values.reshape(-1, values.shape[-1]).astype(np.float32)
    if rows.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, got {rows.shape[-1]}")
    sub = rows.reshape(-1, 8, 32)  # super-blocks x sub-blocks x values
    low = np.minimum(sub.min(-1), 0.0)
    high = np.maximum(sub.max(-1), low)
    scale = (high - low) / 15.0
    minimum = -low
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (minimum.max(-1) / 63.0).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None].astype(np.float32)), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin[:, None] > 0, np.rint(minimum / dmin[:, None].astype(np.float32)), 0).clip(0, 63)
        mn = mn.astype(np.uint8)
        step = d[:, None].astype(np.float32) * sc
        offset = dmin[:, None].astype(np.float32) * mn
        q = np.where(step[..., None] > 0, np.rint((sub + offset[..., None]) / step[..., None]), 0)
    q = q.clip(0, 15).astype(np.uint8)
    packed_scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
    ], axis=1)
    # sub-blocks 2p and 2p+1 share 32 bytes: low nibbles and high nibbles
    quants = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                             packed_scales, quants], axis=1)
    return blocks.reshape(*values.shape[:-1], values.shape[-1] // QK_K * 144)


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], arch: str, quantisation: str,
               ryla_meta: dict | None = None) -> None:
    """Write `tensors` as a GGUF file, atomically: matrices whose rows fit the type's blocks
    in `quantisation` ('Q8_0' or 'Q4_K'), other matrices in BF16 (as llama-quantize falls back
    for rows that fit no block), vectors in F32."""
    import gguf
    from gguf import quants

    kind = gguf.GGMLQuantizationType[quantisation]
    block_size, _ = gguf.GGML_QUANT_SIZES[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_string("general.name", path.stem)
        if ryla_meta:
            writer.add_string(METADATA_KEY, json.dumps(ryla_meta, sort_keys=True))
        for name, tensor in tensors.items():
            array = tensor.float().numpy()
            if array.ndim == 2 and array.shape[-1] % block_size == 0:
                data = quantize_q4_k(array) if kind == gguf.GGMLQuantizationType.Q4_K else quants.quantize(array, kind)
                writer.add_tensor(name, data, raw_dtype=kind)
            elif array.ndim >= 2:
                writer.add_tensor(name, quants.quantize(array, gguf.GGMLQuantizationType.BF16),
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
