"""Model downloads from the Hugging Face Hub into the model store: one code path for a local
store (`ryla models download`) and the Modal Volume (`modal run comfyui_ryla.py::download`).

Each file is fetched with huggingface_hub into a hidden staging folder inside the store
(huggingface_hub resumes an interrupted file from its `.incomplete` part), checked against
the size and sha256 the Hub publishes for it, and only then renamed to its final name: no
half-written or corrupt file is ever visible where the loaders look. A verified file is
recorded beside it, so a second run downloads and re-hashes nothing. Failures are retried
with exponential backoff; a file that fails its checksum is deleted and fetched again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ryla.models.store import ModelStore

log = logging.getLogger(__name__)

STAGING = ".downloads"


@dataclass(frozen=True)
class RemoteFile:
    repo_id: str
    filename: str  # path in the repo
    kind: str  # model store folder
    target: str  # name inside that folder
    gated: bool = False


FLUX_DEV = (
    RemoteFile("Comfy-Org/flux1-dev", "flux1-dev-fp8.safetensors", "checkpoints", "flux1-dev-fp8.safetensors"),
    RemoteFile("comfyanonymous/flux_text_encoders", "clip_l.safetensors", "text_encoders", "clip_l.safetensors"),
    RemoteFile("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors", "text_encoders",
               "t5xxl_fp16.safetensors"),
    RemoteFile("black-forest-labs/FLUX.1-dev", "ae.safetensors", "vae", "ae.safetensors", gated=True),
    *(RemoteFile("black-forest-labs/FLUX.1-dev", f"tokenizer/{name}", "tokenizers", f"clip_l/{name}", gated=True)
      for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")),
    *(RemoteFile("black-forest-labs/FLUX.1-dev", f"tokenizer_2/{name}", "tokenizers", f"t5xxl/{name}", gated=True)
      for name in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")),
)
# The split transformer (bf16, 23.8 GB) for UNETLoader workflows, instead of the fp8 checkpoint.
FLUX_DEV_TRANSFORMER = (
    RemoteFile("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", "diffusion_models", "flux1-dev.safetensors",
               gated=True),
)
_INFU = "infu_flux_v1.0/aes_stage2"
IDENTITY = (
    RemoteFile("ByteDance/InfiniteYou", f"{_INFU}/image_proj_model.bin", "instantid", "image_proj_model.bin"),
    *(RemoteFile("ByteDance/InfiniteYou", f"{_INFU}/InfuseNetModel/{name}", "controlnet", f"InfuseNetModel/{name}")
      for name in ("config.json", "diffusion_pytorch_model.safetensors.index.json",
                   "diffusion_pytorch_model-00001-of-00002.safetensors",
                   "diffusion_pytorch_model-00002-of-00002.safetensors")),
    *(RemoteFile("ByteDance/InfiniteYou", f"supports/insightface/models/antelopev2/{name}", "insightface",
                 f"models/antelopev2/{name}")
      for name in ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")),
)
PRESETS: dict[str, tuple[RemoteFile, ...]] = {
    "flux-dev": FLUX_DEV,
    "flux-dev-transformer": FLUX_DEV_TRANSFORMER,
    "identity": IDENTITY,
}
PRESETS["all"] = FLUX_DEV + IDENTITY


class DownloadError(RuntimeError):
    pass


@dataclass
class Result:
    file: RemoteFile
    path: Path
    downloaded: bool
    size: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified.json")


def _already_verified(path: Path, size: int | None, sha256: str | None) -> bool:
    record = _record_path(path)
    if not (path.is_file() and record.is_file()):
        return False
    try:
        saved = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    stat = path.stat()
    return (saved.get("size") == stat.st_size and saved.get("mtime_ns") == stat.st_mtime_ns
            and (size is None or size == stat.st_size) and (sha256 is None or saved.get("sha256") == sha256))


def _remote_metadata(file: RemoteFile, token: str | None) -> tuple[int | None, str | None, str | None]:
    """(size, sha256, commit) as the Hub publishes them. For files in Git LFS (every weight
    file) the ETag is the content's sha256; small Git files have a git hash there instead."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(file.repo_id, file.filename), token=token)
    etag = (meta.etag or "").strip('"').removeprefix("W/").strip('"')
    sha256 = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
    return meta.size, sha256, meta.commit_hash


