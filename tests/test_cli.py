"""`ryla generate` and `ryla run-workflow` as a user runs them: subprocesses, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

FOX = ["generate", "--prompt", "a red fox in the snow", "--width", "256", "--height", "256", "--steps", "4"]


def ryla(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "ryla.cli.main", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_generate_writes_a_deterministic_jpeg(cli_env, tmp_path):
    first = ryla([*FOX, "--seed", "7", "--output", "fox.jpg"], cli_env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "seed 7" in first.stdout
    assert "TINY random-weight" in first.stderr  # said once, clearly
    with Image.open(tmp_path / "fox.jpg") as image:
        assert image.format == "JPEG" and image.size == (256, 256)
    assert ryla([*FOX, "--seed", "7", "--output", "again.jpg"], cli_env, tmp_path).returncode == 0
    assert ryla([*FOX, "--seed", "8", "--output", "other.jpg"], cli_env, tmp_path).returncode == 0
    assert (tmp_path / "fox.jpg").read_bytes() == (tmp_path / "again.jpg").read_bytes()
    assert (tmp_path / "fox.jpg").read_bytes() != (tmp_path / "other.jpg").read_bytes()


def test_generate_rejects_bad_input_in_one_line(cli_env, tmp_path):
    cases = {
        ("--width", "1000"): "width must be a multiple of 16",
        ("--steps", "0"): "steps must be >= 1",
        ("--checkpoint", "missing.safetensors"): "missing.safetensors",
    }
    for extra, message in cases.items():
        result = ryla(["generate", "--prompt", "x", "--width", "64", "--height", "64", *extra], cli_env, tmp_path)
        assert result.returncode == 1
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_run_workflow_and_unreadable_workflows(cli_env, tmp_path):
    from ryla.workflows import FLUX_DEV

    graph = FLUX_DEV.fill(prompt="a cat", width=64, height=64, steps=2, seed=1, batch_size=2)
    (tmp_path / "wf.json").write_text(json.dumps({"prompt": graph}))  # ComfyUI /prompt body
    ok = ryla(["run-workflow", "wf.json", "--output-dir", "out"], cli_env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ryla_flux_dev_00001.png",
                                                                    "ryla_flux_dev_00002.png"]
    (tmp_path / "bad.json").write_text("{not json")
    for name, message in (("bad.json", "not valid JSON"), ("absent.json", "cannot read workflow")):
        result = ryla(["run-workflow", name], cli_env, tmp_path)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    graph["7"]["inputs"]["steps"] = 0
    (tmp_path / "invalid.json").write_text(json.dumps(graph))
    result = ryla(["run-workflow", "invalid.json"], cli_env, tmp_path)
    assert result.returncode == 1 and "node 7 (KSampler)" in result.stderr


def test_help_reads_well(cli_env, tmp_path):
    result = ryla(["generate", "--help"], cli_env, tmp_path)
    assert result.returncode == 0
    assert "multiple of 16" in result.stdout and "[default: 28]" in result.stdout


def test_real_weights_without_tokenizers_are_refused_up_front(cli_env, tiny_store, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store.root, store, ignore=shutil.ignore_patterns("tokenizers", "TINY_MODELS", "loras"))
    env = {**cli_env, "RYLA_MODELS_DIR": str(store)}
    result = ryla(["generate", "--prompt", "x", "--width", "64", "--height", "64"], env, tmp_path)
    assert result.returncode == 1 and "no tokenizers/clip_l" in result.stderr and "Traceback" not in result.stderr
    result = ryla(["serve", "--port", "1"], env, tmp_path)
    assert result.returncode == 1 and "ryla models download" in result.stderr


def test_outputs_never_overwrite_and_carry_their_parameters(cli_env, tmp_path):
    from ryla import imaging

    small = ["generate", "--prompt", "a red fox", "--width", "64", "--height", "64", "--steps", "2"]
    for seed in ("1", "2"):
        result = ryla([*small, "--seed", seed], cli_env, tmp_path)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == ["ryla_00001.jpg", "ryla_00002.jpg"]
    parameters = imaging.read_parameters((tmp_path / "ryla_00002.jpg").read_bytes())
    assert parameters == {"prompt": "a red fox", "negative_prompt": "", "seed": 2, "width": 64, "height": 64,
                          "steps": 2, "guidance": 3.5, "cfg": 1.0,
                          "model": "flux1-dev-fp8.safetensors (tiny random weights)"}
    assert ryla([*small, "--seed", "3", "--output", "x.png"], cli_env, tmp_path).returncode == 0
    assert imaging.read_parameters((tmp_path / "x.png").read_bytes())["seed"] == 3


def test_global_options_anywhere_and_a_clean_exit_into_a_closed_pipe(cli_env, tmp_path):
    verbose = ryla(["generate", "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1", "-v"], cli_env,
                   tmp_path)
    assert verbose.returncode == 0 and "INFO" in verbose.stderr, verbose.stderr
    client = subprocess.run([sys.executable, "-m", "ryla.cli.client", "health", "--url", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=60)
    assert client.returncode == 1 and "http://127.0.0.1:9" in client.stderr, client.stderr
    # `ryla loras list --json | head -c 1`: the reader leaves at once; no traceback
    assert ryla(["loras", "make-example"], cli_env, tmp_path).returncode == 0
    again = ryla(["loras", "make-example"], cli_env, tmp_path)  # a second run is not an error
    assert again.returncode == 0 and "already in" in again.stdout
    listing = subprocess.Popen([sys.executable, "-m", "ryla.cli.main", "loras", "list", "--json"], env=cli_env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    listing.stdout.close()
    _, stderr = listing.communicate(timeout=120)
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()
    assert stderr.count(b"TINY random-weight") == 1  # the tiny-model notice: once, on stderr


def test_generate_with_loras_a_reference_and_a_prompts_file(cli_env, tmp_path, test_photos):
    from ryla import imaging

    made = ryla(["loras", "make-example", "--id", "anna", "--trigger-word", "ohwx"], cli_env, tmp_path)
    assert made.returncode == 0 and "ryla generate" in made.stdout, made.stderr
    small = ["--width", "64", "--height", "64", "--steps", "2", "--seed", "5"]
    lora = ryla(["generate", "--prompt", "a portrait", "--lora", "anna:0.7", *small, "-o", "lora.png"], cli_env,
                tmp_path)
    assert lora.returncode == 0, lora.stderr
    assert imaging.read_parameters((tmp_path / "lora.png").read_bytes())["loras"] == [{"id": "anna", "strength": 0.7}]
    face = ryla(["generate", "--prompt", "a portrait", "--reference", str(test_photos / "obama.jpg"), "--lora",
                 "anna", *small, "-o", "face.png"], cli_env, tmp_path)
    assert face.returncode == 0, face.stderr
    assert imaging.read_parameters((tmp_path / "face.png").read_bytes())["identity_strength"] == 0.8
    missing = ryla(["generate", "--prompt", "x", "--lora", "nobody", *small], cli_env, tmp_path)
    assert missing.returncode == 1 and "no LoRA with id 'nobody'" in missing.stderr

    (tmp_path / "prompts.txt").write_text("# a batch\na red fox\n\n"
                                          '{"prompt": "a blue bird", "seed": 11, "loras": [["anna", 0.5]]}\n'
                                          "a green frog\n")
    batch = ryla(["generate", "--prompts", "prompts.txt", *small, "--output-dir", "batch"], cli_env, tmp_path)
    assert batch.returncode == 0, batch.stderr
    names = sorted(p.name for p in (tmp_path / "batch").iterdir())
    assert names == ["contact-sheet_00001.jpg", "ryla_00001.jpg", "ryla_00002.jpg", "ryla_00003.jpg"]
    bird = imaging.read_parameters((tmp_path / "batch" / "ryla_00002.jpg").read_bytes())
    assert bird["seed"] == 11 and bird["prompt"] == "ohwx, a blue bird"
    assert batch.stderr.count("TINY random-weight") == 1
    (tmp_path / "bad.txt").write_text('a fox\n{"prompt": "x", "setps": 3}\n')
    bad = ryla(["generate", "--prompts", "bad.txt", *small], cli_env, tmp_path)
    assert bad.returncode == 1 and "line 2 of bad.txt: unknown field 'setps'" in bad.stderr
    assert not (tmp_path / "ryla-batch").exists(), "nothing runs before the whole file is checked"
    both = ryla(["generate", "--prompt", "x", "--prompts", "prompts.txt"], cli_env, tmp_path)
    assert both.returncode == 1 and "one of them" in both.stderr


def test_a_lora_for_the_real_model_is_refused_naming_the_tiny_model(cli_env, tmp_path):
    import torch
    from safetensors.torch import save_file

    # rank-4 factors with FLUX.1-dev's real width (3072), for a model that is not there
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)},
              str(tmp_path / "real.safetensors"))
    result = ryla(["loras", "add", "real.safetensors"], cli_env, tmp_path)
    assert result.returncode == 1 and "tiny random-weight FLUX.1-dev stand-in" in result.stderr, result.stderr
    assert "ryla loras make-example" in result.stderr


def test_serve_help_names_every_environment_variable_the_code_reads(cli_env, tmp_path):
    import re
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "src" / "ryla"
    names = set()
    for path in source.rglob("*.py"):
        names |= set(re.findall(r"environ(?:\.get)?\(\s*\"(RYLA_[A-Z0-9_]+)\"", path.read_text()))
        names |= set(re.findall(r"\(\"[a-z_]+\", \"(RYLA_[A-Z0-9_]+)\"", path.read_text()))
    client_only = {"RYLA_URL", "RYLA_MODAL_KEY", "RYLA_MODAL_SECRET"}
    assert len(names) > 15
    text = ryla(["serve", "--help"], cli_env, tmp_path).stdout
    missing = sorted(name for name in names - client_only if name not in text)
    assert not missing, f"ryla serve --help does not mention {missing}"


def test_serve_holds_its_port_while_loading_and_says_when_ready(cli_env, tmp_path):
    from conftest import free_port

    port = free_port()
    first = subprocess.Popen([sys.executable, "-m", "ryla.cli.main", "serve", "--port", str(port)], env=cli_env,
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = first.stderr.readline()
            lines.append(line)
            if "loading the TINY model set" in line:  # bound before loading
                break
        second = ryla(["serve", "--port", str(port)], cli_env, tmp_path)
        assert second.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in second.stderr, second.stderr
        while time.monotonic() < deadline and not any("ready on" in line for line in lines):
            lines.append(first.stderr.readline())
        ready = [line for line in lines if "ready on" in line]
        assert ready and f"http://127.0.0.1:{port}" in ready[0], lines
        import httpx

        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        first.terminate()
        first.wait(timeout=30)


@pytest.mark.parametrize("setting,value", [("RYLA_LORA_PLAN_MEMORY", "half"), ("RYLA_CUDA_GRAPHS", "yes")])
def test_serve_refuses_a_bad_engine_setting(cli_env, tmp_path, setting, value):
    """A bad engine setting stops the server at start with the setting named, no traceback."""
    from conftest import free_port

    result = ryla(["serve", "--port", str(free_port())], {**cli_env, setting: value}, tmp_path)
    assert result.returncode != 0
    assert f"{setting}={value!r}" in result.stderr and "Traceback" not in result.stderr
