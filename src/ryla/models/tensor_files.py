"""Reading safetensors weight files: the tensors under a key prefix and ryla's metadata, from a
memory map on a CPU or streamed in large chunks onto a GPU. Shared by the engine's loaders and
the LoRA store, so it lives with the model store, below both.

The format: https://github.com/huggingface/safetensors (an 8-byte little-endian header length,
a JSON header of dtype, shape and data_offsets per tensor, then the raw bytes).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

# The metadata key under which ryla's generated files (the tiny model set) carry their
# configs, as one JSON string.
METADATA_KEY = "ryla"


class ModelFormatError(ValueError):
    """A file that is not the component it was loaded as (wrong keys or shapes)."""


# safetensors' dtype names (its header format).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CHUNK_BYTES = 128 << 20
READ_AHEAD = 4


def tensor_names(path: Path) -> list[str]:
    """The names of a safetensors file's tensors, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelFormatError(f"{Path(path).name} is not a readable safetensors file: {exc}") from exc


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
