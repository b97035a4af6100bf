"""Model downloads against a local fake of the Hugging Face Hub."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fake_hub import FakeHub
from ryla.models.download import FLUX_DEV, DownloadError, RemoteFile, fetch
from ryla.models.store import ModelStore


def flux_dev_files(tiny_store) -> dict[tuple[str, str], bytes]:
    """The flux-dev preset served from the tiny model set's bytes."""
    files = {}
    for remote in FLUX_DEV:
        local = tiny_store.folder(remote.kind) / remote.target
        files[(remote.repo_id, remote.filename)] = local.read_bytes()
    return files


@pytest.fixture()
def hub_env(monkeypatch):
    def use(hub):
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        # whoami and auth_check go through the module's HfApi, made with the endpoint of import time
        from huggingface_hub import hf_api

        monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    return use


def test_preset_download_fills_a_store_that_generate_loads(tiny_store, cli_env, tmp_path):
    with FakeHub(flux_dev_files(tiny_store)) as hub:
        hub.gated.add("black-forest-labs/FLUX.1-dev")
        hub.accepted.add(("anna", "black-forest-labs/FLUX.1-dev"))
        env = {**cli_env, "HF_ENDPOINT": hub.url, "RYLA_MODELS_DIR": str(tmp_path / "store"),
               "HF_HOME": str(tmp_path / "hf"), "RYLA_TINY_MODELS_DIR": str(tmp_path / "no-tiny"),
               "HF_TOKEN": "hf_valid"}

        def ryla(*args):
            return subprocess.run([sys.executable, "-m", "ryla.cli.main", *args], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300)

        first = ryla("models", "download", "--preset", "flux-dev")
        assert first.returncode == 0, first.stderr
        assert f"{len(FLUX_DEV)} file(s) downloaded" in first.stdout
        # the plan came first: every file, the total, the free disk, the account
        total = sum(len(data) for data in flux_dev_files(tiny_store).values())
        assert f"{len(FLUX_DEV)} of {len(FLUX_DEV)} file(s) to fetch" in first.stdout
        assert "free; Hub account anna" in first.stdout and "checkpoints/flux1-dev-fp8.safetensors" in first.stdout
        assert total > 0 and "Traceback" not in first.stderr
        gets = len(hub.gets)
        second = ryla("models", "download", "--preset", "flux-dev")
        assert second.returncode == 0 and "0 file(s) downloaded" in second.stdout
        assert f"0 of {len(FLUX_DEV)} file(s) to fetch" in second.stdout
        assert len(hub.gets) == gets, "a second run must download nothing"
    store = ModelStore(tmp_path / "store")
    assert store.has_flux_weights() and not (tmp_path / "store" / ".downloads").exists()
    generated = ryla("generate", "--prompt", "a fox", "--width", "64", "--height", "64", "--steps", "2",
                     "--seed", "1", "--output", "fox.png")
    assert generated.returncode == 0, generated.stderr
    assert "TINY" not in generated.stderr and (tmp_path / "fox.png").stat().st_size > 0
    assert not (tmp_path / "no-tiny").exists()


def test_interrupted_download_resumes_and_verifies(tmp_path, hub_env):
    data = os.urandom(25 * 1024 * 1024)  # larger than huggingface_hub's 10 MB write chunk
    remote = RemoteFile("org/weights", "model.safetensors", "checkpoints", "model.safetensors")
    final = tmp_path / "checkpoints" / "model.safetensors"
    seen_final_during_transfer = []
    with FakeHub({(remote.repo_id, remote.filename): data}) as hub:
        hub_env(hub)
        hub.cut_after[(remote.repo_id, remote.filename)] = 15 * 1024 * 1024
        hub.on_get = lambda: seen_final_during_transfer.append(final.exists())
        result = fetch(ModelStore(tmp_path), remote, retries=0)
        ranges = [r for _, _, r in hub.gets]
    assert result.downloaded and final.read_bytes() == data
    assert ranges[0] is None and ranges[-1] is not None, "the second request must resume, not restart"
    assert int(ranges[-1].split("=")[1].rstrip("-")) >= 10 * 1024 * 1024
    assert seen_final_during_transfer == [False, False], "no half-written file under the final name"


