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
              required: bool = False, omit_default: bool = False, default_text: str | None = None) -> None:
    """A command-line option whose type, default, choices and help come from the catalogue.
    With omit_default, an option not given stays None (the client leaves it to the server).
    default_text replaces the catalogue's default in the help, where a command has its own."""
    flag = flag or "--" + param.name.replace("_", "-")
    bounds = []
    if param.min is not None and param.type is not str:
        bounds.append(f"min {param.min:g}")
    if param.max is not None and param.type is not str:
        bounds.append(f"max {param.max:g}")
    if param.multiple_of:
        bounds.append(f"multiple of {param.multiple_of}")
    help_text = param.description + (f" ({', '.join(bounds)})" if bounds else "")
    if default_text is not None:
        help_text += f" [default: {default_text}]"
    elif param.default is not None and not required:
        help_text += f" [default: {param.default}]"
    default = None if required or omit_default else param.default
    parser.add_argument(flag, dest=param.name, type=param.type, default=default, choices=param.choices,
                        required=required, help=help_text, metavar=None if param.choices else param.name.upper())


def accept_anywhere(parser: argparse.ArgumentParser, add_options: Callable[[argparse.ArgumentParser, bool], None]
                    ) -> None:
    """Global options wherever the user types them: before the command (`ryla -v generate`) or
    after it (`ryla generate ... -v`). `add_options(p, top)` adds them to `p`; below the top
    they default to "not given" (argparse.SUPPRESS), so a value given before the command is
    not reset by the subcommand's parser."""
    add_options(parser, True)

    def walk(node: argparse.ArgumentParser) -> None:
        for action in node._actions:  # argparse keeps subcommands as a _SubParsersAction's choices
            if isinstance(action, argparse._SubParsersAction):
                for child in dict.fromkeys(action.choices.values()):
                    add_options(child, False)
                    walk(child)

    walk(parser)


def default_output(folder: Path, fmt: str, prefix: str = "ryla") -> Path:
    """Where an image goes when no --output names it: ryla_00001.jpg, ryla_00002.jpg, ...
    counting on from the files already there, so a run never replaces an earlier image."""
    from ryla.imaging import extension

    return prefixed_paths(folder, [prefix], extension(fmt))[0]


def output_paths(output: str | None, fmt: str, count: int) -> list[Path]:
    """The files for `count` images: --output as given (several get _1, _2, ...), else the
    next free ryla_NNNNN names in the current folder."""
    from ryla.imaging import extension

    if output is not None:
        return numbered_paths(Path(output), count)
    return prefixed_paths(Path.cwd(), ["ryla"] * count, extension(fmt))


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
        sys.stdout.flush()  # here, so a reader that left (`| head`) is handled below, not at exit
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `ryla loras list --json | head`: the reader left; exit quietly as Unix tools do, with
        # stdout pointed at /dev/null so Python's own flush at exit does not fail again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    return 0
