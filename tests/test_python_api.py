"""The Python API (`from ryla import Ryla`) as a user calls it: the same images as the server
and the CLI for the same inputs, the typed endpoints' combinations, and errors that name the
parameter."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import httpx
import pytest

from conftest import image_difference


@pytest.fixture(scope="module")
def ryla(runtime):
    from ryla import Ryla

    return Ryla(runtime=runtime)


def png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_same_image_in_process_over_http_and_from_the_cli(ryla, server, cli_env, tmp_path):
    made = ryla.generate("a red fox", width=64, height=64, steps=2, seed=21)
    served = httpx.post(server.url + "/flux-dev", json={"prompt": "a red fox", "width": 64, "height": 64, "steps": 2,
                                                         "seed": 21, "output_format": "png"}, timeout=120)
    assert served.status_code == 200 and image_difference(png(made.image), served.content) <= 2
    cli = subprocess.run([sys.executable, "-m", "ryla.cli.main", "generate", "--prompt", "a red fox", "--width", "64",
                          "--height", "64", "--steps", "2", "--seed", "21", "-o", "cli.png"], env=cli_env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    from PIL import Image

    with Image.open(tmp_path / "cli.png") as image:
        assert image.tobytes() == made.image.tobytes()  # in-process against in-process: exact


def test_identity_with_a_lora_and_strength_zero(ryla, test_photos, tmp_path):
    ryla.make_example_lora("py-api-lora", trigger_word="zxq")
    face = test_photos / "obama.jpg"
    options = dict(width=64, height=64, steps=2, seed=4)
    alone = ryla.generate_identity("zxq, a portrait", face, **options)
    with_zero_lora = ryla.generate_identity("a portrait", face, loras=[("py-api-lora", 0.0)], **options)
    assert with_zero_lora.parameters["prompt"] == "zxq, a portrait"
    assert with_zero_lora.image.tobytes() == alone.image.tobytes()
    with_lora = ryla.generate_identity("a portrait", face, loras=["py-api-lora"], **options)
    assert with_lora.image.tobytes() != alone.image.tobytes()
    assert with_lora.parameters["identity_strength"] == 0.8


@pytest.mark.parametrize("call,message", [
    (lambda r: r.generate("x", steps=0), "steps must be >= 1"),
    (lambda r: r.generate("x", width="64"), "width must be a whole number"),
    (lambda r: r.generate("   "), "prompt must not be empty"),
    (lambda r: r.generate("x", mask="m.png"), "mask applies only with an image"),
    (lambda r: r.generate("x", pose="p.png"), "pose applies only with a reference"),
    (lambda r: r.generate("x", image="/nonexistent.png"), "image: cannot read /nonexistent.png"),
    (lambda r: r.generate("x", image=b"not an image"), "image:"),
    (lambda r: r.generate("x", loras=[("nobody", 1.0)]), "no LoRA with id 'nobody'"),
    (lambda r: r.generate("x", loras=[("nobody", 9.0)]), "strength of LoRA 'nobody'"),
    (lambda r: r.run_workflow({"1": {"class_type": "Nope", "inputs": {}}}), "invalid workflow"),
])
def test_errors_name_the_parameter(ryla, call, message):
    from ryla import RylaError

    with pytest.raises(RylaError, match=message):
        call(ryla)


def test_generate_shows_step_progress_on_a_terminal(cli_env, tmp_path):
    """On a terminal, `ryla generate` draws a progress bar with the step count and the time left."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ryla.cli.main", "generate", "--prompt", "x", "--width", "128",
                                "--height", "128", "--steps", "6", "--seed", "1", "-o", "p.jpg"], env=cli_env,
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=300) == 0
    text = output.decode(errors="replace")
    assert "sampling" in text and "/6" in text and "left" in text, text[-2000:]
