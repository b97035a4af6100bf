"""A Python environment holding only ryla's dependency closure, made from the packages at hand.

Why: the cold start is mostly imports, and diffusers and transformers import optional packages
whenever they are installed (diffusers.hooks imports peft; transformers' generation code imports
scikit-learn, and through it SciPy). A GPU machine's image often carries them; ryla's own image
(`pip install ryla[gpu]`, the Modal app) does not. Timing the server in the machine's image
measures those extras; timing it here measures the product.

The environment is a venv without system packages whose site-packages holds links to every
installed distribution that ryla's requirements (pyproject.toml, with the `gpu` extra) reach,
following each distribution's own Requires-Dist with its markers. Nothing is copied or
installed, so it takes a second to make. Folders on PYTHONPATH (carried wheels, src/) still come
first, as they do for the machine's interpreter.

    python bench/product_env.py /tmp/product-env   # prints the interpreter and what was left out
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def ryla_requirements(extras: tuple[str, ...] = ("gpu",)) -> list[str]:
    """ryla's requirements from pyproject.toml: what `pip install ryla[extras]` asks for."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return requirements


def _wanted(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def dependency_closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """Installed distributions these requirements reach, by canonical name. Versions are not
    checked: the machine's own versions are the ones measured. A requirement that is not
    installed is skipped (it may be importable from PYTHONPATH, which stays visible)."""
    found: dict[str, metadata.Distribution] = {}
    pending = [(Requirement(text), set()) for text in requirements]
    while pending:
        requirement, parent_extras = pending.pop()
        if not _wanted(requirement, parent_extras):
            continue
        name = canonicalize_name(requirement.name)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen = found.get(name)
        found[name] = distribution
        # Revisit a distribution when a new extra of it is asked for (e.g. torch[opt-einsum]).
        if seen is not None and not requirement.extras:
            continue
        pending += [(Requirement(text), set(requirement.extras)) for text in distribution.requires or []]
    return found


def _top_level_entries(distribution: metadata.Distribution) -> set[Path]:
    """The site-packages entries a distribution installed: its packages, modules, .pth files
    and its .dist-info folder. From its RECORD; where there is none (some images build torch
    in place), from top_level.txt and where those modules are found."""
    entries = set()
    for file in distribution.files or []:
        if file.parts and file.parts[0] != "..":
            entries.add(Path(distribution.locate_file(file.parts[0])))
    if not entries:
        for module in (distribution.read_text("top_level.txt") or "").split():
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.origin not in (None, "built-in", "frozen"):
                origin = Path(spec.origin)
                entries.add(origin.parent if origin.name == "__init__.py" else origin)
        info = getattr(distribution, "_path", None)  # the .dist-info folder: versions stay readable
        if entries and info is not None:
            entries.add(Path(info))
    return entries


def _pythonpath() -> str:
    """PYTHONPATH as given, with src/ added: ryla itself is not linked into the environment."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT / "src") not in paths:
        paths.append(str(ROOT / "src"))
    return os.pathsep.join(paths)


def make(target: Path, extras: tuple[str, ...] = ("gpu",)) -> dict:
    """Makes (or remakes) the environment at `target`; returns its interpreter and a summary."""
    if (target / "pyvenv.cfg").exists():
        subprocess.run(["rm", "-rf", str(target)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    python = target / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    closure = dependency_closure(ryla_requirements(extras))
    without_files = []
    for name, distribution in sorted(closure.items()):
        entries = _top_level_entries(distribution)
        if not entries:
            without_files.append(name)
        for entry in entries:
            link = site / entry.name
            if entry.exists() and not link.exists():
                link.symlink_to(entry)
    # Fail here, not minutes later in a server: the product's imports must work in it.
    probe = subprocess.run([str(python), "-c", "import torch, diffusers, transformers, fastapi, uvicorn, ryla"],
                           capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": _pythonpath()})
    if probe.returncode != 0:
        raise RuntimeError(f"ryla does not import in {target}: {probe.stderr[-2000:]}")
    everything = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    return {"python": str(python), "site_packages": str(site), "base_site_packages": sysconfig.get_path("purelib"),
            "distributions": len(closure), "without_file_list": without_files,
            "left_out": sorted(everything - set(closure))}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Make a venv holding only ryla's dependency closure.")
    parser.add_argument("target", type=Path, help="folder for the environment (remade if it is one)")
    print(json.dumps(make(parser.parse_args().target), indent=2))
