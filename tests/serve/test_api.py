"""The HTTP API: endpoints, uploads, auth, limits, error handling, logging and batching."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import stat
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from radgrounder.imaging import display_image, load_scan
from radgrounder.serve import create_app
from radgrounder.serve.batching import Batcher
from radgrounder.visualize import class_color
from tests.serve.conftest import NIFTI, GroundTruthPredictor, PredictorProxy, live_server

BASE = "http://127.0.0.1"  # the Host the app answers to (loopback names by default)
TOKENS = "6"  # max_new_tokens for the tiny models: fast, and enough for the tests


def multipart(paths: list[Path], names: list[str] | None = None) -> list[tuple[str, Any]]:
    names = names or [p.name for p in paths]
    return [("files", (n, p.read_bytes())) for p, n in zip(paths, names, strict=True)]


def zipped(paths: list[Path], folder: str = "series/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            zf.write(p, folder + p.name)
    return buffer.getvalue()


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def check_prediction(pred: dict[str, Any]) -> None:
    assert isinstance(pred["text"], str)
    assert pred["input"] == "upload"
    for span in pred["spans"]:
        assert pred["text"][span["start"] : span["end"]] == span["label"]
        for box in span["boxes"]:
            assert len(box) == 4
            assert all(0.0 <= v <= 1.0 for v in box)
            assert box[0] <= box[2] and box[1] <= box[3]


@pytest.fixture
def client(detection_predictor: Any) -> TestClient:
    with TestClient(create_app(detection_predictor), base_url=BASE) as c:
        yield c


# -- endpoints ------------------------------------------------------------------------------


def test_health_model_docs_and_viewer(client: TestClient) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    model = client.get("/v1/model").json()
    assert model["variant"] == "detection"
    assert model["tasks"] == ["report", "grounded-report", "vqa", "detect"]
    assert model["languages"] == ["en", "de"]
    assert {"lung", "soft_tissue", "bone", "brain", "liver"} <= set(model["windows"])
    assert model["colors"]["5"] == "#{:02x}{:02x}{:02x}".format(*class_color(5))
    assert model["display_names"]["de"]["5"] == "Leber"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "viewer.js" in page.text
    for name in ("viewer.js", "viewer.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_slices_of_the_dicom_series(client: TestClient, dicom_files: list[Path]) -> None:
    r = client.post("/v1/slices", files=multipart(dicom_files), data={"window": "lung"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["n_slices"], body["modality"], body["width"], body["height"]) == (
        20,
        "CT",
        512,
        512,
    )
    assert [s["index"] for s in body["slices"]] == list(range(20))
    volume = load_scan(dicom_files[0].parent)
    for k in (0, 19):
        png = decode_png(body["slices"][k]["png"])
        assert png.shape == (512, 512)
        assert np.array_equal(png, display_image(volume.data[k], "CT", preset="lung"))
    r = client.post("/v1/slices", files=multipart(dicom_files[:2]), data={"window": "fancy"})
    assert r.status_code == 422 and r.json()["detail"].startswith("window:")


def test_predict_on_a_zipped_series(client: TestClient, dicom_files: list[Path]) -> None:
    r = client.post(
        "/v1/predict",
        files=[("files", ("study.zip", zipped(dicom_files)))],
        data={"task": "grounded-report", "slice": "3", "max_new_tokens": TOKENS},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["n_slices"] == 20
    (pred,) = body["predictions"]
    assert (pred["slice_index"], pred["task"], pred["width"], pred["height"]) == (
        3,
        "grounded-report",
        512,
        512,
    )
    check_prediction(pred)


def test_predict_all_slices_of_uploaded_files(client: TestClient, dicom_files: list[Path]) -> None:
    fields = {"task": "detect", "structures": "liver, Milz", "slice": "all", "language": "de"}
    r = client.post(
        "/v1/predict", files=multipart(dicom_files), data={**fields, "max_new_tokens": "4"}
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["slice_index"] for p in preds] == list(range(20))
    for pred in preds:
        assert pred["language"] == "de" and "Leber" in pred["prompt"] and "Milz" in pred["prompt"]
        check_prediction(pred)


def test_predict_on_nifti_and_png(client: TestClient, tmp_path: Path) -> None:
    r = client.post("/v1/predict", files=multipart([NIFTI]), data={"max_new_tokens": TOKENS})
    assert r.status_code == 200, r.text
    volume = load_scan(NIFTI)
    (pred,) = r.json()["predictions"]
    assert pred["slice_index"] == volume.n_slices // 2
    assert (pred["height"], pred["width"]) == volume.data.shape[1:3]
    png = tmp_path / "slice.png"
    Image.fromarray(display_image(volume.data[3], "CT")).convert("RGB").save(png)
    r = client.post(
        "/v1/predict",
        files=multipart([png]),
        data={"task": "vqa", "question": "Is the liver visible?", "max_new_tokens": TOKENS},
    )
    assert r.status_code == 200, r.text
    assert r.json()["n_slices"] == 1
    (pred,) = r.json()["predictions"]
    assert pred["slice_index"] == 0 and pred["task"] == "vqa"
    assert (pred["height"], pred["width"]) == volume.data.shape[1:3]


def test_grounded_boxes_from_the_detection_model(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    with TestClient(create_app(GroundTruthPredictor(detection_predictor)), base_url=BASE) as c:
        r = c.post("/v1/predict", files=multipart(dicom_files), data={"max_new_tokens": TOKENS})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    check_prediction(pred)
    (span,) = pred["spans"]
    assert (span["label"], span["class_id"], span["display_name"]) == ("liver", 5, "liver")
    assert span["boxes"] == [pytest.approx([100 / 512, 120 / 512, 300 / 512, 320 / 512], abs=1e-6)]
    assert span["boxes_px"] == [pytest.approx([100.0, 120.0, 300.0, 320.0], abs=1e-3)]
    assert "mask_png" not in span


def test_masks_from_the_segmentation_model(
    segmentation_predictor: Any, dicom_files: list[Path]
) -> None:
    proxy = GroundTruthPredictor(segmentation_predictor)
    with TestClient(create_app(proxy), base_url=BASE) as c:
        model = c.get("/v1/model").json()
        assert model["variant"] == "segmentation" and "segment" in model["tasks"]
        r = c.post(
            "/v1/predict",
            files=multipart(dicom_files),
            data={"task": "segment", "structures": "liver", "max_new_tokens": TOKENS},
        )
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    (span,) = pred["spans"]
    assert span["class_id"] == 5 and span["boxes"] == []
    mask = decode_png(span["mask_png"]) > 0
    assert mask.shape == (512, 512)
    assert np.array_equal(mask, proxy.grounded(512, 512).spans[0].mask)


def test_real_segmentation_output_is_well_formed(
    segmentation_predictor: Any, dicom_files: list[Path]
) -> None:
    with TestClient(create_app(segmentation_predictor), base_url=BASE) as c:
        r = c.post("/v1/predict", files=multipart(dicom_files[:4]), data={"max_new_tokens": "8"})
    assert r.status_code == 200, r.text
    for pred in r.json()["predictions"]:
        check_prediction(pred)
        for span in pred["spans"]:
            if "mask_png" in span:
                assert decode_png(span["mask_png"]).shape == (pred["height"], pred["width"])


# -- security and robustness ---------------------------------------------------------------


def test_bearer_token(detection_predictor: Any) -> None:
    with TestClient(create_app(detection_predictor, token="s3cret"), base_url=BASE) as c:
        assert c.get("/v1/health").status_code == 200
        assert c.get("/").status_code == 200
        assert c.get("/static/viewer.js").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/model", headers=headers)
            assert r.status_code == 401 and "token" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"]
        # The API description is open; it declares the bearer scheme for Swagger's Authorize.
        schema = c.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert {"HTTPBearer": []} in schema["paths"]["/v1/studies"]["post"]["security"]
        assert c.get("/docs").status_code == 200
        for method, path in (
            ("post", "/v1/slices"),
            ("post", "/v1/studies"),
            ("get", "/v1/studies/0123"),
            ("delete", "/v1/studies/0123"),
            ("get", "/v1/studies/0123/slices/0/pixels"),
            ("post", "/v1/studies/0123/predict"),
        ):
            r = c.request(
                method, path, files=[("files", ("a.dcm", b"x"))] if method == "post" else None
            )
            assert r.status_code == 401, (method, path)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/model", headers=ok).json()["variant"] == "detection"
        data = {"max_new_tokens": "2"}
        r = c.post("/v1/predict", files=multipart([NIFTI]), data=data, headers=ok)
        assert r.status_code == 200, r.text


async def post_chunks(app: Any, n_chunks: int, size: int) -> tuple[int, str, int]:
    """POST a multipart body of ``n_chunks`` chunks without Content-Length straight to the
    ASGI app; returns the status, the detail and how many chunks the app read."""
    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n\r\n'
    chunks = iter([head] + [b"\0" * size] * n_chunks + [b"\r\n--b--\r\n"])
    read = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/slices",
        "raw_path": b"/v1/slices",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"multipart/form-data; boundary=b")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return messages[0]["status"], json.loads(body)["detail"], read


def test_upload_size_limit(detection_predictor: Any) -> None:
    limit = 1024**2
    assert NIFTI.stat().st_size < limit - 10_000
    with TestClient(create_app(detection_predictor, max_upload_bytes=limit), base_url=BASE) as c:
        # Content-Length over the limit.
        r = c.post("/v1/slices", files=[("files", ("big.dcm", b"\0" * (limit + 1)))])
        assert r.status_code == 413 and "too large" in r.json()["detail"]

        # No Content-Length (chunked): counted while streaming, stopped early.
        status, detail, n_read = asyncio.run(post_chunks(c.app, 100, 65536))
        assert status == 413 and "1 MiB" in detail
        assert n_read <= 17
        assert c.post("/v1/slices", files=multipart([NIFTI])).status_code == 200


def test_zip_bomb(detection_predictor: Any, dicom_files: list[Path]) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * (64 * 1024**2))
    assert len(buffer.getvalue()) < 1024**2
    with TestClient(
        create_app(detection_predictor, max_upload_bytes=4 * 1024**2), base_url=BASE
    ) as c:
        r = c.post("/v1/slices", files=[("files", ("bomb.zip", buffer.getvalue()))])
        assert r.status_code == 413 and "unpacks to more than" in r.json()["detail"]


def _zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(name, data)
    return buffer.getvalue()


BAD_UPLOADS = {
    "garbage": ([("files", ("scan_of_jane_doe.dcm", os.urandom(4096)))], 415, "unsupported"),
    "text": ([("files", ("jane_doe_notes.txt", b"Patient Jane Doe\n" * 50))], 415, "unsupported"),
    "truncated_dicom": (None, 400, "cannot read the scan"),
    "zip_slip": (
        [("files", ("jane_doe.zip", _zip_with("../../etc/evil.dcm", b"x" * 200)))],
        400,
        "'..' path",
    ),
    "absolute_zip": (
        [("files", ("jane_doe.zip", _zip_with("/tmp/evil.dcm", b"x" * 200)))],
        400,
        "absolute",
    ),
    "broken_zip": ([("files", ("jane_doe.zip", b"PK\x03\x04" + b"\0" * 100))], 400, "zip"),
    "damaged_png": ([("files", ("jane_doe.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64))], 400, "read"),
    "no_files": ([("other", ("jane_doe.dcm", b"x"))], 400, "'files'"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_get_clear_4xx(client: TestClient, dicom_files: list[Path], case: str) -> None:
    files, status, words = BAD_UPLOADS[case]
    if files is None:
        data = dicom_files[0].read_bytes()
        files = [("files", ("jane_doe.dcm", data[: len(data) // 2]))]
    for endpoint in ("/v1/slices", "/v1/predict"):
        r = client.post(endpoint, files=files, data={"max_new_tokens": TOKENS})
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and words in detail
        assert "jane" not in detail.lower() and "/tmp" not in detail
    # The server keeps serving.
    r = client.post("/v1/predict", files=multipart([NIFTI]), data={"max_new_tokens": TOKENS})
    assert r.status_code == 200


def test_wrong_content_type(client: TestClient) -> None:
    r = client.post("/v1/predict", json={"task": "report"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post(
        "/v1/predict", content=b"junk", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert r.status_code == 400 and "multipart" in r.json()["detail"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"task": "dance"}, "task"),
        ({"task": "segment", "structures": "liver"}, "task"),
        ({"language": "fr"}, "language"),
        ({"slice": "25"}, "slice"),
        ({"slice": "-1"}, "slice"),
        ({"slice": "middle"}, "slice"),
        ({"max_new_tokens": "0"}, "max_new_tokens"),
        ({"max_new_tokens": "100000"}, "max_new_tokens"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
        ({"task": "vqa"}, "question"),
        ({"task": "detect"}, "structures"),
        ({"task": "detect", "structures": "flux capacitor"}, "structures"),
    ],
)
def test_bad_fields_name_the_field(
    client: TestClient, dicom_files: list[Path], fields: dict[str, str], field: str
) -> None:
    r = client.post("/v1/predict", files=multipart(dicom_files), data=fields)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{field}:")


def test_model_errors_give_500_and_the_server_keeps_serving(detection_predictor: Any) -> None:
    proxy = PredictorProxy(detection_predictor)

    def fail(items: list[Any]) -> None:
        raise RuntimeError("CUDA out of memory on Jane Doe")

    proxy.before_run = fail
    with TestClient(create_app(proxy), base_url=BASE) as c:
        r = c.post("/v1/predict", files=multipart([NIFTI]), data={"max_new_tokens": TOKENS})
        assert r.status_code == 500
        assert "generation failed" in r.json()["detail"] and "Jane" not in r.json()["detail"]
        proxy.before_run = None
        r = c.post("/v1/predict", files=multipart([NIFTI]), data={"max_new_tokens": TOKENS})
        assert r.status_code == 200


def test_uploads_live_in_private_temp_dirs_that_are_removed(
    detection_predictor: Any, dicom_files: list[Path], tmp_path: Path, monkeypatch
) -> None:
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    seen: list[tuple[int, list[str]]] = []

    def uploads() -> list[Path]:
        return sorted(root.glob("radgrounder-upload-*"))

    def look(items: list[Any]) -> None:
        (folder,) = uploads()
        seen.append((stat.S_IMODE(folder.stat().st_mode), sorted(os.listdir(folder))))

    proxy = PredictorProxy(detection_predictor)
    proxy.after_prepare = look
    with TestClient(create_app(proxy, max_upload_bytes=8 * 1024**2), base_url=BASE) as c:
        (studies,) = root.glob("radgrounder-studies-*")
        assert stat.S_IMODE(studies.stat().st_mode) == 0o700
        r = c.post(
            "/v1/predict",
            files=[("files", ("Jane_Doe.zip", zipped(dicom_files)))],
            data={"max_new_tokens": TOKENS},
        )
        assert r.status_code == 200
        assert uploads() == []
        assert c.post("/v1/slices", files=multipart(dicom_files[:3])).status_code == 200
        assert c.post("/v1/slices", files=[("files", ("a.dcm", b"junk"))]).status_code == 415
        bomb = [("files", ("b.zip", _zip_with("a", b"\0" * (40 * 1024**2))))]
        assert c.post("/v1/slices", files=bomb).status_code == 413
        big = [("files", ("c.dcm", b"\0" * (9 * 1024**2)))]
        assert c.post("/v1/slices", files=big).status_code == 413
        r = c.post("/v1/predict", files=multipart(dicom_files), data={"slice": "99"})
        assert r.status_code == 422
        assert uploads() == []
        # A stored study lives in its own private folder until it is deleted.
        sid = c.post("/v1/studies", files=multipart(dicom_files[:3])).json()["study_id"]
        (folder,) = studies.iterdir()
        assert folder.name == sid and stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert uploads() == []
        assert c.delete(f"/v1/studies/{sid}").status_code == 204
        assert list(studies.iterdir()) == []
        c.post("/v1/studies", files=multipart(dicom_files[:3]))
    # Shutdown deletes every stored study.
    assert list(root.iterdir()) == []
    # While preparing, the upload sat in one private folder under generated names.
    mode, names = seen[0]
    assert mode == 0o700
    assert "Jane_Doe.zip" not in names and any(n.startswith("upload-") for n in names)


def test_logs_have_request_ids_and_no_file_names_or_tags(
    client: TestClient, dicom_files: list[Path], tmp_path: Path, caplog
) -> None:
    study = tmp_path / "Doe_Jane_1970"
    study.mkdir()
    for path in dicom_files[:5]:
        ds = pydicom.dcmread(path)
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "PID-4711"
        ds.save_as(study / f"Doe_Jane_{path.name[-5:]}.dcm")
    paths = sorted(study.iterdir())
    caplog.set_level(logging.DEBUG)
    r = client.post("/v1/predict", files=multipart(paths), data={"max_new_tokens": TOKENS})
    assert r.status_code == 200
    bad = client.post("/v1/slices", files=[("files", ("Doe_Jane_notes.txt", b"Doe^Jane"))])
    assert bad.status_code == 415
    broken = paths[0].read_bytes()[:1000]
    assert client.post("/v1/slices", files=[("files", ("Doe_Jane.dcm", broken))]).status_code
    ours = [rec.getMessage() for rec in caplog.records if rec.name == "radgrounder.serve"]
    for response, status in ((r, 200), (bad, 415)):
        rid = response.headers["x-request-id"]
        (line,) = [m for m in ours if f"request_id={rid}" in m]
        assert f"status={status}" in line and "method=POST" in line and "duration_ms=" in line
    assert r.json()["request_id"] == r.headers["x-request-id"]
    everything = caplog.text + r.text
    for secret in ("Doe", "Jane", "PID-4711"):
        assert secret not in everything


# -- batching -------------------------------------------------------------------------------


def test_concurrent_requests_share_one_run_call(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    proxy = PredictorProxy(detection_predictor)
    # Both requests finish preparing before either is queued, so the batch window (1 s)
    # certainly sees both.
    barrier = threading.Barrier(2, timeout=60)
    proxy.after_prepare = lambda items: barrier.wait()
    app = create_app(proxy, max_batch=8, batch_window_s=1.0)
    results: dict[int, httpx.Response] = {}

    def post(n: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            results[n] = http.post(
                "/v1/predict",
                files=multipart(dicom_files[:4]),
                data={"slice": str(n), "max_new_tokens": TOKENS},
            )

    with live_server(app) as url:
        threads = [threading.Thread(target=post, args=(n, url)) for n in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert {n: r.status_code for n, r in results.items()} == {1: 200, 2: 200}
    for n in (1, 2):
        assert results[n].json()["predictions"][0]["slice_index"] == n
    assert proxy.run_calls == [
        {"n_items": 2, "max_new_tokens": int(TOKENS), "thread": "radgrounder-batcher"}
    ]


def test_batcher_groups_by_max_new_tokens_and_caps_batches() -> None:
    calls: list[tuple[list[str], int]] = []
    main = threading.current_thread()

    def run(items: list[str], max_new_tokens: int) -> list[str]:
        assert threading.current_thread() is not main
        calls.append((list(items), max_new_tokens))
        return [f"{item}:{max_new_tokens}" for item in items]

    batcher = Batcher(run, max_batch=3, window_s=0.5)

    async def scenario() -> list[list[str]]:
        return await asyncio.gather(
            batcher.submit(["a1", "a2"], 5),
            batcher.submit(["b1"], 7),
            batcher.submit(["c1", "c2"], 5),
        )

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert results == [["a1:5", "a2:5"], ["b1:7"], ["c1:5", "c2:5"]]
    # Calls of at most 3 items, one item of each waiting job in turn (round robin), grouped
    # by max_new_tokens: each call serves the oldest waiting job's value.
    assert calls == [(["a1", "c1", "a2"], 5), (["b1"], 7), (["c2"], 5)]


# -- serve() --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "token", "insecure", "outcome"),
    [
        ("127.0.0.1", None, False, "serves"),
        ("0.0.0.0", None, False, "refuses"),
        ("0.0.0.0", None, True, "warns"),
        ("0.0.0.0", "t" * 20, False, "serves"),
    ],
)
def test_serve_binds_refuses_and_warns(
    detection_model: Path,
    monkeypatch,
    caplog,
    host: str,
    token: str | None,
    insecure: bool,
    outcome: str,
) -> None:
    import uvicorn

    from radgrounder.errors import RadGrounderError
    from radgrounder.serve.app import serve
    from radgrounder.serve.protocol import HeaderTimeoutH11Protocol

    called: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: called.update(config=self.config))
    caplog.set_level(logging.WARNING, logger="radgrounder.serve")
    kwargs = {"token": token, "max_upload_mb": 3, "insecure_no_token": insecure}
    if outcome == "refuses":
        with pytest.raises(RadGrounderError, match=r"without a token.*--insecure-no-token"):
            serve(detection_model, host=host, port=8123, **kwargs)
        return
    serve(detection_model, host=host, port=8123, allowed_hosts=["scanner.example"], **kwargs)
    config = called["config"]
    assert (config.host, config.port) == (host, 8123)
    # The connection limits of docs/serving.md.
    assert issubclass(config.http, HeaderTimeoutH11Protocol) and config.http.header_timeout_s == 10
    assert (config.timeout_keep_alive, config.limit_concurrency) == (5, 256)
    assert config.access_log is False
    with TestClient(config.app, base_url=BASE) as c:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        assert c.get("/v1/model", headers=headers).status_code == 200
        big = [("files", ("a.dcm", b"\0" * (3 * 1024**2 + 1)))]
        assert c.post("/v1/slices", files=big, headers=headers).status_code == 413
        assert c.get("http://scanner.example/v1/health").status_code == 200
        assert c.get("http://other.example/v1/health").status_code == 400
    assert ("WITHOUT a token" in caplog.text) == (outcome == "warns")
