"""The NSFW check: NudeNet's real detector on real, safe photos, and the modes (off, flag,
block; a request can only be stricter) over HTTP with a stand-in checker that flags on demand."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import Server

TESTS = Path(__file__).resolve().parent
SMALL = {"prompt": "a portrait", "width": 64, "height": 64, "steps": 1, "seed": 2, "output_format": "png"}


def test_nudenet_scores_real_safe_photos_safe_and_deterministically():
    from skimage import data

    from ryla.safety import NudeNetChecker

    checker = NudeNetChecker()
    photos = [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea")]
    assert checker.check(photos) == [False, False, False]
    first = [checker.detections(photo) for photo in photos]
    assert [checker.detections(photo) for photo in photos] == first  # the same answer every time
    assert [d["class"] for d in first[0]] == ["FACE_FEMALE"]  # it does see the astronaut


@pytest.fixture(scope="module")
def switch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety") / "switch"


def stand_in_server(server_env, switch, log_dir, *args):
    env = {**server_env, "RYLA_SAFETY_CHECKER": "safety_stand_in:FlagOnDemand", "RYLA_TEST_FLAG_FILE": str(switch),
           "PYTHONPATH": os.pathsep.join([str(TESTS), server_env.get("PYTHONPATH", "")])}
    return Server(env, *args, log_path=log_dir / "safety.log")


@pytest.fixture(scope="module")
def off_server(server_env, switch, tmp_path_factory):
    srv = stand_in_server(server_env, switch, tmp_path_factory.mktemp("logs-off"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def block_server(server_env, switch, tmp_path_factory):
    srv = stand_in_server(server_env, switch, tmp_path_factory.mktemp("logs-block"), "--safety", "block")
    yield srv
    srv.stop()


def calls(switch: Path) -> int:
    counter = switch.with_suffix(".calls")
    return int(counter.read_text()) if counter.exists() else 0


def generate(url, **fields):
    return httpx.post(url + "/flux-dev", json={**SMALL, **fields}, headers={"Accept": "application/json"}, timeout=60)


def image_of(response) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["data"]))).convert("RGB")


def test_off_never_runs_the_checker_and_a_request_can_ask_for_flag(off_server, switch):
    switch.write_text("flag")
    before = calls(switch)
    plain = generate(off_server.url)
    assert plain.status_code == 200 and "x-nsfw" not in plain.headers
    assert plain.json()["has_nsfw_concepts"] is None and calls(switch) == before
    flagged = generate(off_server.url, enable_safety_checker=True)
    assert flagged.status_code == 200 and calls(switch) == before + 1
    assert flagged.json()["has_nsfw_concepts"] == [True] and flagged.headers["x-nsfw"] == "true"
    assert flagged.json()["nsfw_blocked"] is False
    assert np.asarray(image_of(flagged)).any()  # flag reports, it does not black out
    assert np.array_equal(np.asarray(image_of(flagged)), np.asarray(image_of(plain)))
    switch.write_text("")
    assert generate(off_server.url, enable_safety_checker=True).json()["has_nsfw_concepts"] == [False]
    health = httpx.get(off_server.url + "/health").json()
    assert health["safety"] == {"mode": "off", "checker": "safety_stand_in:FlagOnDemand"}


def test_block_blacks_out_flagged_images_and_a_request_cannot_loosen_it(block_server, switch):
    switch.write_text("")
    safe = generate(block_server.url, num_images=2)
    assert safe.json()["has_nsfw_concepts"] == [False, False] and safe.json()["nsfw_blocked"] is False
    switch.write_text("flag")
    for fields in ({}, {"enable_safety_checker": False}):
        blocked = generate(block_server.url, **fields)
        assert blocked.status_code == 200
        assert blocked.json()["has_nsfw_concepts"] == [True] and blocked.json()["nsfw_blocked"] is True
        assert blocked.headers["x-nsfw-blocked"] == "true"
        image = image_of(blocked)
        assert image.size == (64, 64) and not np.asarray(image).any()  # black, the same size
    # Async jobs too: the kept file is the black one, and the job says so.
    job = httpx.post(block_server.url + "/flux-dev", json=SMALL, headers={"Prefer": "respond-async"}).json()
    with httpx.stream("GET", job["events_url"], timeout=60) as events:
        for _ in events.iter_lines():
            pass
    state = httpx.get(job["status_url"]).json()
    assert state["result"]["has_nsfw_concepts"] == [True] and state["result"]["nsfw_blocked"] is True
    kept = Image.open(io.BytesIO(httpx.get(state["result"]["images"][0]["url"]).content)).convert("RGB")
    assert not np.asarray(kept).any()
    assert httpx.get(block_server.url + "/health").json()["safety"]["mode"] == "block"


def test_ryla_generate_safety_flag_reports_each_image(cli_env, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "generate", "--prompt", "a fox", "--width", "64",
                             "--height", "64", "--steps", "1", "--seed", "1", "--safety", "flag",
                             "--output", str(tmp_path / "fox.png")], env=cli_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "safety (flag): fox.png: safe" in result.stdout


def test_the_clip_checker_loads_a_diffusers_folder_and_checks(tmp_path):
    """ClipChecker's path on a small StableDiffusionSafetyChecker saved as the Hub's folder is."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from ryla.safety import ClipChecker

    torch.manual_seed(0)
    config = CLIPConfig(vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                       "num_hidden_layers": 2, "patch_size": 14, "image_size": 224},
                        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                     "num_hidden_layers": 2}, projection_dim=16)
    StableDiffusionSafetyChecker(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(tmp_path)
    checker = ClipChecker(str(tmp_path), device="cpu")
    flags = checker.check([Image.new("RGB", (96, 64), "white"), Image.new("RGB", (64, 64), "black")])
    assert len(flags) == 2 and all(isinstance(flag, bool) for flag in flags)
