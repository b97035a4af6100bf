"""Shared fixtures: one tiny model set and one runtime per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ryla.models.tiny import make_tiny_models


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-models")
    make_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def tiny_store(tiny_dir):
    from ryla.models.store import ModelStore

    return ModelStore(tiny_dir, tiny=True)


@pytest.fixture(scope="session")
def runtime(tiny_store):
    from ryla.runtime import Runtime

    return Runtime(tiny_store)


@pytest.fixture()
def cli_env(tiny_dir, tmp_path) -> dict[str, str]:
    """Environment for CLI/server subprocesses: an empty real store, the session's tiny set."""
    env = dict(os.environ)
    env["RYLA_MODELS_DIR"] = str(tmp_path / "empty-store")
    env["RYLA_TINY_MODELS_DIR"] = str(tiny_dir)
    env.pop("RYLA_API_KEY", None)
    return env
