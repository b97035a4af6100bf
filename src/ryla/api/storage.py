"""The server's image folders, as ComfyUI keeps them: `input/` (uploads that LoadImage reads by
name), `output/` (SaveImage's PNGs) and `temp/` (PreviewImage's, emptied at start).

Names follow ComfyUI's server.py and folder_paths.py: outputs are
`{prefix}_{counter:05}_.png` in the prefix's subfolder (ComfyUI's `get_save_image_path`),
uploads keep their name and become `name (1).ext` on a collision unless `overwrite` (ComfyUI's
`image_upload`), and nothing resolves outside its folder. SaveImage's PNGs carry the `prompt`
text chunk and one chunk per `extra_pnginfo` entry (the editor's `workflow`), as ComfyUI's
`SaveImage.save_images` writes them. The output folder is bounded: past a total size or an
age, the oldest files go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import string
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ryla.files import write_atomic
from ryla.graph.nodes.image import unsafe_prefix

log = logging.getLogger(__name__)

FOLDER_TYPES = ("input", "output", "temp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# ComfyUI's PNG compression for saved images (SaveImage's compress_level default).
PNG_COMPRESS_LEVEL = 4


class UnsafePath(ValueError):
    """A name or subfolder that would leave its folder."""


@dataclass(frozen=True)
class StoredImage:
    filename: str
    subfolder: str
    type: str

    def as_dict(self) -> dict:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


class DataFolders:
    def __init__(self, root: Path | str, max_output_bytes: int = 10 << 30, max_output_age_s: float = 7 * 86400):
        self.root = Path(root).expanduser().resolve()
        self.max_output_bytes = max_output_bytes
        self.max_output_age_s = max_output_age_s
        self._lock = threading.Lock()
        for kind in FOLDER_TYPES:
            (self.root / kind).mkdir(parents=True, exist_ok=True)
        # PreviewImage's files live as long as the process (ComfyUI empties temp/ at start too).
        shutil.rmtree(self.root / "temp", ignore_errors=True)
        (self.root / "temp").mkdir(parents=True, exist_ok=True)

    def folder(self, kind: str) -> Path:
        if kind not in FOLDER_TYPES:
            raise UnsafePath(f"type must be one of {', '.join(FOLDER_TYPES)}, got {kind!r}")
        return self.root / kind

    # ------------------------------------------------------------------ names

    def resolve(self, kind: str, subfolder: str, filename: str) -> Path:
        """The file `filename` in `subfolder` of the `kind` folder; UnsafePath when the name is
        absolute, has '..' or would land outside the folder."""
        base = self.folder(kind)
        if not filename or filename.startswith("/") or ".." in filename or "\x00" in filename:
            raise UnsafePath(f"filename {filename!r} is not a plain file name")
        folder = self.subfolder(kind, subfolder)
        path = (folder / Path(filename).name).resolve()
        if not path.is_relative_to(base):
            raise UnsafePath(f"{filename!r} leaves the {kind} folder")
        return path

    def subfolder(self, kind: str, subfolder: str) -> Path:
        base = self.folder(kind)
        if "\x00" in (subfolder or ""):
            raise UnsafePath("subfolder has a NUL character")
        folder = (base / os.path.normpath(subfolder or ".")).resolve()
        if not folder.is_relative_to(base):
            raise UnsafePath(f"subfolder {subfolder!r} leaves the {kind} folder")
        return folder

    def input_files(self) -> list[str]:
        """Images in input/ (top level), the names LoadImage lists, as ComfyUI's LoadImage does."""
        folder = self.folder("input")
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not p.name.startswith("."))

    # ------------------------------------------------------------------ uploads

    def upload(self, data: bytes, filename: str, subfolder: str = "", kind: str = "input",
               overwrite: bool = False) -> StoredImage:
        """Store an uploaded file as ComfyUI's /upload/image does: same name, or `name (N).ext` when
        taken (unless overwrite); an identical file under the name is reused, not duplicated."""
        if kind not in ("input", "temp", "output"):
            raise UnsafePath(f"type must be input, temp or output, got {kind!r}")
        path = self.resolve(kind, subfolder, filename)
        stem, suffix = os.path.splitext(path.name)
        with self._lock:
            if not overwrite:
                counter = 1
                digest = hashlib.sha256(data).digest()
                while path.exists():
                    if path.is_file() and hashlib.sha256(path.read_bytes()).digest() == digest:
                        return StoredImage(path.name, subfolder or "", kind)
                    path = path.with_name(f"{stem} ({counter}){suffix}")
                    counter += 1
            write_atomic(path, data)
        return StoredImage(path.name, subfolder or "", kind)

    # ------------------------------------------------------------------ outputs

    def save_png(self, image: Image.Image, kind: str, prefix: str, prompt: dict | None,
                 extra_pnginfo: dict | None) -> StoredImage:
        """Write one image as ComfyUI's SaveImage (kind "output") or PreviewImage ("temp") does."""
        subfolder, name = split_prefix(prefix)
        folder = self.subfolder(kind, subfolder)
        folder.mkdir(parents=True, exist_ok=True)
        metadata = PngInfo()
        if prompt is not None:
            metadata.add_text("prompt", json.dumps(prompt))
        for key, value in (extra_pnginfo or {}).items():
            metadata.add_text(str(key), json.dumps(value))
        with self._lock:
            counter = next_counter(folder, name)
            filename = f"{name}_{counter:05}_.png"
            # Claim the name before writing, so two saves never pick the same counter.
            (folder / filename).touch()
        tmp = folder / f".{filename}.tmp"
        try:
            # a copy: Image.save keeps its options on the image object, and the response may be
            # encoding this image in another thread right now (ryla.imaging.encode)
            image.copy().save(tmp, format="PNG", pnginfo=metadata, compress_level=PNG_COMPRESS_LEVEL)
            os.replace(tmp, folder / filename)
        except BaseException:
            tmp.unlink(missing_ok=True)
            (folder / filename).unlink(missing_ok=True)
            raise
        return StoredImage(filename, subfolder, kind)

    def temp_prefix(self) -> str:
        """PreviewImage's file prefix: ComfyUI_temp_ and five random letters."""
        return "ComfyUI_temp_" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))

    def prune_outputs(self) -> int:
        """Remove the oldest outputs past the size or age limit. Returns how many went."""
        files = []
        for path in self.folder("output").rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        cutoff = time.time() - self.max_output_age_s if self.max_output_age_s > 0 else None
        removed = 0
        for mtime, size, path in files:
            if total <= self.max_output_bytes and (cutoff is None or mtime >= cutoff):
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        if removed:
            log.info("output folder: removed the %d oldest file(s) (limits: %d bytes, %.0f s)", removed,
                     self.max_output_bytes, self.max_output_age_s)
        return removed


def split_prefix(prefix: str) -> tuple[str, str]:
    """'people/anna' -> ('people', 'anna'); ComfyUI's get_save_image_path splits the same way."""
    if problem := unsafe_prefix(prefix):
        raise UnsafePath(problem)
    subfolder, _, name = prefix.replace("\\", "/").rpartition("/")
    return subfolder, name or "ComfyUI"


def next_counter(folder: Path, name: str) -> int:
    """One past the highest `{name}_NNNNN_` counter in the folder (ComfyUI's rule)."""
    pattern = re.compile(re.escape(name) + r"_(\d{5,})_")
    highest = 0
    for entry in folder.iterdir():
        if match := pattern.match(entry.name):
            highest = max(highest, int(match[1]))
    return highest + 1
