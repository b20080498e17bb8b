"""The API's error contract: every status code each route can return, for the OpenAPI schema
(``responses=`` of each route), so that a generated client knows them all."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """Every error the API returns: one human-readable line, safe to show a user."""

    detail: str


DESCRIPTIONS = {
    400: "Bad request: a Host header the server does not answer, a malformed body or form, a "
    "damaged zip, an image that cannot be preprocessed",
    401: "Missing or wrong bearer token (only when the server has a token)",
    403: "A cross-origin request from a web page (Sec-Fetch-Site / Origin)",
    404: "Unknown or expired study",
    408: "The upload was too slow (idle or total body timeout)",
    413: "Too large: upload, unpacked zip, voxels, form fields, files, or the study store",
    415: "Not a DICOM, NIfTI, image or zip of those",
    422: "Invalid parameter: task, language, window, slice, token limits, prompt too long, "
    "an unreadable scan",
    500: "Internal error (the body names the request id in the server log)",
    503: "Busy: the model queue or the upload slots are full; retry after Retry-After seconds",
    504: "Not answered within the request deadline",
}

# route (method, path) -> the error codes it can return besides the middleware's 400/500
# (and 401 with a token, 403 for POST/DELETE).
_UPLOAD = (408, 413, 415, 422, 503)
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/v1/health"): (),
    ("GET", "/v1/model"): (),
    ("POST", "/v1/slices"): _UPLOAD,
    ("POST", "/v1/predict"): (*_UPLOAD, 404, 504),
    ("POST", "/v1/studies"): _UPLOAD,
    ("GET", "/v1/studies/{study_id}"): (404, 422),
    ("DELETE", "/v1/studies/{study_id}"): (404, 422),
    ("GET", "/v1/studies/{study_id}/slices/{index}/pixels"): (404, 422),
    ("GET", "/v1/studies/{study_id}/slices/{index}/image"): (404, 422),
    ("POST", "/v1/studies/{study_id}/predict"): (404, 408, 413, 415, 422, 503, 504),
}


def route_codes(method: str, path: str, *, token: bool) -> list[int]:
    """Every error code of a route: its own, the middleware's and the token's."""
    codes = {400, 500, *ROUTE_ERRORS[(method, path)]}
    if method in ("POST", "DELETE"):
        codes.add(403)
    if token and path != "/v1/health":
        codes.add(401)
    return sorted(codes)


def error_responses(method: str, path: str, *, token: bool) -> dict[int | str, Any]:
    """``responses=`` for a route: each error code with :class:`ErrorBody`."""
    out: dict[int | str, Any] = {}
    for code in route_codes(method, path, token=token):
        entry: dict[str, Any] = {"model": ErrorBody, "description": DESCRIPTIONS[code]}
        if code == 503:
            entry["headers"] = {
                "Retry-After": {"description": "seconds", "schema": {"type": "integer"}}
            }
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        out[code] = entry
    return out
