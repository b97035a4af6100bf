"""The model store: a ComfyUI-style folder tree and ComfyUI's name resolution.

Workflow graphs name files the way ComfyUI does: a path relative to a model folder, such as
`flux1-dev-fp8.safetensors` or `flux/my-lora.safetensors`. ComfyUI users can point
`RYLA_MODELS_DIR` at their own `ComfyUI/models` folder and the names keep working; the legacy
folder names ComfyUI still reads (`unet/` for diffusion models, `clip/` for text encoders)
are read here too.
"""

from __future__ import annotations

import os
from pathlib import Path

# kind -> folders searched, first one is where new files go.
FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet",),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "instantid": ("instantid",),
    "insightface": ("insightface",),
    "tokenizers": ("tokenizers",),
}
# ComfyUI-GGUF's folder keys (nodes.py update_folder_names_and_paths): .gguf files of a folder
GGUF_FOLDERS = {"unet_gguf": "diffusion_models", "clip_gguf": "text_encoders"}
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")

# The files the FLUX.1-dev templates name (the spec's file list).
FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"
FLUX_TRANSFORMER = "flux1-dev.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
# FLUX.1 Kontext dev under the names it is published as: Comfy-Org's repackaged file (what
# ComfyUI's template loads), then Black Forest Labs' own.
KONTEXT_FILES = ("flux1-dev-kontext_fp8_scaled.safetensors", "flux1-kontext-dev.safetensors")
# FLUX.1 Fill dev, as Black Forest Labs and ComfyUI's Fill templates name it
FILL_FILE = "flux1-fill-dev.safetensors"


