"""`ryla generate` and `ryla run-workflow` as a user runs them: subprocesses, real files."""

from __future__ import annotations

import json
import subprocess
import sys

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
