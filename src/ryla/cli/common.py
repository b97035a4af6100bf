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
