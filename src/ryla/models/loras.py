"""The LoRA store: character LoRAs kept in the model store's loras/ folder.

Each LoRA is `loras/<id>.safetensors` with `loras/<id>.json` beside it (trigger word, rank,
format, targets, sha256, size, added_at). Ids are checked before any path is built. Writes
are atomic: the file is validated under a hidden temporary name, fsynced and renamed, so a
failed or cut-off upload never appears in the listing, and an id is claimed with an exclusive
create, so of two uploads to one id exactly one succeeds. Temporary files a killed process left
behind are removed when the store opens. Entries that cannot be used (a link that points
nowhere or out of the folder, unreadable metadata) are left out of the listing, logged, and
refused as InvalidLora when asked for. On Modal, `on_change` commits the Volume and `on_miss`
reloads it, so a LoRA uploaded through one container is found by others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ryla.files import write_atomic
from ryla.models.lora_format import LoraFormatError, convert

log = logging.getLogger(__name__)

# The documented id alphabet [A-Za-z0-9._-]{1,128}, less ids that start with a dot: that
# excludes "." and ".." and hidden names, which the store uses for its temporary files.
LORA_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


class InvalidLoraId(ValueError):
    pass


class LoraNotFound(LookupError):
    def __init__(self, lora_id: str):
        self.lora_id = lora_id
        super().__init__(f"no LoRA with id {lora_id!r}")


class LoraExists(ValueError):
    pass


class InvalidLora(ValueError):
    """An entry of the store that cannot be used (the message says why)."""


class StoreUnavailable(RuntimeError):
    """The shared store could not be brought up to date; try again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 5):
        self.retry_after = retry_after
        super().__init__(message)


