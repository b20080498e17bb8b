"""Every status code the serve tests observed (from the server's own access log) is declared
for its route in the OpenAPI schema. Named to run after the other serve tests; run alone it
checks only what it itself observes."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from radgrounder.serve.app import create_app
from radgrounder.serve.responses import ROUTE_ERRORS, route_codes
from tests.serve.conftest import OBSERVED

# The client went away before the answer (nothing is sent), and routes outside the API.
NOT_API = re.compile(r"^/($|static/|docs|openapi\.json|favicon)")
SUCCESS = {"POST /v1/studies": 201, "DELETE /v1/studies/{study_id}": 204}


def _route(method: str, path: str) -> tuple[str, str] | None:
    for m, template in ROUTE_ERRORS:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if m == method and re.match(pattern, path):
            return m, template
    return None


def test_every_observed_status_code_is_declared(detection_predictor) -> None:
    with TestClient(create_app(detection_predictor), base_url="http://127.0.0.1") as c:
        c.get("/v1/studies/nope")  # at least one observation when run alone (a 404)
    undeclared = {}
    seen = 0
    for method, path, status in OBSERVED:
        if NOT_API.match(path) or status == 499:
            continue
        route = _route(method, path)
        if route is None:  # an unknown path or method: Starlette's 404/405
            assert status in (400, 401, 403, 404, 405), (method, path, status)
            continue
        seen += 1
        allowed = {SUCCESS.get(f"{route[0]} {route[1]}", 200)}
        for token in (False, True):
            allowed |= set(route_codes(*route, token=token))
        if status not in allowed:
            undeclared.setdefault(f"{route[0]} {route[1]}", set()).add(status)
    assert seen, "no API request was observed"
    assert not undeclared, f"status codes the schema does not declare: {undeclared}"
