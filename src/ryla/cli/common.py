"""Pieces shared by `ryla` and `ryla-client`: catalogue-driven options, errors, file output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ryla import catalogue


class CliError(Exception):
    """A one-line, user-facing failure: printed as `error: ...`, exit status 1."""


def add_param(parser: argparse.ArgumentParser, param: catalogue.Param, *, flag: str | None = None,
              required: bool = False, omit_default: bool = False) -> None:
    """A command-line option whose type, default, choices and help come from the catalogue.
    With omit_default, an option not given stays None (the client leaves it to the server)."""
    flag = flag or "--" + param.name.replace("_", "-")
    bounds = []
    if param.min is not None and param.type is not str:
        bounds.append(f"min {param.min:g}")
    if param.max is not None and param.type is not str:
        bounds.append(f"max {param.max:g}")
    if param.multiple_of:
        bounds.append(f"multiple of {param.multiple_of}")
    help_text = param.description + (f" ({', '.join(bounds)})" if bounds else "")
    if param.default is not None and not required:
        help_text += f" [default: {param.default}]"
    default = None if required or omit_default else param.default
    parser.add_argument(flag, dest=param.name, type=param.type, default=default, choices=param.choices,
                        required=required, help=help_text, metavar=None if param.choices else param.name.upper())


def lora_line(entry: dict) -> str:
    """One row of a LoRA listing (`ryla loras list`, `ryla-client loras list`)."""
    return (f"{entry['id']:<32} {entry.get('format', '?'):<8} rank {str(entry.get('rank', '?')):<4} "
            f"{entry['size'] / 1e6:8.1f} MB  trigger: {entry.get('trigger_word') or '-'}")


def prefixed_paths(folder: Path, prefixes: list[str], extension: str) -> list[Path]:
    """Files for images saved under ComfyUI filename prefixes: prefix_00001.png, ... counting on
    from the highest index already in `folder` for that prefix, as ComfyUI's
    folder_paths.get_save_image_path does, so a second run never overwrites the first."""
    import re

    counters: dict[str, int] = {}
    paths = []
    for prefix in prefixes:
        name = Path(prefix).name or "ComfyUI"
        if name not in counters:
            pattern = re.compile(rf"^{re.escape(name)}_(\d+)_?\.[A-Za-z0-9]+$")
            found = [int(m.group(1)) for f in folder.glob(f"{glob_escape(name)}_*") if (m := pattern.match(f.name))]
            counters[name] = max(found, default=0)
        counters[name] += 1
        paths.append(folder / f"{name}_{counters[name]:05d}.{extension}")
    return paths


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def numbered_paths(path: Path, count: int) -> list[Path]:
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i + 1}{path.suffix}") for i in range(count)]


def run_cli(action: Callable[[], None]) -> int:
    """Run a command: `error: ...` and status 1 for a CliError, 130 on Ctrl-C, never a traceback
    for what the user can fix."""
    try:
        action()
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
