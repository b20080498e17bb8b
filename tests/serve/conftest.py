"""Fixtures for the API and viewer tests: tiny random models, predictors, a live server."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from radgrounder.anatomy import load_schema
from radgrounder.grounding import GroundedText, codec

REPO = Path(__file__).resolve().parents[2]
DICOM_DIR = REPO / "data" / "totalseg_example" / "example_ct_dicom"
NIFTI = REPO / "data" / "totalseg_example" / "example_ct_sm.nii.gz"

# A grounded answer in the detection markup: "liver" (class 5) in the box x 100-300,
# y 120-320 of 512 bins.
DETECTION_MARKUP = (
    "The <p bbox=<loc0100><loc0120><loc0300><loc0320> id=<seg005>>liver</p> is normal."
)
SEGMENTATION_MARKUP = "The <seg>liver</seg> is normal."


@pytest.fixture(scope="session")
def detection_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radgrounder.modeling import init_model

    return init_model("tiny", "detection", tmp_path_factory.mktemp("models") / "det", seed=0)


@pytest.fixture(scope="session")
def segmentation_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radgrounder.modeling import init_model

    return init_model("tiny", "segmentation", tmp_path_factory.mktemp("models") / "seg", seed=0)


@pytest.fixture(scope="session")
def detection_predictor(detection_model: Path) -> Any:
    from radgrounder.inference import Predictor

    return Predictor(detection_model, device="cpu")


@pytest.fixture(scope="session")
def segmentation_predictor(segmentation_model: Path) -> Any:
    from radgrounder.inference import Predictor

    return Predictor(segmentation_model, device="cpu")


@pytest.fixture(scope="session")
def dicom_files() -> list[Path]:
    files = sorted(DICOM_DIR.iterdir())
    assert len(files) == 20
    return files


class PredictorProxy:
    """A real predictor with hooks: every attribute is the wrapped predictor's, ``run`` and
    ``prepare`` calls are recorded (items, ``max_new_tokens``, thread name), and
    ``before_run``/``after_prepare`` let a test act at those points."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.run_calls: list[dict[str, Any]] = []
        self.after_prepare: Callable[[list[Any]], None] | None = None
        self.before_run: Callable[[list[Any]], None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def prepare(self, *args: Any, **kwargs: Any) -> list[Any]:
        items = self.real.prepare(*args, **kwargs)
        if self.after_prepare is not None:
            self.after_prepare(items)
        return items

    def run(self, items: list[Any], max_new_tokens: int = 200, **kwargs: Any) -> list[Any]:
        self.run_calls.append(
            {
                "n_items": len(items),
                "max_new_tokens": max_new_tokens,
                "thread": threading.current_thread().name,
            }
        )
        if self.before_run is not None:
            self.before_run(items)
        return self.real.run(items, max_new_tokens=max_new_tokens, **kwargs)


class GroundTruthPredictor(PredictorProxy):
    """A real predictor whose answers are replaced by a fixed grounded markup.

    The tiny random models rarely write well-formed grounding markup, so tests that need a
    grounded phrase keep everything real (upload, preprocessing, batching, generation, the
    response format) and only swap the decoded text for ``markup``, decoded by the same
    codec the predictor uses. For the segmentation model each ``<seg>`` phrase gets a
    rectangular mask (rows/cols 30-60 % of the slice) and the schema class of its label.
    """

    def __init__(self, real: Any, markup: str | None = None) -> None:
        super().__init__(real)
        detect = real.variant == "detection"
        self.markup = markup or (DETECTION_MARKUP if detect else SEGMENTATION_MARKUP)

    def grounded(self, width: int, height: int) -> GroundedText:
        schema = load_schema()
        if self.real.variant == "detection":
            return codec("radgrounder-detect", class_names=schema.names_by_id()).decode(self.markup)
        mask = np.zeros((height, width), bool)
        mask[int(0.3 * height) : int(0.6 * height), int(0.3 * width) : int(0.6 * width)] = True
        n = self.markup.count("</seg>")
        decoded = codec("radgrounder-segment").decode(self.markup, [mask] * n)
        spans = [
            replace(s, class_id=schema.get(s.label).id, class_name=s.label)
            if s.label in schema
            else s
            for s in decoded.spans
        ]
        return GroundedText(decoded.text, spans, decoded.problems)

    def run(self, items: list[Any], max_new_tokens: int = 200, **kwargs: Any) -> list[Any]:
        preds = super().run(items, max_new_tokens=max_new_tokens, **kwargs)
        for pred in preds:
            pred.raw_text = self.markup
            pred.grounded = self.grounded(pred.width, pred.height)
        return preds


@contextlib.contextmanager
def live_server(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (an ephemeral port) in a thread; yields the
    base URL and stops the server afterwards. ``config``: more ``uvicorn.Config`` options."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        access_log=False,
        lifespan="on",
        **config,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


# (method, path, status) of every request the serve tests make, from the server's own access
# log line (RequestMiddleware): tests/serve/test_zz_observed_codes.py checks them against the
# OpenAPI schema after every other serve test has run.
OBSERVED: list[tuple[str, str, int]] = []


class _AccessLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("request_id=%s method=%s path=%s status=%d"):
            _, method, path, status, *_ = record.args
            OBSERVED.append((str(method), str(path), int(status)))


@pytest.fixture(autouse=True, scope="session")
def _record_status_codes() -> Iterator[None]:
    log = logging.getLogger("radgrounder.serve")
    handler, level = _AccessLog(), log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