class VolumeSync:
    """Keeps a store folder on a shared network volume (a Modal Volume) in step across the
    containers that mount it: `reload` brings in what others committed, `commit` publishes what
    this one wrote. Reloads are rate-limited (at most one per `min_interval_s`; the callers run
    them off the event loop) and retried with a pause, since a reload fails while a file on the
    volume is open; when they keep failing, StoreUnavailable (a 503 with Retry-After)."""

    def __init__(self, reload: Callable[[], None], commit: Callable[[], None], min_interval_s: float = 2.0,
                 attempts: int = 3, backoff_s: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self._reload, self._commit = reload, commit
        self.min_interval_s, self.attempts, self.backoff_s = min_interval_s, attempts, backoff_s
        self._clock, self._sleep = clock, sleep
        self._last_reload = -math.inf
        self._lock = threading.Lock()

    def _retrying(self, action: Callable[[], None], what: str) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                action()
                return
            except Exception as exc:  # the volume's client raises its own error types
                log.warning("LoRA volume %s failed (attempt %d of %d): %s", what, attempt, self.attempts, exc)
                if attempt == self.attempts:
                    raise StoreUnavailable(f"the shared LoRA store could not {what} ({exc})",
                                           retry_after=max(1, round(self.backoff_s * 2 ** attempt))) from exc
                self._sleep(self.backoff_s * 2 ** (attempt - 1))

    def reload(self) -> None:
        """Reload now, unless another reload finished within min_interval_s."""
        with self._lock:
            if self._clock() - self._last_reload < self.min_interval_s:
                return
            self._retrying(self._reload, "reload")
            self._last_reload = self._clock()

    reload_if_stale = reload

    def commit(self) -> None:
        with self._lock:
            self._retrying(self._commit, "commit")


MAX_TRIGGER_WORD = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_trigger_word(word: str | None) -> str | None:
    """A trigger word goes into prompts and response headers: printable text, 100 characters."""
    if word is None or word == "":
        return None
    if len(word) > MAX_TRIGGER_WORD:
        raise InvalidLoraId(f"trigger_word: at most {MAX_TRIGGER_WORD} characters")
    if _CONTROL.search(word):
        raise InvalidLoraId("trigger_word: control characters (line breaks, tabs...) are not allowed")
    return word


def check_id(lora_id: str) -> str:
    if not isinstance(lora_id, str) or not LORA_ID.match(lora_id):
        raise InvalidLoraId(f"invalid LoRA id {lora_id!r}: use 1-128 of A-Z a-z 0-9 . _ - "
                            "(not starting with a dot)")
    return lora_id


def id_from_filename(filename: str) -> str:
    stem = Path(filename).stem
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-")[:128]
    return check_id(cleaned or "lora")


class LoraStore:
    def __init__(self, folder: Path, target_shapes: Callable[[], tuple[dict, dict]],
                 on_change: Callable[[], None] | None = None, on_miss: Callable[[], None] | None = None,
                 on_list: Callable[[], None] | None = None, model: str = "the base model"):
        self.folder = Path(folder)
        # What uploads are checked against, named in a refusal ("the tiny random-weight stand-in",
        # say, so a real FLUX LoRA refused there says why).
        self.model = model
        self.target_shapes = target_shapes  # () -> (transformer linear shapes, text encoder linear shapes)
        # Hooks for a store shared between processes (ryla.models.loras.VolumeSync): after a
        # change; before answering "not found"; before a listing or a lookup (rate-limited).
        self.on_change = on_change
        self.on_miss = on_miss
        self.on_list = on_list
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files and id claims of uploads cut off by a killed process."""
        if not self.folder.is_dir():
            return
        for leftover in [*self.folder.glob(".upload-*.tmp"), *self.folder.glob(".*.claim"),
                         *self.folder.glob(".*.json.*.tmp")]:
            log.warning("removing %s, left by an upload that did not finish", leftover.name)
            leftover.unlink(missing_ok=True)

    def _paths(self, lora_id: str) -> tuple[Path, Path]:
        check_id(lora_id)
        return self.folder / f"{lora_id}.safetensors", self.folder / f"{lora_id}.json"

    def list(self) -> list[dict]:
        if self.on_list is not None:
            self.on_list()
        if not self.folder.is_dir():
            return []
        entries = []
        for path in sorted(self.folder.glob("*.safetensors")):
            if LORA_ID.match(path.stem):
                try:
                    entries.append(self._describe(path))
                except InvalidLora as exc:
                    log.warning("LoRA store: leaving out %s: %s", path.name, exc)
        return entries

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve(strict=True).is_relative_to(self.folder.resolve())
        except (OSError, RuntimeError):  # dangling or looping links
            return False

    def _describe(self, path: Path) -> dict:
        if not self._inside(path):
            raise InvalidLora(f"{path.name} is a link that points nowhere or out of the LoRA folder")
        try:
            stat = path.stat()
        except OSError as exc:
            raise InvalidLora(f"{path.name} cannot be read ({exc.strerror})")
        if not path.is_file():
            raise InvalidLora(f"{path.name} is not a file")
        fallback = {"id": path.stem, "file": path.name, "size": stat.st_size, "trigger_word": None}
        meta_path = path.with_suffix(".json")
        if not (meta_path.exists() or meta_path.is_symlink()):
            return fallback  # a file dropped in by hand: what the file system says
        # Metadata is never read through a link that leaves the store.
        if not self._inside(meta_path) or not meta_path.is_file():
            log.warning("LoRA store: ignoring %s (a link out of the folder, or not a file)", meta_path.name)
            return fallback
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("LoRA store: unreadable metadata %s (%s)", meta_path.name, exc)
            return fallback
        if not isinstance(meta, dict) or not isinstance(meta.get("size", 0), int):
            log.warning("LoRA store: metadata %s is not a LoRA description", meta_path.name)
            return fallback
        trigger = meta.get("trigger_word")
        if trigger is not None and (not isinstance(trigger, str) or _CONTROL.search(trigger)):
            trigger = None
        return {**meta, "id": path.stem, "file": path.name, "trigger_word": trigger}

    def get(self, lora_id: str) -> dict:
        path, _ = self._paths(lora_id)
        if self.on_list is not None:  # a shared store: what others replaced or removed, within its interval
            self.on_list()
        if not (path.exists() or path.is_symlink()) and self.on_miss is not None:
            self.on_miss()
        if not (path.exists() or path.is_symlink()):
            raise LoraNotFound(lora_id)
        return self._describe(path)

    def filename(self, lora_id: str) -> str:
        """The name a LoraLoader node uses for this LoRA."""
        return self.get(lora_id)["file"]

    def add_chunks(self, chunks: Iterable[bytes], lora_id: str, trigger_word: str | None = None,
                   overwrite: bool = False) -> dict:
        """Validate and store a LoRA from a stream of bytes; nothing is visible unless it is
        a valid FLUX LoRA for the base model."""
        path, meta_path = self._paths(lora_id)
        trigger_word = check_trigger_word(trigger_word)
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise LoraExists(f"a LoRA with id {lora_id!r} exists; remove it first")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.folder, prefix=f".upload-{lora_id}-", suffix=".tmp")
        tmp = Path(tmp_name)
        claim = self.folder / f".{lora_id}.claim"
        claimed = False
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            metadata = self._inspect(tmp)
            metadata.update(id=lora_id, file=path.name, trigger_word=trigger_word or None,
                            sha256=digest.hexdigest(), size=size,
                            added_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            # Claim the id: an exclusive create succeeds for exactly one of two uploads.
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                claimed = True
            except FileExistsError:
                raise LoraExists(f"a LoRA with id {lora_id!r} is being uploaded right now")
            if (path.exists() or path.is_symlink()) and not overwrite:
                raise LoraExists(f"a LoRA with id {lora_id!r} exists; remove it first")
            write_atomic(meta_path, json.dumps(metadata, indent=2).encode())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            _fsync_dir(self.folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            if claimed:
                claim.unlink(missing_ok=True)
        log.info("stored LoRA %s (%s, rank %s, %d bytes)", lora_id, metadata["format"], metadata["rank"], size)
        self._changed()
        return metadata

    def add_file(self, source: Path, lora_id: str | None = None, trigger_word: str | None = None) -> dict:
        source = Path(source)

        def read():
            with open(source, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return self.add_chunks(read(), lora_id or id_from_filename(source.name), trigger_word)

    def remove(self, lora_id: str) -> None:
        path, meta_path = self._paths(lora_id)
        if not (path.exists() or path.is_symlink()) and self.on_miss is not None:
            self.on_miss()
        if not (path.exists() or path.is_symlink()):
            raise LoraNotFound(lora_id)
        path.unlink()
        meta_path.unlink(missing_ok=True)
        self._changed()

    def _changed(self) -> None:
        """Publish a change to a shared store. The change is already on disk here: a failed
        publish is logged, not reported as a failed upload (the next commit carries it)."""
        if self.on_change is None:
            return
        try:
            self.on_change()
        except StoreUnavailable as exc:
            log.error("LoRA store: %s; other containers see the change after the next commit", exc)

    def _inspect(self, path: Path) -> dict:
        from ryla.models.tensor_files import ModelFormatError, read_tensors

        try:
            tensors, _ = read_tensors(path)
        except ModelFormatError as exc:
            raise LoraFormatError(str(exc).replace(path.name, "the upload")) from exc
        transformer_shapes, text_shapes = self.target_shapes()
        try:
            weights = convert(tensors, transformer_shapes, text_shapes)
        except LoraFormatError as exc:
            raise LoraFormatError(f"{exc}; checked against {self.model}") from exc
        layer_kinds = sorted({re.sub(r"^(single_transformer_blocks|transformer_blocks)\.\d+\.", "", t)
                              for t in weights.transformer})
        return {"format": weights.format, "rank": weights.rank, "targets": len(weights.targets()),
                "target_layers": layer_kinds, "text_encoder": bool(weights.text_encoder)}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