def fetch(store: ModelStore, file: RemoteFile, token: str | None = None, retries: int = 4,
          backoff_s: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> Result:
    """One file into the store, verified; a no-op when it is already there and verified."""
    from huggingface_hub import hf_hub_download

    final = store.path_for_new(file.kind, file.target)
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        try:
            size, sha256, _ = _remote_metadata(file, token)
            if _already_verified(final, size, sha256):
                return Result(file, final, False, final.stat().st_size)
            staging = store.root / STAGING / file.repo_id.replace("/", "--")
            staged = Path(hf_hub_download(file.repo_id, file.filename, local_dir=staging, token=token))
            actual_size = staged.stat().st_size
            actual_sha = file_sha256(staged) if sha256 else None
            if (size is not None and actual_size != size) or (sha256 and actual_sha != sha256):
                staged.unlink(missing_ok=True)
                raise DownloadError(f"{file.filename}: checksum mismatch (got {actual_size} bytes, sha256 "
                                    f"{actual_sha}; expected {size} bytes, sha256 {sha256})")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            stat = final.stat()
            _record_path(final).write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                       "sha256": actual_sha, "repo_id": file.repo_id,
                                                       "filename": file.filename}))
            log.info("downloaded %s/%s -> %s (%d bytes)", file.repo_id, file.filename, final, stat.st_size)
            return Result(file, final, True, stat.st_size)
        except Exception as exc:  # network errors, checksum mismatches, server errors
            if _is_permanent(exc):
                raise DownloadError(_explain(file, exc)) from exc
            last_error = exc
            if attempt < retries:
                delay = backoff_s * 2**attempt
                log.warning("download of %s failed (%s); retry %d/%d in %.0fs", file.filename, exc, attempt + 1,
                            retries, delay)
                sleep(delay)
    raise DownloadError(f"{file.repo_id}/{file.filename}: failed after {retries + 1} attempts: {last_error}")


def _is_permanent(exc: Exception) -> bool:
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    return isinstance(exc, (GatedRepoError, RepositoryNotFoundError, EntryNotFoundError))


