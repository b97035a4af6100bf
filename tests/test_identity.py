"""/flux-instantid and the identity path on the tiny model."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from ryla.identity.faces import ImageError, cosine, decode_image, open_analyzer
from ryla.identity.keypoints import draw_kps
from conftest import image_difference


def png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    from skimage import data

    return png(data.astronaut())


FLUX = {"prompt": "a portrait photo", "width": 64, "height": 64, "steps": 3, "seed": 9, "output_format": "png"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_real_face_is_found_and_embedded(tiny_store, astronaut):
    analyzer = open_analyzer(tiny_store)
    faces = analyzer.faces(decode_image(astronaut))
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].bbox
    assert 150 < (x0 + x1) / 2 < 300 and 50 < (y0 + y1) / 2 < 200  # the astronaut's face
    assert faces[0].embedding.shape == (512,) and abs(np.linalg.norm(faces[0].embedding) - 1) < 1e-5
    assert cosine(faces[0].embedding, faces[0].embedding) == pytest.approx(1.0)
    flat = analyzer.faces(decode_image(png(np.full((256, 256, 3), 128))))
    noise = analyzer.faces(decode_image(png(np.random.default_rng(0).integers(0, 255, (256, 256, 3)))))
    assert flat == [] and noise == []


def test_keypoint_image_draws_five_points_on_black():
    kps = np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]], dtype=np.float32)
    image = np.asarray(draw_kps((100, 100), kps))
    assert image.shape == (100, 100, 3) and image[0, 0].tolist() == [0, 0, 0]
    assert image[40, 30].tolist() == [255, 0, 0] and image[60, 50].tolist() == [0, 0, 255]


def test_decode_image_refuses_what_is_not_an_image(astronaut):
    assert decode_image("data:image/png;base64," + b64(astronaut)).size == (512, 512)
    for bad in ("not base64!!", b64(b"plain text"), b"\x89PNG\r\n\x1a\n broken"):
        with pytest.raises(ImageError):
            decode_image(bad)


def test_flux_instantid_endpoint(server, astronaut):
    url = server.url
    base = httpx.post(url + "/flux-dev", json=FLUX, timeout=120).content
    zero = httpx.post(url + "/flux-instantid", json={**FLUX, "reference_image": b64(astronaut),
                                                      "instantid_strength": 0, "controlnet_strength": 0}, timeout=120)
    assert zero.status_code == 200, zero.text
    # Strengths 0 run the plain model (apply_identity returns it unchanged), so this is /flux-dev's
    # image; to within 2 levels, as every comparison of server responses (conftest.image_difference).
    difference = image_difference(zero.content, base)
    assert difference <= 2, f"strengths 0 must give /flux-dev's image (largest pixel difference {difference})"
    assert zero.headers["x-faces-found"] == "1"
    identity = httpx.post(url + "/flux-instantid", json={**FLUX, "reference_image": "data:image/png;base64," +
                                                          b64(astronaut)}, timeout=120)
    assert identity.status_code == 200 and identity.content != base
    again = httpx.post(url + "/flux-instantid", json={**FLUX, "reference_image": b64(astronaut)}, timeout=120)
    assert image_difference(again.content, identity.content) <= 2, "the same request must give the same image"
    posed = httpx.post(url + "/flux-instantid", json={**FLUX, "reference_image": b64(astronaut),
                                                       "pose_image": b64(astronaut)}, timeout=120)
    assert posed.status_code == 200 and posed.content not in (identity.content, base)


@pytest.mark.parametrize("image,status,error_type", [
    ("###", 422, "invalid_image"),
    (base64.b64encode(b"hello, not an image").decode(), 422, "invalid_image"),
    (base64.b64encode(png(np.full((256, 256, 3), 90))).decode(), 422, "no_face_detected"),
    (base64.b64encode(png(np.random.default_rng(1).integers(0, 255, (256, 256, 3)))).decode(), 422,
     "no_face_detected"),
])
def test_flux_instantid_errors(server, image, status, error_type):
    r = httpx.post(server.url + "/flux-instantid", json={**FLUX, "reference_image": image}, timeout=120)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == error_type


def test_oversized_reference_gets_413(strict_server):
    big = base64.b64encode(b"\x00" * 200_000).decode()  # over the strict server's 64 KiB body limit
    r = httpx.post(strict_server.url + "/flux-instantid", headers={"Authorization": "Bearer s3cret-key"},
                   json={**FLUX, "reference_image": big}, timeout=60)
    assert r.status_code == 413


def test_reference_over_the_image_limit_gets_413(server):
    big = base64.b64encode(b"\x00" * (11 * 1024 * 1024)).decode()  # default image limit: 10 MB
    r = httpx.post(server.url + "/flux-instantid", json={**FLUX, "reference_image": big}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "image_too_large"


def test_client_flux_instantid_character_sheet_and_eval(server, astronaut, tmp_path, cli_env):
    import json
    import subprocess
    import sys

    (tmp_path / "face.png").write_bytes(astronaut)

    def client(*args):
        return subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url", server.url, *args],
                              capture_output=True, text=True, timeout=300)

    r = client("flux-instantid", "--prompt", "a portrait", "--reference", str(tmp_path / "face.png"), "--width", "64",
               "--height", "64", "--steps", "2", "--seed", "4", "--output", str(tmp_path / "id.png"))
    assert r.returncode == 0, r.stderr
    r = client("character-sheet", "--reference", str(tmp_path / "face.png"), "--count", "3", "--width", "64",
               "--height", "64", "--steps", "2", "--seed", "5", "--output-dir", str(tmp_path / "sheet"))
    assert r.returncode == 0, r.stderr
    assert "of 3 variations look like the reference" in r.stdout and "SFace cosine" in r.stdout
    names = sorted(p.name for p in (tmp_path / "sheet").iterdir())
    assert names == ["contact_sheet.png", "sheet_01.png", "sheet_02.png", "sheet_03.png"]
    assert Image.open(tmp_path / "sheet" / "contact_sheet.png").size == (3 * 64, 64 + 28)
    r = client("flux-instantid", "--prompt", "x", "--reference", str(tmp_path / "missing.png"))
    assert r.returncode == 1 and "cannot read reference image" in r.stderr

    # The astronaut photo itself, twice, and a face-less image: 2 of 3 match.
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "a.png").write_bytes(astronaut)
    (evaluation / "b.png").write_bytes(astronaut)
    (evaluation / "c.png").write_bytes(png(np.full((128, 128, 3), 60)))
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "eval", "identity", "--reference",
                             str(tmp_path / "face.png"), str(evaluation), "--json"], env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["images"] == 3 and summary["with_a_face"] == 2 and summary["recognizer"] == "SFace"
    assert summary["mean_score"] == pytest.approx(1.0, abs=1e-3)
    assert summary["share_above_threshold"] == pytest.approx(2 / 3, abs=1e-3)
    assert [r["same_person"] for r in summary["results"]] == [True, True, False]


def test_workflow_endpoint_takes_images_for_load_image_nodes(server, astronaut):
    from ryla.workflows import flux_instantid_graph

    graph = flux_instantid_graph(prompt="a portrait photo", width=64, height=64, steps=3, seed=9)
    r = httpx.post(server.url + "/workflow", json={"prompt": graph, "images": {"reference": b64(astronaut)}},
                   timeout=120)
    assert r.status_code == 200, r.text
    direct = httpx.post(server.url + "/flux-instantid", json={**FLUX, "reference_image": b64(astronaut)}, timeout=120)
    assert image_difference(r.content, direct.content) <= 2, "the workflow and the typed endpoint differ"
    missing = httpx.post(server.url + "/workflow", json={"prompt": graph}, timeout=60)
    assert missing.status_code == 400
    assert missing.json()["node_errors"]["11"]["errors"][0]["type"] == "value_not_in_list"
    bad = httpx.post(server.url + "/workflow", json={"prompt": graph, "images": {"reference": "###"}}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_image"


def test_client_workflow_with_an_image(server, astronaut, tmp_path):
    import json
    import subprocess
    import sys

    from ryla.workflows import flux_instantid_graph

    (tmp_path / "face.png").write_bytes(astronaut)
    (tmp_path / "wf.json").write_text(json.dumps(flux_instantid_graph(prompt="x", width=64, height=64, steps=2, seed=1)))
    r = subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url", server.url, "workflow", str(tmp_path / "wf.json"),
                        "--image", f"reference={tmp_path / 'face.png'}", "--output-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "ryla_flux_instantid_00001.png").stat().st_size > 0
    # a second run keeps the first image: the counter goes on, as ComfyUI's does
    again = subprocess.run(r.args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ryla_flux_instantid_00001.png",
                                                                      "ryla_flux_instantid_00002.png"]


def test_run_workflow_cli_with_an_image(cli_env, astronaut, tmp_path):
    import json
    import subprocess
    import sys

    from ryla.workflows import flux_instantid_graph

    (tmp_path / "face.png").write_bytes(astronaut)
    (tmp_path / "wf.json").write_text(json.dumps(flux_instantid_graph(prompt="x", width=64, height=64, steps=2, seed=1)))

    def ryla(*args):
        return subprocess.run([sys.executable, "-m", "ryla.cli.main", "run-workflow", "wf.json", *args], env=cli_env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    ok = ryla("--image", f"reference={tmp_path / 'face.png'}", "--output-dir", "out")
    assert ok.returncode == 0, ok.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ryla_flux_instantid_00001.png"]
    # ComfyUI's counter: the next run continues from the highest index there, other names aside
    (tmp_path / "out" / "ryla_flux_instantid_00007_.png").write_bytes(b"")
    (tmp_path / "out" / "ryla_flux_instantid_extra_00099.png").write_bytes(b"")
    again = ryla("--image", f"reference={tmp_path / 'face.png'}", "--output-dir", "out")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "out" / "ryla_flux_instantid_00008.png").stat().st_size > 0
    assert (tmp_path / "out" / "ryla_flux_instantid_00001.png").stat().st_size > 0
    missing = ryla()
    assert missing.returncode == 1 and "node 11 (LoadImage)" in missing.stderr
    bad = ryla("--image", "reference")
    assert bad.returncode == 1 and "NAME=PATH" in bad.stderr


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_infusenet_steps_give_the_models_residuals_bit_for_bit(tiny_store, strength):
    """InfuseNetSteps (InfuseNet's step-invariant inputs computed once a sampling run) gives
    what calling diffusers' FluxControlNetModel gives, every step, bit for bit: the tiny
    InfuseNet, two steps of different timesteps, a batch of two, with and without a
    conditioning scale."""
    from ryla.identity.adapter import IdentityAdapter, load_infusenet

    torch = pytest.importorskip("torch")
    model = load_infusenet(tiny_store.folder("controlnet") / "InfuseNetModel", torch.device("cpu"), torch.bfloat16)
    config = model.config
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(1, 8, config.joint_attention_dim, generator=generator).bfloat16()
    adapter = IdentityAdapter(model, tokens, None, None, strength, 0.0, 1.0)
    batch, image_tokens = 2, 16
    control = torch.randn(1, image_tokens, config.in_channels, generator=generator).bfloat16()
    img_ids = torch.randn(image_tokens, 3, generator=generator).bfloat16()
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator).bfloat16()
    guidance = torch.full((batch,), 3.5, dtype=torch.bfloat16)
    steps = adapter.steps()
    with torch.no_grad():
        for sigma in (1.0, 0.6):
            latent = torch.randn(batch, image_tokens, config.in_channels, generator=generator).bfloat16()
            timestep = torch.full((batch,), sigma, dtype=torch.bfloat16)
            expected = adapter.residuals(latent, control, timestep, img_ids, guidance, pooled, batch)
            got = steps(latent, control, timestep, img_ids, guidance, pooled, batch)
            for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
                assert len(got[name]) == len(expected[name])
                assert all(torch.equal(a, b) for a, b in zip(got[name], expected[name])), name
    assert len(steps.fixed) == 1  # computed once for both steps