class ModelNotFoundError(LookupError):
    """A named model file is not in the store."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        shown = ", ".join(available[:10]) or "none"
        super().__init__(f"{kind} file {name!r} not found (available: {shown})")


class UnsafeNameError(ValueError):
    """A model name that would leave the store (absolute, '..', or through a link outside)."""


def default_models_dir() -> Path:
    if env := os.environ.get("RYLA_MODELS_DIR"):
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ryla" / "models"


def default_tiny_dir() -> Path:
    if env := os.environ.get("RYLA_TINY_MODELS_DIR"):
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ryla" / "tiny-models"


# What a user adds to a store (LoRAs). When the server falls back to the shared tiny model set,
# these kinds still live in the user's own models folder, not in the shared cache.
USER_KINDS = ("loras",)


class ModelStore:
    def __init__(self, root: Path | str, *, tiny: bool = False, user_root: Path | str | None = None):
        self.root = Path(root).expanduser().resolve()
        # The generated tiny set marks its folder, so it is reported as tiny wherever it is.
        self.tiny = tiny or (self.root / "TINY_MODELS").is_file()
        self.user_root = Path(user_root).expanduser().resolve() if user_root is not None else None
        self._kinds: dict[tuple[str, int, int], str | None] = {}  # file version -> formats.file_kind

    def _root(self, kind: str) -> Path:
        return self.user_root if self.user_root is not None and kind in USER_KINDS else self.root

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r}, tiny={self.tiny})"

    def folder(self, kind: str) -> Path:
        return self._root(kind) / FOLDERS[kind][0]

    def ensure_layout(self) -> None:
        for kind in FOLDERS:
            self.folder(kind).mkdir(parents=True, exist_ok=True)

    def list(self, kind: str) -> list[str]:
        """Model files of one kind, as the names a workflow uses (POSIX separators)."""
        names: set[str] = set()
        for folder_name in FOLDERS[kind]:
            folder = self._root(kind) / folder_name
            if not folder.is_dir():
                continue
            # a diffusers folder (config.json inside) is one model, which list_folders names;
            # its shards are not models of their own
            packaged = [p.parent for p in folder.rglob("config.json")]
            for path in folder.rglob("*"):
                if path.suffix.lower() in MODEL_EXTENSIONS and path.is_file() and not path.name.startswith(".") \
                        and not any(path.is_relative_to(package) for package in packaged):
                    names.add(path.relative_to(folder).as_posix())
        return sorted(names)

    def list_loadable(self, kind: str, file_kinds: tuple[str, ...]) -> list[str]:
        """The files of one kind whose tensor names say a loader can take them (file_kinds, of
        ryla.models.formats.file_kind): read from each file's header, remembered per file
        version. Pickled formats (.ckpt, .pt, .bin) are never listed: ryla reads safetensors
        and GGUF only. A GGUF file is its general.architecture (flux: a transformer; t5: T5)."""
        return [name for name in self.list(kind) if self.file_kind(kind, name) in file_kinds]

    def listing(self, folder: str) -> list[str]:
        """A model folder's files as ComfyUI's GET /models/{folder} lists them, filtered to
        what its loaders can load: .gguf files only under ComfyUI-GGUF's `unet_gguf` and
        `clip_gguf` keys (its UnetLoaderGGUF's and CLIP loaders' lists), controlnet/ with its
        diffusers folders (InfuseNet) and without their inner files; folders no loader reads
        (instantid, insightface, tokenizers) as they are."""
        from ryla.models import formats

        if folder in GGUF_FOLDERS:
            kind = GGUF_FOLDERS[folder]
            return [n for n in self.list_loadable(kind, formats.FOLDER_FILE_KINDS[kind]) if n.lower().endswith(".gguf")]
        if folder not in formats.FOLDER_FILE_KINDS:
            return self.list(folder)
        names = [n for n in self.list_loadable(folder, formats.FOLDER_FILE_KINDS[folder])
                 if not n.lower().endswith(".gguf")]
        if folder in ("controlnet", "diffusion_models"):  # diffusers folders: InfuseNet, a transformer
            names += self.list_folders(folder)
        return sorted(names)

    def file_kind(self, kind: str, name: str) -> str | None:
        from ryla.models import formats, gguf_files, tensor_files

        try:
            path = self.resolve(kind, name)
            stat = path.stat()
        except (UnsafeNameError, ModelNotFoundError, OSError):
            return None  # a link out of the store, or gone since the listing: not listed
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._kinds:
            found = None
            try:
                if gguf_files.is_gguf(path):
                    arch = gguf_files.architecture(path)
                    found = {"flux": formats.FLUX_TRANSFORMER_FILE}.get(
                        arch, formats.T5_FILE if arch in gguf_files.T5_ARCHITECTURES else None)
                elif path.suffix.lower() in (".safetensors", ".sft"):
                    found = formats.file_kind(tensor_files.tensor_names(path))
            except tensor_files.ModelFormatError:
                found = None  # unreadable: not listed; naming it still gets the loader's reason
            self._kinds[key] = found
        return self._kinds[key]

    def resolve(self, kind: str, name: str) -> Path:
        """The file a workflow's model name refers to; refuses names that escape the tree."""
        for folder_name in FOLDERS[kind]:
            candidate = _inside(self._root(kind) / folder_name, name)
            if candidate.is_file():
                return candidate
        raise ModelNotFoundError(kind, name, self.list(kind))

    def list_folders(self, kind: str) -> list[str]:
        """Model folders in diffusers format (a config.json inside), such as InfuseNetModel."""
        folder = self.folder(kind)
        if not folder.is_dir():
            return []
        return sorted(p.parent.relative_to(folder).as_posix() for p in folder.rglob("config.json")
                      if not p.parent.name.startswith("."))

    def resolve_folder(self, kind: str, name: str) -> Path:
        candidate = _inside(self.folder(kind), name)
        if not (candidate / "config.json").is_file():
            raise ModelNotFoundError(kind, name, self.list_folders(kind))
        return candidate

    def path_for_new(self, kind: str, name: str) -> Path:
        """Where a new file of this kind and name goes (downloads, LoRA uploads)."""
        return self.folder(kind).joinpath(*_safe_parts(name))

    def has_flux_weights(self) -> bool:
        """True when FLUX weights are present, either as a checkpoint or as the split files."""
        if FLUX_CHECKPOINT in self.list("checkpoints"):
            return True
        split = self.list("diffusion_models"), self.list("text_encoders"), self.list("vae")
        return FLUX_TRANSFORMER in split[0] and {CLIP_L, T5XXL} <= set(split[1]) and FLUX_VAE in split[2]

    def missing_tokenizers(self) -> list[str]:
        """Tokenizer folders the FLUX text encoders need that are not in tokenizers/."""
        return [name for name in ("clip_l", "t5xxl")
                if not (self.folder("tokenizers") / name / "tokenizer_config.json").is_file()]

    def kontext_model(self) -> str | None:
        """The store's FLUX.1 Kontext dev transformer (diffusion_models/), or None."""
        installed = set(self.list("diffusion_models"))
        return next((name for name in KONTEXT_FILES if name in installed), None)

    def fill_model(self) -> str | None:
        """The store's FLUX.1 Fill dev transformer (diffusion_models/), or None."""
        return FILL_FILE if FILL_FILE in self.list("diffusion_models") else None

    def inventory(self) -> dict[str, list[str]]:
        return {kind: self.list(kind) for kind in FOLDERS if kind != "tokenizers"}


def _safe_parts(name: str) -> tuple[str, ...]:
    """Path parts of a relative model name; refuses absolute names, '..' and NUL bytes."""
    if not name or "\x00" in name or name.startswith(("/", "\\")) or Path(name).is_absolute():
        raise UnsafeNameError(f"invalid model name {name!r}")
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts or (parts and ":" in parts[0]):
        raise UnsafeNameError(f"model name {name!r} leaves the model folder")
    return parts


def _inside(folder: Path, name: str) -> Path:
    """`folder/name` with links resolved; refuses a name that ends up outside the folder."""
    folder = folder.resolve()
    candidate = folder.joinpath(*_safe_parts(name)).resolve()
    if not candidate.is_relative_to(folder):
        raise UnsafeNameError(f"model name {name!r} leaves the model folder")
    return candidate
