"""The docs cannot rot: every documented command parses with the real CLI, every documented
route exists, and the README's main job and the API doc's curl examples run for real."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_lines(path: Path) -> list[str]:
    """Commands in ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def documented_commands(program: str) -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line in shell_lines(path):
            words = shlex.split(line.split("&")[0].split("|")[0])
            if words and words[0] == program:
                found.append((f"{path.name}: {line}", words[1:]))
    return found


@pytest.mark.parametrize("where,argv", documented_commands("ryla"), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_ryla_commands_parse(where, argv):
    from ryla.cli.main import build_parser

    build_parser().parse_args(argv)


@pytest.mark.parametrize("where,argv", documented_commands("ryla-client"),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_documented_client_commands_parse(where, argv):
    from ryla.cli.client import build_parser

    build_parser().parse_args(argv)


def test_every_documented_route_exists(runtime):
    from ryla.api.app import ServerSettings, create_app

    from ryla.api import playground
    from ryla.api.routes import comfy, docs, editor

    app = create_app(runtime, ServerSettings(preload=False))
    # Served routes: those in the OpenAPI schema, the playground's and the editor's (left out
    # of it), and FastAPI's own documentation routes.
    routes = {(method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
              for path, operations in app.openapi()["paths"].items() for method in operations}
    routes |= {(method, re.sub(r"\{[^}]+\}", "{}", route.path))
               for route in [*playground.router.routes, *editor.router.routes, *docs.router.routes, *app.routes]
               for method in getattr(route, "methods", ())}
    routes |= {("GET", route.path) for route in comfy.router.routes if type(route).__name__ == "APIWebSocketRoute"}
    mentioned = set()
    for path in DOCS:
        for method, route in re.findall(r"`(GET|POST|DELETE|PUT)\s+(/[^`\s]*)`", path.read_text()):
            mentioned.add((method, re.sub(r"\{[^}]+\}", "{}", route.split("?")[0])))
    assert mentioned, "the docs mention routes"
    assert not mentioned - routes, f"documented but not served: {sorted(mentioned - routes)}"
    assert {("POST", "/flux-dev"), ("POST", "/flux-instantid"), ("POST", "/flux-lora"),
            ("POST", "/workflow")} <= mentioned


def test_readme_main_job_runs_as_written(cli_env, tmp_path):
    command = [line for line in shell_lines(ROOT / "README.md") if line.startswith("ryla generate")][0]
    words = shlex.split(command)
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", *words[1:]], env=cli_env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fox.jpg").stat().st_size > 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_api_doc_curl_examples_run_against_a_live_server(server, tmp_path):
    curls = [line for line in shell_lines(ROOT / "docs" / "api.md") if line.startswith("curl")
             and ("/flux-dev" in line or line.endswith("/loras"))]
    assert curls
    for line in curls:
        command = line.replace("localhost:8000", server.url.removeprefix("http://"))
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, timeout=300)
        assert result.returncode == 0, (line, result.stderr)
    assert (tmp_path / "fox.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


def test_api_doc_python_examples_run_against_a_live_server(server, tmp_path):
    """Each ```python block of docs/api.md (async jobs, ComfyUI's websocket client,
    comfy-api-simplified, the openai client) runs as written against a real server; only the
    server's address is changed, and the repository's files are found from the repo root."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)
    assert len(blocks) >= 4
    host = server.url.removeprefix("http://")
    for block in blocks:
        code = block.replace("localhost:8000", host).replace('"src/ryla/', f'"{ROOT}/src/ryla/')
        script = tmp_path / "example.py"
        script.write_text(code)
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, (code, result.stderr)
    written = sorted(path.name for path in tmp_path.glob("*.png"))
    assert "fox.png" in written and any(name.startswith("ryla_flux_dev_") for name in written)


def test_python_api_doc_examples_run(tiny_dir, tmp_path, monkeypatch):
    """docs/python.md's examples, as doctests, from a copy of the repository's docs (the
    examples use paths relative to the repository's root) on an empty store: the tiny model."""
    import doctest

    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "docs" / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RYLA_MODELS_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("RYLA_TINY_MODELS_DIR", str(tiny_dir))
    results = doctest.testfile(str(ROOT / "docs" / "python.md"), module_relative=False,
                               optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert results.attempted >= 20 and results.failed == 0, results


def test_readme_first_five_minutes_runs_as_written(cli_env, tmp_path):
    """The README's "First five minutes" block, run by bash as written, from a copy of the
    repository's docs/examples on an empty store (the tiny model): every command succeeds and
    nothing prints a warning or a traceback. Only the port is changed, to a free one."""
    import os

    from conftest import free_port

    section = (ROOT / "README.md").read_text().split("## First five minutes", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "docs" / "examples")
    port = free_port()
    # the test's own lines: stop the background server however the block ends
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + block.replace("8000", str(port))
    env = {**cli_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cli_env['PATH']}",
           "RYLA_MODELS_DIR": str(tmp_path / "store"), "RYLA_URL": f"http://127.0.0.1:{port}"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output and "Warning:" not in output, output
    for name in ("ryla_00001.jpg", "ryla_00002.jpg", "portrait.png", "served.jpg", "out/fox_00001.png", "api.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "ready on http://127.0.0.1:" in output
