"""The OpenAPI schema tells the truth: every route declares each status code it can return,
with the error body, and schemathesis against the real server on loopback finds no server
error and no undocumented status code (slow)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from radgrounder.serve.app import create_app
from radgrounder.serve.responses import ROUTE_ERRORS, route_codes
from tests.serve.conftest import live_server

BASE = "http://127.0.0.1"


def _schema(predictor: Any, token: str | None = None) -> dict[str, Any]:
    with TestClient(create_app(predictor, token=token), base_url=BASE) as c:
        return c.get("/openapi.json").json()


def _declared(schema: dict[str, Any]) -> dict[tuple[str, str], set[int]]:
    return {
        (method.upper(), path): {int(code) for code in op["responses"]}
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    }


@pytest.mark.parametrize("token", [None, "0123456789abcdef0123"], ids=["open", "token"])
def test_every_route_declares_its_error_codes_with_the_error_body(detection_predictor, token):
    schema = _schema(detection_predictor, token)
    declared = _declared(schema)
    assert set(declared) == set(ROUTE_ERRORS)
    for (method, path), codes in declared.items():
        errors = set(route_codes(method, path, token=token is not None))
        success = codes - errors
        assert success == ({201} if path == "/v1/studies" and method == "POST" else
                           {204} if method == "DELETE" else {200}), (method, path)  # fmt: skip
        assert (401 in codes) == (token is not None and path != "/v1/health")
        op = schema["paths"][path][method.lower()]
        for code in errors:
            body = op["responses"][str(code)]["content"]["application/json"]["schema"]
            if code == 422 and "$ref" in body and body["$ref"].endswith("HTTPValidationError"):
                continue  # FastAPI's own parameter validation (an int path parameter)
            assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    assert schema["components"]["schemas"]["ErrorBody"]["required"] == ["detail"]
    assert "Retry-After" in schema["paths"]["/v1/predict"]["post"]["responses"]["503"]["headers"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("schemathesis") is None and not Path(sys.executable).with_name(
    "schemathesis").exists(), reason="needs schemathesis (dev extra)")  # fmt: skip
def test_schemathesis_finds_no_server_error_and_no_undocumented_status(detection_predictor):
    from radgrounder.serve.uploads import read_multipart  # noqa: F401  (the server's deps)

    app = create_app(detection_predictor, max_new_tokens=4, request_timeout_s=30)
    cli = Path(sys.executable).with_name("schemathesis")
    with live_server(app) as url:
        proc = subprocess.run(
            # Two checks are left out, both about what a form can express: a schema cannot
            # say which bytes are a valid DICOM/NIfTI, so "schema-valid" random files are
            # rightly refused (415: positive_data_acceptance); and in multipart/form-data
            # every value is text, so an "object where a string is expected" arrives as a
            # valid string (negative_data_rejection).
            [str(cli), "run", f"{url}/openapi.json", "--checks", "all", "--exclude-checks",
             "positive_data_acceptance,negative_data_rejection", "--max-examples", "25",
             "--max-time", "150",
             "--request-timeout", "60", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "undocumented" not in out.lower() and "server error" not in out.lower(), out[-6000:]
    assert proc.returncode == 0, out[-6000:]