def test_cut_off_download_is_retried_within_one_call(tmp_path, hub_env):
    data = os.urandom(12 * 1024 * 1024)
    remote = RemoteFile("org/weights", "a.bin", "vae", "a.safetensors")
    with FakeHub({(remote.repo_id, remote.filename): data}) as hub:
        hub_env(hub)
        hub.cut_after[(remote.repo_id, remote.filename)] = 11 * 1024 * 1024
        delays = []
        result = fetch(ModelStore(tmp_path), remote, backoff_s=0.5, sleep=delays.append)
    assert result.downloaded and result.path.read_bytes() == data


def test_corrupt_download_is_caught_by_the_checksum_and_fetched_again(tmp_path, hub_env):
    data = os.urandom(100_000)
    remote = RemoteFile("org/weights", "ae.safetensors", "vae", "ae.safetensors")
    with FakeHub({(remote.repo_id, remote.filename): data}) as hub:
        hub_env(hub)
        hub.corrupt_once.add((remote.repo_id, remote.filename))
        delays = []
        result = fetch(ModelStore(tmp_path), remote, backoff_s=0.5, sleep=delays.append)
        gets = len(hub.gets)
    assert result.path.read_bytes() == data and gets == 2 and delays == [0.5]


def test_missing_file_is_a_clear_error(tmp_path, hub_env):
    with FakeHub({}) as hub:
        hub_env(hub)
        with pytest.raises(DownloadError, match="org/none/x.bin"):
            fetch(ModelStore(tmp_path), RemoteFile("org/none", "x.bin", "vae", "x.bin"), retries=1,
                  sleep=lambda s: None)


def test_unknown_preset(tmp_path):
    from ryla.models.download import download

    with pytest.raises(DownloadError, match="unknown preset"):
        download(ModelStore(tmp_path), "everything")


def test_token_and_licence_are_checked_before_anything_is_fetched(tiny_store, cli_env, tmp_path):
    with FakeHub(flux_dev_files(tiny_store)) as hub:
        hub.gated.add("black-forest-labs/FLUX.1-dev")
        env = {**cli_env, "HF_ENDPOINT": hub.url, "RYLA_MODELS_DIR": str(tmp_path / "store"),
               "HF_HOME": str(tmp_path / "hf")}
        env.pop("HF_TOKEN", None)

        def download(**extra):
            return subprocess.run([sys.executable, "-m", "ryla.cli.main", "models", "download", "--preset", "flux-dev"],
                                  env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True, timeout=120)

        cases = [({}, "black-forest-labs/FLUX.1-dev is gated"),
                 ({"HF_TOKEN": "hf_wrong"}, "token (HF_TOKEN or --token) is not valid"),
                 ({"HF_TOKEN": "hf_valid"}, "the account anna has no access to black-forest-labs/FLUX.1-dev")]
        for extra, message in cases:
            result = download(**extra)
            assert result.returncode == 1 and message in result.stderr, (extra, result.stderr)
            assert "Traceback" not in result.stderr
        assert hub.gets == [], "nothing may be fetched before access is checked"
        assert not (tmp_path / "store" / "checkpoints").exists()


def test_a_download_that_does_not_fit_is_refused_with_the_plan(tiny_store, tmp_path, hub_env, monkeypatch):
    import shutil
    from collections import namedtuple

    from ryla.models.download import download

    with FakeHub(flux_dev_files(tiny_store)) as hub:
        hub_env(hub)
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 100 << 20))
        plans = []
        with pytest.raises(DownloadError, match="not enough disk space"):
            download(ModelStore(tmp_path / "store"), "flux-dev", token="hf_valid", on_plan=plans.append)
        assert hub.gets == [] and plans[0].free_bytes == 100 << 20
        assert plans[0].fetch_bytes == sum(len(data) for data in flux_dev_files(tiny_store).values())
