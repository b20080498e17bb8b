"""What one request may cost the server, and what a web page may make it do: prompt budgets,
voxel caps, upload slots and timeouts, the bounded queue, deadlines, cancellation of work
for clients that left, slow-header connections, the Host allowlist, cross-origin refusal
and the security headers. Real uvicorn servers on loopback wherever timing matters."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pydicom
import pytest
from fastapi.testclient import TestClient

from radgrounder.inference import PromptTooLong
from radgrounder.serve import create_app
from radgrounder.serve.batching import Batcher, DeadlineExceeded, QueueFull
from radgrounder.serve.middleware import DOCS_CSP, VIEWER_CSP
from radgrounder.serve.protocol import HeaderTimeoutH11Protocol
from tests.serve.conftest import NIFTI, PredictorProxy, live_server

BASE = "http://127.0.0.1"


def files_of(paths: list[Path]) -> list[tuple[str, Any]]:
    return [("files", (p.name, p.read_bytes())) for p in paths]


class BlockingPredictor(PredictorProxy):
    """Holds every model call until ``release`` is set (or ``hold_s`` passed)."""

    def __init__(self, real: Any, hold_s: float = 30.0) -> None:
        super().__init__(real)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.hold_s = hold_s

    def run(self, items: list[Any], max_new_tokens: int = 200, **kwargs: Any) -> list[Any]:
        self.entered.set()
        self.release.wait(self.hold_s)
        return super().run(items, max_new_tokens=max_new_tokens, **kwargs)


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


# -- prompt budget -----------------------------------------------------------------------


def test_a_long_question_is_refused_in_milliseconds_with_bounded_memory(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    """The measured failure: 60,000 characters grew the server to 21.7 GB. Now: a 422 that
    names the field, before the upload is decoded, and no memory growth."""
    proxy = PredictorProxy(detection_predictor)
    process = psutil.Process()
    with TestClient(create_app(proxy), base_url=BASE) as c:
        sid = c.post("/v1/studies", files=files_of(dicom_files)).json()["study_id"]
        rss = process.memory_info().rss
        for question in ("liver " * 10_000, "x" * 60_000, "ab " * 400):
            data = {"task": "vqa", "question": question}
            t0 = time.perf_counter()
            r = c.post(f"/v1/studies/{sid}/predict", data=data)
            assert time.perf_counter() - t0 < 3
            assert r.status_code == 422 and r.json()["detail"].startswith("question: too long")
            assert "256" in r.json()["detail"]
            r = c.post("/v1/predict", files=files_of(dicom_files), data=data)
            assert r.status_code == 422 and "question: too long" in r.json()["detail"]
        r = c.post(
            f"/v1/studies/{sid}/predict",
            data={"task": "grounded-report", "clinical_info": "Schmerzen " * 2000},
        )
        assert r.status_code == 422 and r.json()["detail"].startswith("clinical_info: too long")
        grown = (process.memory_info().rss - rss) / 1024**2
    assert proxy.run_calls == []  # nothing reached the model
    assert grown < 300, f"the server grew by {grown:.0f} MiB"


def test_the_predictor_counts_tokens_not_characters(detection_predictor: Any) -> None:
    prompts = detection_predictor.prompts("vqa", question="Is the liver enlarged?")
    assert prompts == [detection_predictor.prompts("vqa", question="Is the liver enlarged?")[0]]
    n = detection_predictor.check_prompt(prompts[0])
    assert 5 < n < 40
    budget = detection_predictor.max_prompt_tokens
    assert budget == 256
    # Just inside and just past the budget, measured with the model's own tokenizer.
    from radgrounder.prompts import build_prompt

    tokenizer = detection_predictor.loaded.tokenizer
    words = ["liver"] * 400
    for k in range(1, 400):
        prompt = build_prompt("vqa", "en", question=" ".join(words[:k]))
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > budget:
            break
    detection_predictor.prompts("vqa", question=" ".join(words[: k - 1]))
    with pytest.raises(PromptTooLong, match="question: too long") as info:
        detection_predictor.prepare([np.zeros((8, 8))], "vqa", question=" ".join(words[:k]))
    assert info.value.n_tokens > budget and info.value.limit == budget


def test_cli_predict_refuses_a_long_question_in_one_line(
    detection_model: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "radgrounder",
            "predict",
            str(NIFTI),
            "--model",
            str(detection_model),
            "--out",
            str(tmp_path / "o"),
            "--task",
            "vqa",
            "--question",
            "why " * 1000,
            "--max-prompt-tokens",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "question: too long" in out.stderr and "64" in out.stderr


# -- voxel caps ---------------------------------------------------------------------------


def _big_slices(source: Path, n: int, size: int) -> list[bytes]:
    """``n`` DICOM slices of ``size`` x ``size`` constant pixels (positions 2 mm apart)."""
    out = []
    for k in range(n):
        ds = pydicom.dcmread(source)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.Rows = ds.Columns = size
        ds.PixelData = bytes(size * size * 2)
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.InstanceNumber = k + 1
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def test_dicom_series_and_zips_are_capped_from_their_headers(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    slices = _big_slices(dicom_files[0], 3, 2048)  # 12.6 M voxels
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, data in enumerate(slices):
            zf.writestr(f"s/{k}.dcm", data)
    assert len(archive.getvalue()) < 200_000  # constant pixels compress ~1000:1
    app = create_app(detection_predictor, max_voxels=10_000_000)
    with TestClient(app, base_url=BASE) as c:
        as_files = [("files", (f"{k}.dcm", d)) for k, d in enumerate(slices)]
        r = c.post("/v1/studies", files=as_files)
        assert r.status_code == 413, r.text
        assert "12582912 voxels (3 x 2048 x 2048 x 1)" in r.json()["detail"]
        # The zip's headers are read before any member is written out.
        r = c.post("/v1/studies", files=[("files", ("s.zip", archive.getvalue()))])
        assert r.status_code == 413
        assert r.json()["detail"] == (
            "the zip's scans have 12582912 voxels; at most 10000000 are decoded"
        )
        # The NIfTI cap is the same number.
        small = create_app(detection_predictor, max_voxels=1000)
    with TestClient(small, base_url=BASE) as c:
        r = c.post("/v1/studies", files=files_of([NIFTI]))
        assert r.status_code == 413 and "at most 1000 are decoded" in r.json()["detail"]
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w") as zf:
            zf.write(NIFTI, "ct.nii.gz")
        r = c.post("/v1/studies", files=[("files", ("n.zip", zipped.getvalue()))])
        assert r.status_code == 413 and "369660 voxels" in r.json()["detail"]


def test_zip_members_that_are_no_scan_are_never_written(
    detection_predictor: Any, tmp_path: Path, monkeypatch
) -> None:
    """A 2 MB zip of garbage used to be unpacked to 2 GB before its 415."""
    import tempfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(4):
            zf.writestr(f"junk{k}.bin", b"\x01" * (64 * 1024**2))
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    written: list[int] = []
    proxy = PredictorProxy(detection_predictor)
    with TestClient(create_app(proxy), base_url=BASE) as c:
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                written.append(sum(p.stat().st_size for p in root.rglob("member-*")))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            r = c.post("/v1/studies", files=[("files", ("j.zip", archive.getvalue()))])
        finally:
            stop.set()
            watcher.join()
    assert r.status_code == 415 and "no DICOM, NIfTI or image" in r.json()["detail"]
    assert max(written, default=0) == 0


# -- admission control --------------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    proxy = BlockingPredictor(detection_predictor)
    app = create_app(proxy, max_queued_items=2, max_batch=1, batch_window_s=0)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        sid = c.post("/v1/studies", files=files_of(dicom_files)).json()["study_id"]
        data = {"task": "report", "max_new_tokens": "2"}
        results: list[httpx.Response] = []

        def post(k: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                results.append(own.post(f"/v1/studies/{sid}/predict", data={**data, "slice": k}))

        threads = [threading.Thread(target=post, args=(k,)) for k in range(2)]
        threads[0].start()
        assert proxy.entered.wait(20)
        threads[1].start()
        wait_for(lambda: app.state.batcher.pending_items == 2)
        t0 = time.perf_counter()
        r = c.post(f"/v1/studies/{sid}/predict", data={**data, "slice": 5})
        assert time.perf_counter() - t0 < 2
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "queue is full" in r.json()["detail"]
        # The one-shot endpoint is refused before its body is read.
        r = c.post("/v1/predict", files=files_of(dicom_files), data=data)
        assert r.status_code == 503
        assert c.get("/v1/health").status_code == 200
        proxy.release.set()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]
        assert c.post(f"/v1/studies/{sid}/predict", data=data).status_code == 200


def test_a_request_past_its_deadline_gets_504(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    proxy = BlockingPredictor(detection_predictor, hold_s=3)
    app = create_app(proxy, request_timeout_s=0.5, batch_window_s=0)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        sid = c.post("/v1/studies", files=files_of(dicom_files)).json()["study_id"]
        t0 = time.perf_counter()
        r = c.post(f"/v1/studies/{sid}/predict", data={"task": "report", "max_new_tokens": 2})
        assert 0.4 < time.perf_counter() - t0 < 2.5
        assert r.status_code == 504 and "not answered within 0.5 s" in r.json()["detail"]


def test_work_of_a_client_that_disconnected_is_cancelled(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    proxy = BlockingPredictor(detection_predictor)
    app = create_app(proxy, max_batch=1, batch_window_s=0)
    batcher = app.state.batcher
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        sid = c.post("/v1/studies", files=files_of(dicom_files)).json()["study_id"]
        first: list[httpx.Response] = []
        blocker = threading.Thread(
            target=lambda: first.append(
                httpx.post(
                    f"{url}/v1/studies/{sid}/predict",
                    data={"task": "report", "slice": 0, "max_new_tokens": 2},
                    timeout=60,
                )
            )
        )
        blocker.start()
        assert proxy.entered.wait(20)
        # Five clients that give up while their requests wait behind the first one.
        for k in range(1, 6):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{url}/v1/studies/{sid}/predict",
                    data={"task": "report", "slice": k, "max_new_tokens": 2},
                    timeout=httpx.Timeout(60, read=0.3),
                )
        wait_for(lambda: batcher.pending_items == 1)  # the five were withdrawn
        proxy.release.set()
        blocker.join(60)
        assert first[0].status_code == 200
        wait_for(lambda: batcher.pending_items == 0)
    ran = [call["n_items"] for call in proxy.run_calls]
    assert ran == [1], f"model calls after the clients left: {ran}"
    assert batcher.stats["cancelled_jobs"] == 5


def test_generation_stops_between_tokens_when_asked(detection_predictor: Any) -> None:
    items = detection_predictor.prepare([np.random.default_rng(0).normal(size=(32, 32))], "report")
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return True

    (full,) = detection_predictor.run(items, max_new_tokens=24)
    (cut,) = detection_predictor.run(items, max_new_tokens=24, should_stop=stop)
    assert asked
    assert len(detection_predictor.loaded.tokenizer(cut.raw_text)["input_ids"]) <= 3
    assert len(full.raw_text) > len(cut.raw_text)


def test_a_short_request_is_not_starved_by_a_long_one() -> None:
    order: list[str] = []

    def run(items: list[str], max_new_tokens: int) -> list[str]:
        time.sleep(0.05)
        order.extend(items)
        return items

    batcher = Batcher(run, max_batch=2, window_s=0.0)

    async def scenario() -> tuple[list[str], list[str]]:
        long = asyncio.ensure_future(batcher.submit([f"L{k}" for k in range(40)], 8))
        await asyncio.sleep(0.12)  # a couple of calls into the long request
        short = await batcher.submit(["S"], 8)
        return await long, short

    try:
        long, short = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert short == ["S"] and long == [f"L{k}" for k in range(40)]
    # The short request shared the next call instead of waiting for the 40 items.
    assert order.index("S") < 12, order


def test_batcher_admission_and_deadlines() -> None:
    gate = threading.Event()

    def run(items: list[str], max_new_tokens: int) -> list[str]:
        gate.wait(10)
        return items

    batcher = Batcher(run, max_batch=4, window_s=0.0, max_queued=3)

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit(["a", "b"], 4))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as info:
            await batcher.submit(["c", "d"], 4)
        assert info.value.retry_after >= 1
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(["e"], 4, timeout_s=0.2)
        gate.set()
        assert await first == ["a", "b"]
        # A job larger than the queue is admitted when nothing else waits.
        assert await batcher.submit(list("vwxyz"), 4) == list("vwxyz")

    try:
        asyncio.run(scenario())
    finally:
        batcher.stop()
    assert batcher.pending_items == 0
    assert batcher.stats["expired_jobs"] + batcher.stats["cancelled_jobs"] == 1


# -- uploads and connections --------------------------------------------------------------


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _stalled_upload(url: str, path: str = "/v1/studies") -> socket.socket:
    """A multipart upload whose body stops after its first bytes."""
    sock = _raw(url)
    body = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n\r\n'
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    sock.sendall(head + body + b"\0" * 100)
    return sock


def _response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_slow_uploads_time_out_and_upload_slots_are_bounded(detection_predictor: Any) -> None:
    app = create_app(detection_predictor, upload_idle_timeout_s=1.0, max_concurrent_uploads=2)
    with live_server(app) as url:
        held = [_stalled_upload(url) for _ in range(2)]
        time.sleep(0.3)
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/studies", files=files_of([NIFTI]), timeout=30)
        assert r.status_code == 503 and "uploads are being received" in r.json()["detail"]
        assert time.perf_counter() - t0 < 1.0
        for sock in held:
            answer = _response(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            sock.close()
        assert time.perf_counter() - t0 < 4
        # The slots are free again.
        r = httpx.post(f"{url}/v1/studies", files=files_of([NIFTI]), timeout=30)
        assert r.status_code == 201


def test_connections_that_never_finish_their_headers_are_closed(
    detection_predictor: Any,
) -> None:
    app = create_app(detection_predictor)
    protocol = HeaderTimeoutH11Protocol.with_timeout(1.0)
    with live_server(app, http=protocol, limit_concurrency=1000) as url:
        socks = []
        for _ in range(300):
            sock = _raw(url)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(sock)
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/v1/health", timeout=5).json() == {"status": "ok"}
        assert time.perf_counter() - t0 < 2
        time.sleep(1.5)
        closed = 0
        for sock in socks:
            sock.settimeout(3)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            sock.close()
        assert closed == 300
        # A kept-alive connection that starts a request and stalls is closed as well.
        sock = _raw(url)
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" in _response(sock)
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHo")
        sock.settimeout(4)
        rest = sock.recv(65536)
        while rest:
            rest = sock.recv(65536)
        assert rest == b""
        sock.close()


# -- web pages cannot drive the API -------------------------------------------------------


@pytest.fixture
def app_and_proxy(detection_predictor: Any) -> tuple[Any, PredictorProxy]:
    proxy = PredictorProxy(detection_predictor)
    return create_app(proxy, allowed_hosts=("localhost", "127.0.0.1", "::1", "ct.example")), proxy


def test_host_allowlist_refuses_dns_rebinding(app_and_proxy: Any) -> None:
    app, _ = app_and_proxy
    with TestClient(app, base_url=BASE) as c:
        for host, status in (
            ("127.0.0.1:8000", 200),
            ("localhost", 200),
            ("[::1]:8000", 200),
            ("ct.example:8443", 200),
            ("CT.EXAMPLE.", 200),
            ("rebind.evil.example", 400),
            ("127.0.0.1.evil.example", 400),
            ("localhost@evil.example", 400),
            ("[::1", 400),
            ("", 400),
        ):
            r = c.get("/v1/health", headers={"host": host})
            assert r.status_code == status, host
        assert "--allowed-host" in c.get("/", headers={"host": "evil.example"}).json()["detail"]


def test_cross_origin_posts_are_refused_before_any_work(
    app_and_proxy: Any, dicom_files: list[Path]
) -> None:
    app, proxy = app_and_proxy
    with TestClient(app, base_url=BASE) as c:
        upload = files_of(dicom_files[:2])
        for headers in (
            {"origin": "http://evil.example"},
            {"origin": "null"},
            {"origin": "http://127.0.0.1:9999"},
            {"sec-fetch-site": "cross-site"},
            {"sec-fetch-site": "same-site", "origin": "http://127.0.0.1"},
        ):
            for path in ("/v1/predict", "/v1/studies"):
                r = c.post(path, files=upload, data={"max_new_tokens": "2"}, headers=headers)
                assert r.status_code == 403, (path, headers)
                assert "cross-origin" in r.json()["detail"]
        assert proxy.run_calls == [] and len(app.state.studies) == 0
        sid = c.post("/v1/studies", files=upload).json()["study_id"]
        r = c.delete(f"/v1/studies/{sid}", headers={"origin": "http://evil.example"})
        assert r.status_code == 403
        # The viewer's own requests (same origin) and scripts (no Origin) pass.
        same = {"origin": BASE, "sec-fetch-site": "same-origin"}
        r = c.post(f"/v1/studies/{sid}/predict", data={"max_new_tokens": "2"}, headers=same)
        assert r.status_code == 200, r.text
        # Reading is harmless and allowed (a cross-origin page cannot read the answer).
        assert c.get("/v1/health", headers={"sec-fetch-site": "cross-site"}).status_code == 200


def test_every_response_carries_the_security_headers(
    app_and_proxy: Any, dicom_files: list[Path]
) -> None:
    app, _ = app_and_proxy
    with TestClient(app, base_url=BASE) as c:
        responses = {
            "page": c.get("/"),
            "script": c.get("/static/viewer.js"),
            "health": c.get("/v1/health"),
            "missing": c.get("/nothing-here"),
            "bad host": c.get("/", headers={"host": "evil.example"}),
            "error": c.post("/v1/studies", files=[("files", ("a", b"junk"))]),
            "docs": c.get("/docs"),
        }
    for name, r in responses.items():
        assert r.headers["x-content-type-options"] == "nosniff", name
        assert r.headers["x-frame-options"] == "DENY", name
        assert r.headers["referrer-policy"] == "no-referrer", name
        csp = DOCS_CSP if name == "docs" else VIEWER_CSP
        assert r.headers["content-security-policy"] == csp, name
        assert "frame-ancestors 'none'" in csp
    assert responses["health"].headers["cache-control"] == "no-store"