def _explain(file: RemoteFile, exc: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError

    if isinstance(exc, GatedRepoError) or file.gated:
        return (f"{file.repo_id}/{file.filename}: access denied. Accept the license on the repo's Hub page and "
                f"set HF_TOKEN (locally) or the Modal Secret 'huggingface-secret'. ({type(exc).__name__})")
    return f"{file.repo_id}/{file.filename}: {type(exc).__name__}: {exc}"


@dataclass
class PlannedFile:
    file: RemoteFile
    size: int | None
    present: bool  # already in the store and verified


@dataclass
class Plan:
    """What a download will do, known before any byte is fetched."""

    preset: str
    files: list[PlannedFile]
    free_bytes: int
    account: str | None  # the Hub account the token belongs to

    @property
    def to_fetch(self) -> list[PlannedFile]:
        return [planned for planned in self.files if not planned.present]

    @property
    def fetch_bytes(self) -> int:
        return sum(planned.size or 0 for planned in self.to_fetch)

    def lines(self) -> list[str]:
        rows = [f"{'present' if p.present else 'fetch':<8} {_size(p.size):>9}  {p.file.kind}/{p.file.target}"
                f"  ({p.file.repo_id})" for p in self.files]
        rows.append(f"{len(self.to_fetch)} of {len(self.files)} file(s) to fetch, {_size(self.fetch_bytes)}; "
                    f"{_size(self.free_bytes)} free" + (f"; Hub account {self.account}" if self.account else ""))
        return rows


def _size(size: int | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def hub_token(token: str | None = None) -> str | None:
    """The token to use: the one given, else $HF_TOKEN, else the one `hf auth login` stored."""
    from huggingface_hub import get_token

    return token or os.environ.get("HF_TOKEN") or get_token() or None


def check_access(files: tuple[RemoteFile, ...], token: str | None) -> str | None:
    """Before anything is fetched: a gated repo needs a token, the token must be valid, and its
    account must have accepted each gated repo's licence. Returns the account's name."""
    from huggingface_hub import auth_check, whoami
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    gated = list(dict.fromkeys(f.repo_id for f in files if f.gated))
    if gated and not token:
        raise DownloadError(f"{', '.join(gated)} {'is' if len(gated) == 1 else 'are'} gated: accept the licence on "
                            f"{', '.join('https://huggingface.co/' + repo for repo in gated)} with your Hugging Face "
                            "account, then set HF_TOKEN to one of its tokens (or pass --token)")
    if not token:
        return None
    try:
        account = whoami(token=token).get("name")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise DownloadError("the Hugging Face token (HF_TOKEN or --token) is not valid: create one at "
                                "https://huggingface.co/settings/tokens") from exc
        raise DownloadError(f"cannot check the Hugging Face token: {exc}") from exc
    for repo in gated:
        try:
            auth_check(repo, token=token)
        except (GatedRepoError, RepositoryNotFoundError) as exc:
            raise DownloadError(f"the account {account} has no access to {repo}: accept its licence at "
                                f"https://huggingface.co/{repo} (the token is valid)") from exc
    return account


def plan_download(store: ModelStore, preset: str, token: str | None = None) -> Plan:
    """Access checked, each file's size asked of the Hub, what is already here verified, and
    the free disk: everything a user should see before gigabytes move."""
    if preset not in PRESETS:
        raise DownloadError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    files = PRESETS[preset]
    account = check_access(files, token)
    planned = []
    for file in files:
        try:
            size, sha256, _ = _remote_metadata(file, token)
        except Exception as exc:
            if _is_permanent(exc):
                raise DownloadError(_explain(file, exc)) from exc
            raise DownloadError(f"{file.repo_id}/{file.filename}: cannot reach the Hub: {exc}") from exc
        final = store.path_for_new(file.kind, file.target)
        planned.append(PlannedFile(file, size, _already_verified(final, size, sha256)))
    store.root.mkdir(parents=True, exist_ok=True)
    return Plan(preset, planned, shutil.disk_usage(store.root).free, account)


def download(store: ModelStore, preset: str, token: str | None = None, *,
             on_plan: Callable[[Plan], None] | None = None, on_file: Callable[[Result], None] | None = None,
             **options) -> list[Result]:
    """A preset into the store: planned and checked first (see plan_download), refused when the
    files do not fit on the disk, then each file fetched and verified."""
    token = hub_token(token)
    plan = plan_download(store, preset, token)
    if on_plan is not None:
        on_plan(plan)
    # The staged copy is renamed, not copied, into place: the files need their own size, plus
    # a margin so the disk is not left full.
    margin = 1 << 30
    if plan.fetch_bytes + margin > plan.free_bytes:
        raise DownloadError(f"not enough disk space in {store.root}: {_size(plan.fetch_bytes)} to fetch, "
                            f"{_size(plan.free_bytes)} free (and 1 GB kept free); free some space or point "
                            "RYLA_MODELS_DIR / --models-dir at a larger disk")
    store.ensure_layout()
    results = []
    for file in PRESETS[preset]:
        results.append(fetch(store, file, token=token, **options))
        if on_file is not None:
            on_file(results[-1])
    shutil.rmtree(store.root / STAGING, ignore_errors=True)
    return results


def staged_bytes(store: ModelStore) -> int:
    """Bytes in the staging folder now: a download's progress, as a progress bar polls it."""
    total = 0
    for path in (store.root / STAGING).rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:  # renamed or removed while walking
            pass
    return total


# The spec's function names (EP-058 TSK-058-001-001 / TSK-058-002-002).
def hf_download_flux_dev(store: ModelStore, **options) -> list[Result]:
    return download(store, "flux-dev", **options)


def hf_download_instantid(store: ModelStore, **options) -> list[Result]:
    return download(store, "identity", **options)
