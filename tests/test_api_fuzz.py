"""Property-based fuzzing of the whole HTTP API from its OpenAPI schema: no input gives a 500."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from ryla.api.app import ServerSettings, create_app


@pytest.fixture(scope="module")
def app(runtime, tmp_path_factory):
    # A short time limit keeps large-but-valid requests (2048x2048, 100 steps) from making the
    # fuzz pass slow: they end as 504, which is an answer, not a server error.
    app = create_app(runtime, ServerSettings(request_timeout_s=1.0, max_queue=2, preload=False,
                                             data_dir=tmp_path_factory.mktemp("fuzz-data")))
    yield app
    app.state.service.queue.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(case):
    response = case.call()
    assert response.status_code < 500 or response.status_code == 504, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}")
    content_type = response.headers.get("content-type") or [""]
    if response.status_code >= 400 and content_type[0].startswith("application/json"):
        body = response.json()
        assert "error" in body and {"type", "message"} <= set(body["error"])
