"""Serving: throughput, latency under load, and study sessions vs re-uploads, over real HTTP.

Prints JSON. A tiny random detection model is created in a temporary folder and served by
``radgrounder.serve.create_app`` under uvicorn on 127.0.0.1 with the options ``radgrounder
serve`` uses (header timeout, keep-alive, connection limit). The server runs in a child
process (this script with a hidden flag), so its event loop and batcher thread compete only
with each other for the GIL and not with the benchmark's clients (an asyncio httpx client in
this process; both processes still share the machine's cores). The child adds one route,
``GET /_bench/stats`` (the batcher's ``stats`` and the seconds spent in ``predictor.run``),
and, unless ``--natural-length``, sets the model's ``min_new_tokens`` to ``--max-new-tokens``
so every request generates the same number of tokens. Its TMPDIR is a folder of the
benchmark's temporary folder: uploads and stored studies land there, the run reports
whatever the server left behind after its shutdown, and everything is removed at the end.

1. ``throughput``: ``--requests`` requests ``POST /v1/studies/{id}/predict`` (one slice each,
   slices in turn, ``max_new_tokens`` fixed) sent one at a time (``sequential``) vs by
   ``--concurrency`` clients at once (``concurrent``), interleaved: one discarded warm-up
   round, then ``--rounds`` rounds of sequential then concurrent. Requests/s per round, the
   ratio concurrent/sequential per round (median/min/max; ``unstable`` when
   (max - min) / median > ``UNSTABLE_SPREAD``), the batcher's mean items per model call and
   the fraction of wall time the model was running.
2. ``latency_at_rate``: open-loop Poisson arrivals at ``--rate`` requests/s (default
   ``RATE_FRACTION`` of the median concurrent throughput) for ``--rate-seconds``; latency is
   measured from each request's scheduled arrival (so a late client is not hidden);
   p50/p95/p99, the 503s and 504s and any other status.
3. ``study_session``: the design question "upload once and refer by id, or re-send the study
   each time", interleaved per round: a window change the old way (``POST /v1/slices`` with
   every file, ``window=lung``: all slices as PNGs) vs the new way (``GET
   .../slices/{k}/image?window=lung``, one PNG) and the raw pixels (``GET .../pixels``, which
   the viewer windows itself, so later window changes cost no request), and a Run the old
   way (``POST /v1/predict`` with every file) vs ``POST /v1/studies/{id}/predict``. Each round
   uploads the study once (``upload_study``) and deletes it at its end.

    .venv/bin/python benchmarks/bench_serve.py --quick     # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_serve.py             # about 2-3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from harness import MIN_ROUNDS, UNSTABLE_SPREAD, Machine, spread_report  # benchmarks/harness.py

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO / "data" / "totalseg_example" / "example_ct_dicom"
RATE_FRACTION = 0.7  # the open-loop rate, as a fraction of the median concurrent throughput
TASK = "grounded-report"
WINDOW = "lung"
REQUEST_TIMEOUT_S = 120.0  # every request; the server's own deadline is 300 s
STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_TIMEOUT_S = 30.0
STATS_PATH = "/_bench/stats"
# The Host the app answers to by default (loopback names); httpx sends the URL's host.
HOST = "127.0.0.1"

QUICK = {
    "requests": 32,
    "concurrency": 8,
    "rounds": 5,
    "rate_seconds": 10.0,
    "session_rounds": 5,
    "session_repeats": 3,
}
DEFAULT = {
    "requests": 96,
    "concurrency": 8,
    "rounds": 7,
    "rate_seconds": 45.0,
    "session_rounds": 9,
    "session_repeats": 5,
}


# -- the server (child process) ------------------------------------------------------------


def serve_child(args: argparse.Namespace) -> None:
    """Create the model, build the app and serve it on the listening socket ``--fd``."""
    import logging

    import torch
    import uvicorn

    from radgrounder.inference import Predictor
    from radgrounder.modeling import init_model
    from radgrounder.serve import create_app
    from radgrounder.serve.app import uvicorn_config
    from radgrounder.serve.limits import ServeLimits

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    overrides: dict[str, Any] = {}
    if args.max_batch is not None:
        overrides["max_batch"] = args.max_batch
    if args.batch_window_s is not None:
        overrides["batch_window_s"] = args.batch_window_s
    limits = ServeLimits(**overrides)
    folder = init_model("tiny", "detection", Path(args.serve_child), seed=0)
    predictor = Predictor(folder, device="cpu", max_prompt_tokens=limits.max_prompt_tokens)
    if not args.natural_length:
        predictor.loaded.model.generation_config.min_new_tokens = args.max_new_tokens

    timer = {"run_calls": 0, "run_items": 0, "run_seconds": 0.0}
    real_run = predictor.run

    def timed_run(items: Any, *a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_run(items, *a, **kw)
        finally:
            timer["run_calls"] += 1
            timer["run_items"] += len(items)
            timer["run_seconds"] += time.perf_counter() - started

    predictor.run = timed_run  # the app calls predictor.run through a lambda
    app = create_app(predictor, limits=limits)
    batcher = app.state.batcher

    @app.get(STATS_PATH, include_in_schema=False)
    async def bench_stats() -> dict[str, Any]:
        return {
            **batcher.stats,
            **timer,
            "pending_items": batcher.pending_items,
            "stored_studies": len(app.state.studies),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "limits": {
                "max_batch": limits.max_batch,
                "batch_window_s": limits.batch_window_s,
                "max_queued_items": limits.max_queued_items,
                "request_timeout_s": limits.request_timeout_s,
                "max_concurrent_uploads": limits.max_concurrent_uploads,
                "max_connections": limits.max_connections,
            },
        }

    config = uvicorn_config(app, limits, log_level="warning", lifespan="on")
    sock = socket.socket(fileno=args.fd)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it: exit 0 on that.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def server_process(tmp: Path, args: argparse.Namespace):
    """Start the child server on an ephemeral port; yields (base URL, report dict), which
    is filled in with the exit code, stderr findings and leftover files on the way out."""
    server_tmp = tmp / "server-tmp"
    server_tmp.mkdir()
    stderr_path = tmp / "server-stderr.txt"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    port = listener.getsockname()[1]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-child",
        str(tmp / "model"),
        "--fd",
        str(listener.fileno()),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    if args.natural_length:
        command.append("--natural-length")
    if args.max_batch is not None:
        command += ["--max-batch", str(args.max_batch)]
    if args.batch_window_s is not None:
        command += ["--batch-window-s", str(args.batch_window_s)]
    env = {**os.environ, "TMPDIR": str(server_tmp), "PYTHONUNBUFFERED": "1"}
    report: dict[str, Any] = {}
    with open(stderr_path, "wb") as err:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(listener.fileno(),),
        )
    listener.close()
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url, child, stderr_path)
        report["pid"] = child.pid
        yield url, report
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown and the lifespan's
            try:
                child.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                report["killed_after_s"] = SHUTDOWN_TIMEOUT_S
        report["exit_code"] = child.returncode
        report["stderr"] = stderr_findings(stderr_path)
        left = sorted(str(p.relative_to(server_tmp)) for p in server_tmp.rglob("*"))
        # The server's own folders (uploads, studies) are named radgrounder-*; anything else
        # (torch makes an empty torchinductor_<user> folder) is reported apart.
        report["left_files"] = [p for p in left if p.startswith("radgrounder-")]
        report["other_files_in_tmpdir"] = [p for p in left if not p.startswith("radgrounder-")]


def wait_ready(url: str, child: subprocess.Popen, stderr_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=5.0) as client:
        while True:
            if child.poll() is not None:
                tail = stderr_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server exited with {child.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/v1/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.1)


def stderr_findings(path: Path) -> dict[str, Any]:
    """The server's stderr in short: its line count and its distinct lines with counts
    (warnings, errors, tracebacks; timestamps dropped)."""
    lines = [line.rstrip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line.strip()]
    distinct: Counter[str] = Counter()
    for line in lines:
        parts = line.split(" ", 2)
        # "2024-01-01 12:00:00,123 WARNING msg" -> "WARNING msg"
        key = parts[2] if len(parts) == 3 and parts[0][:2].isdigit() else line
        distinct[key[:300]] += 1
    return {
        "lines": len(lines),
        "distinct": [{"count": n, "line": text} for text, n in distinct.most_common(25)],
        "errors": sum(
            1 for line in lines if any(w in line for w in ("ERROR", "Traceback", "Exception"))
        ),
    }


# -- client helpers --------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | str  # an HTTP status, or the exception's class name
    seconds: float
    response_bytes: int = 0
    detail: str | None = None


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome, what: str) -> None:
        self.statuses[str(outcome.status)] += 1
        if outcome.status != 200 and len(self.problems) < 20:
            self.problems.append(f"{what}: {outcome.status} {outcome.detail or ''}".strip())


async def timed(send: Callable[[], Awaitable[httpx.Response]]) -> tuple[Outcome, Any]:
    started = time.perf_counter()
    try:
        response = await send()
    except httpx.HTTPError as exc:
        return Outcome(type(exc).__name__, time.perf_counter() - started, 0, str(exc)[:200]), None
    seconds = time.perf_counter() - started
    detail = None
    if response.status_code >= 400:
        detail = response.text[:200]
    return Outcome(response.status_code, seconds, len(response.content), detail), response


def predict_fields(k: int | None, max_new_tokens: int) -> dict[str, str]:
    fields = {"task": TASK, "language": "en", "max_new_tokens": str(max_new_tokens)}
    if k is not None:
        fields["slice"] = str(k)
    return fields


async def stats(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await client.get(f"{url}{STATS_PATH}")
    response.raise_for_status()
    return response.json()


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, float]:
    keys = ("calls", "items", "run_seconds", "cancelled_jobs", "expired_jobs")
    return {k: after[k] - before[k] for k in keys}


def percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    arr = np.asarray(seconds)
    return {
        "p50": round(float(np.percentile(arr, 50)), 4),
        "p95": round(float(np.percentile(arr, 95)), 4),
        "p99": round(float(np.percentile(arr, 99)), 4),
        "max": round(float(arr.max()), 4),
        "mean": round(float(arr.mean()), 4),
    }


def upload_files(files: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/dicom")) for name, data in files]


async def create_study(
    client: httpx.AsyncClient, url: str, files: list[tuple[str, bytes]], tally: Tally
) -> tuple[Outcome, dict[str, Any]]:
    outcome, response = await timed(
        lambda: client.post(f"{url}/v1/studies", files=upload_files(files))
    )
    if outcome.status == 201:  # the study endpoint answers 201 Created
        outcome.status = 200
    tally.add(outcome, "POST /v1/studies")
    if response is None or outcome.status != 200:
        raise RuntimeError(f"cannot upload the study: {outcome.status} {outcome.detail}")
    return outcome, response.json()


# -- 1. throughput ---------------------------------------------------------------------------


async def closed_loop(
    client: httpx.AsyncClient,
    url: str,
    study: dict[str, Any],
    n: int,
    concurrency: int,
    max_new_tokens: int,
    tally: Tally,
) -> tuple[float, list[float]]:
    """``n`` predict requests by ``concurrency`` clients; (wall seconds, latencies of 200s)."""
    next_index = 0
    latencies: list[float] = []
    n_slices = study["n_slices"]
    path = f"{url}/v1/studies/{study['study_id']}/predict"

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            fields = predict_fields(i % n_slices, max_new_tokens)
            outcome, response = await timed(lambda f=fields: client.post(path, data=f))
            tally.add(outcome, "POST /v1/studies/{id}/predict")
            if outcome.status == 200:
                if len(response.json().get("predictions", [])) != 1:
                    tally.problems.append("predict: not exactly one prediction")
                latencies.append(outcome.seconds)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def throughput(
    client: httpx.AsyncClient, url: str, study: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    tally = Tally()
    modes = {"sequential": 1, "concurrent": args.concurrency}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    totals: dict[str, dict[str, float]] = {m: Counter() for m in modes}
    walls: dict[str, float] = dict.fromkeys(modes, 0.0)
    order = list(modes.items())
    for round_index in range(args.rounds + 1):  # round 0: warm-up, discarded
        # The order alternates, so a drift in machine load within a round cancels.
        for mode, concurrency in order if round_index % 2 == 0 else order[::-1]:
            before = await stats(client, url)
            seconds, lat = await closed_loop(
                client, url, study, args.requests, concurrency, args.max_new_tokens, tally
            )
            after = await stats(client, url)
            if round_index == 0:
                continue
            rates[mode].append(len(lat) / seconds)
            latencies[mode] += lat
            totals[mode].update(delta(after, before))
            walls[mode] += seconds
    ratios = [c / s for s, c in zip(rates["sequential"], rates["concurrent"], strict=True)]
    out: dict[str, Any] = {
        "endpoint": "POST /v1/studies/{id}/predict (one slice, urlencoded fields)",
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "warmup_rounds_discarded": 1,
    }
    for mode in modes:
        t = totals[mode]
        out[mode] = {
            "requests_per_s_rounds": [round(v, 3) for v in rates[mode]],
            "requests_per_s_median": round(statistics.median(rates[mode]), 3),
            "latency_s": percentiles(latencies[mode]),
            "model_calls": int(t["calls"]),
            "items_per_model_call_mean": round(t["items"] / t["calls"], 3) if t["calls"] else None,
            "model_call_s_mean": round(t["run_seconds"] / t["calls"], 4) if t["calls"] else None,
            # Of the wall time of these rounds, the share the batcher spent in predictor.run.
            "model_busy_fraction": round(t["run_seconds"] / walls[mode], 3),
        }
    out["ratio_concurrent_over_sequential"] = spread_report(ratios)
    out["unstable"] = out["ratio_concurrent_over_sequential"]["unstable"]
    out["statuses"] = dict(tally.statuses)
    out["problems"] = tally.problems
    return out


# -- 2. latency at a fixed arrival rate ------------------------------------------------------


async def open_loop(
    client: httpx.AsyncClient,
    url: str,
    study: dict[str, Any],
    rate: float,
    duration: float,
    max_new_tokens: int,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    arrivals: list[float] = []
    t = float(rng.exponential(1 / rate))
    while t < duration:
        arrivals.append(t)
        t += float(rng.exponential(1 / rate))
    tally = Tally()
    latencies: list[float] = []
    lags: list[float] = []
    path = f"{url}/v1/studies/{study['study_id']}/predict"
    n_slices = study["n_slices"]
    loop = asyncio.get_running_loop()

    async def one(i: int, at: float, start: float) -> None:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        lags.append(loop.time() - (start + at))
        fields = predict_fields(i % n_slices, max_new_tokens)
        outcome, _ = await timed(lambda: client.post(path, data=fields))
        finished = loop.time()
        tally.add(outcome, "POST /v1/studies/{id}/predict")
        if outcome.status == 200:
            latencies.append(finished - (start + at))  # from the scheduled arrival

    before = await stats(client, url)
    start = loop.time()
    await asyncio.gather(*(one(i, at, start) for i, at in enumerate(arrivals)))
    wall = loop.time() - start
    after = await stats(client, url)
    d = delta(after, before)
    statuses = dict(tally.statuses)
    return {
        "endpoint": "POST /v1/studies/{id}/predict (one slice)",
        "arrivals": "poisson (open loop; latency from the scheduled arrival)",
        "rate_per_s": round(rate, 3),
        "duration_s": duration,
        "sent": len(arrivals),
        "offered_per_s": round(len(arrivals) / duration, 3),
        "ok": len(latencies),
        "wall_s_until_last_answer": round(wall, 3),
        "answered_per_s": round(len(latencies) / wall, 3),
        "latency_s": percentiles(latencies),
        "statuses": statuses,
        "n_503": statuses.get("503", 0),
        "n_504": statuses.get("504", 0),
        "problems": tally.problems,
        "client_send_lag_s_max": round(max(lags), 4) if lags else None,
        "model_calls": int(d["calls"]),
        "items_per_model_call_mean": round(d["items"] / d["calls"], 3) if d["calls"] else None,
        "model_busy_fraction": round(d["run_seconds"] / wall, 3),
        "cancelled_jobs": int(d["cancelled_jobs"]),
        "expired_jobs": int(d["expired_jobs"]),
    }


# -- 3. study session vs re-upload -----------------------------------------------------------


OPERATIONS = {
    "upload_study": "POST /v1/studies with every file (once per study)",
    "window_old_slices": f"POST /v1/slices with every file, window={WINDOW}: all slices as PNGs",
    "window_new_image": f"GET /v1/studies/{{id}}/slices/{{k}}/image?window={WINDOW}: one PNG",
    "pixels_new": "GET /v1/studies/{id}/slices/{k}/pixels: one slice's raw int16 values",
    "run_old_predict": "POST /v1/predict with every file (middle slice)",
    "run_new_study_predict": "POST /v1/studies/{id}/predict (middle slice)",
}


async def study_session(
    client: httpx.AsyncClient,
    url: str,
    files: list[tuple[str, bytes]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    tally = Tally()
    seconds: dict[str, list[float]] = {name: [] for name in OPERATIONS}
    sizes: dict[str, int] = {}
    request_bytes = sum(len(data) for _, data in files)
    fields = predict_fields(None, args.max_new_tokens)

    def check(ok: bool, what: str) -> None:
        if not ok and len(tally.problems) < 20:
            tally.problems.append(what)

    async def repeat(
        record: dict[str, float],
        name: str,
        n: int,
        send: Callable[[], Awaitable[httpx.Response]],
    ) -> Any:
        """``n`` sequential requests; records their median; returns the last good response."""
        times = []
        response = None
        for _ in range(n):
            outcome, response = await timed(send)
            tally.add(outcome, OPERATIONS[name])
            times.append(outcome.seconds)
            sizes[name] = outcome.response_bytes
        record[name] = statistics.median(times)
        return response if response is not None and response.status_code == 200 else None

    async def one_round(round_index: int) -> dict[str, float]:
        record: dict[str, float] = {}
        upload, study = await create_study(client, url, files, tally)
        record["upload_study"] = upload.seconds
        sizes["upload_study"] = upload.response_bytes
        sid, n_slices = study["study_id"], study["n_slices"]
        k = round_index % n_slices
        base = f"{url}/v1/studies/{sid}"
        reps = args.session_repeats
        heavy = max(1, reps // 2)

        slices = await repeat(
            record,
            "window_old_slices",
            heavy,
            lambda: client.post(
                f"{url}/v1/slices", files=upload_files(files), data={"window": WINDOW}
            ),
        )
        check(slices is not None and len(slices.json()["slices"]) == n_slices, "slices: count")
        image = await repeat(
            record,
            "window_new_image",
            reps,
            lambda: client.get(f"{base}/slices/{k}/image", params={"window": WINDOW}),
        )
        check(image is not None and image.content[:8] == b"\x89PNG\r\n\x1a\n", "image: not PNG")
        pixels = await repeat(
            record, "pixels_new", reps, lambda: client.get(f"{base}/slices/{k}/pixels")
        )
        if pixels is not None:
            rows, cols = int(pixels.headers["x-rows"]), int(pixels.headers["x-columns"])
            itemsize = np.dtype(pixels.headers["x-pixel-dtype"]).itemsize
            check(len(pixels.content) == rows * cols * itemsize, "pixels: wrong length")
        else:
            check(False, "pixels: failed")
        old = await repeat(
            record,
            "run_old_predict",
            heavy,
            lambda: client.post(f"{url}/v1/predict", files=upload_files(files), data=fields),
        )
        check(old is not None and len(old.json()["predictions"]) == 1, "predict: count")
        new = await repeat(
            record,
            "run_new_study_predict",
            heavy,
            lambda: client.post(f"{base}/predict", data=fields),
        )
        check(new is not None and len(new.json()["predictions"]) == 1, "study predict: count")
        if old is not None and new is not None:
            old_text = old.json()["predictions"][0]["raw_text"]
            new_text = new.json()["predictions"][0]["raw_text"]
            check(old_text == new_text, "the same slice gave different text old and new way")
        deleted, _ = await timed(lambda: client.delete(base))
        if deleted.status == 204:
            deleted.status = 200
        tally.add(deleted, "DELETE /v1/studies/{id}")
        return record

    rounds: list[dict[str, float]] = []
    for round_index in range(args.session_rounds + 1):  # round 0: warm-up, discarded
        record = await one_round(round_index)
        if round_index > 0:
            rounds.append(record)
    for record in rounds:
        for name, value in record.items():
            seconds[name].append(value)

    def ratio(old: str, new: str) -> dict[str, Any]:
        return spread_report([r[old] / r[new] for r in rounds])

    ops = {
        name: {
            "what": OPERATIONS[name],
            "median_s": round(statistics.median(v), 4),
            "min_s": round(min(v), 4),
            "max_s": round(max(v), 4),
            "request_bytes": request_bytes if name in _UPLOADS else 0,
            "response_bytes": sizes.get(name),
        }
        for name, v in seconds.items()
    }
    saved_per_run = ops["run_old_predict"]["median_s"] - ops["run_new_study_predict"]["median_s"]
    saved_per_window = ops["window_old_slices"]["median_s"] - ops["window_new_image"]["median_s"]
    ratios = {
        "window_change_old_over_new_image": ratio("window_old_slices", "window_new_image"),
        "window_change_old_over_pixels": ratio("window_old_slices", "pixels_new"),
        "run_old_over_new": ratio("run_old_predict", "run_new_study_predict"),
    }
    return {
        "rounds": args.session_rounds,
        "warmup_rounds_discarded": 1,
        "repeats_per_round": {
            "light (image, pixels)": args.session_repeats,
            "heavy (old slices, predicts)": max(1, args.session_repeats // 2),
        },
        "n_files": len(files),
        "study_bytes": request_bytes,
        "operations": ops,
        "ratios_old_over_new": ratios,
        "unstable": any(r["unstable"] for r in ratios.values()),
        "window_change_after_pixels": (
            "no request at all: the viewer fetches a slice's raw pixels once and applies "
            "any window in the browser; the old way re-sent every file for each change"
        ),
        "note": (
            "window_old_slices renders every slice in the window, window_new_image one "
            "slice (the one on screen); an upload pays off once the saving of later "
            "requests exceeds upload_study"
        ),
        "upload_pays_off_after": {
            "runs": round(ops["upload_study"]["median_s"] / saved_per_run, 2)
            if saved_per_run > 0
            else None,
            "window_changes": round(ops["upload_study"]["median_s"] / saved_per_window, 2)
            if saved_per_window > 0
            else None,
        },
        "statuses": dict(tally.statuses),
        "problems": tally.problems,
    }


_UPLOADS = ("upload_study", "window_old_slices", "run_old_predict")


# -- main ------------------------------------------------------------------------------------


LONG_QUESTIONS = (16_000, 60_000)  # characters: the sizes that exhausted the old server


async def long_questions(
    client: httpx.AsyncClient, url: str, study: dict[str, Any], files: list, pid: int
) -> dict[str, Any]:
    """The measured attack: a question of 16,000 or 60,000 characters (the old server took
    41 s and 2.8 GB for the first; the second grew it to 21.7 GB until the OOM killer).
    Status, seconds and the server's resident memory before and after each request."""
    import psutil

    server = psutil.Process(pid)
    out = []
    for n in LONG_QUESTIONS:
        question = ("Is there a lesion in the liver " * (n // 31 + 1))[:n]
        for endpoint in ("study", "one-shot"):
            before = server.memory_info().rss
            started = time.perf_counter()
            if endpoint == "study":
                r = await client.post(
                    f"{url}/v1/studies/{study['study_id']}/predict",
                    data={"task": "vqa", "question": question},
                )
            else:
                r = await client.post(
                    f"{url}/v1/predict",
                    files=upload_files(files),
                    data={"task": "vqa", "question": question},
                )
            seconds = time.perf_counter() - started
            after = server.memory_info().rss
            out.append(
                {
                    "characters": n,
                    "endpoint": endpoint,
                    "status": r.status_code,
                    "detail": r.json().get("detail"),
                    "seconds": round(seconds, 4),
                    "server_rss_mib_before": round(before / 1024**2, 1),
                    "server_rss_mib_after": round(after / 1024**2, 1),
                }
            )
    return {"requests": out, "max_seconds": max(x["seconds"] for x in out)}


async def run_benchmark(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    files = [(p.name, p.read_bytes()) for p in sorted(SERIES.iterdir()) if p.is_file()]
    limits = httpx.Limits(
        max_connections=max(64, 4 * args.concurrency),
        max_keepalive_connections=max(64, 4 * args.concurrency),
        keepalive_expiry=3.0,  # below the server's 5 s keep-alive: no reuse of a closing one
    )
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        start_stats = await stats(client, url)
        setup = Tally()
        _, study = await create_study(client, url, files, setup)
        result: dict[str, Any] = {}
        phase = time.perf_counter()
        result["throughput"] = await throughput(client, url, study, args)
        result["throughput"]["phase_s"] = round(time.perf_counter() - phase, 1)

        phase = time.perf_counter()
        concurrent = result["throughput"]["concurrent"]["requests_per_s_median"]
        rate = args.rate or RATE_FRACTION * concurrent
        latency = await open_loop(
            client, url, study, rate, args.rate_seconds, args.max_new_tokens, args.seed
        )
        latency["rate_basis"] = (
            "--rate"
            if args.rate
            else f"{RATE_FRACTION} x the median concurrent throughput ({concurrent} req/s)"
        )
        latency["phase_s"] = round(time.perf_counter() - phase, 1)
        result["latency_at_rate"] = latency
        result["long_questions"] = await long_questions(client, url, study, files, pid)
        await client.delete(f"{url}/v1/studies/{study['study_id']}")

        phase = time.perf_counter()
        result["study_session"] = await study_session(client, url, files, args)
        result["study_session"]["phase_s"] = round(time.perf_counter() - phase, 1)
        end_stats = await stats(client, url)
    result["server_stats"] = {
        "model_calls": end_stats["calls"],
        "items": end_stats["items"],
        "cancelled_jobs": end_stats["cancelled_jobs"],
        "expired_jobs": end_stats["expired_jobs"],
        "pending_items_at_end": end_stats["pending_items"],
        "stored_studies_at_end": end_stats["stored_studies"],
        "limits": end_stats["limits"],
    }
    result["_server_info"] = start_stats
    return result


def comparisons(result: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios, in the form every benchmark reports them."""
    out = {
        "concurrent_over_sequential_requests_per_s": {
            "what": "predict requests/s, concurrent clients / one client at a time",
            **result["throughput"]["ratio_concurrent_over_sequential"],
        }
    }
    whats = {
        "window_change_old_over_new_image": "window change: re-upload (POST /v1/slices) / "
        "study slice PNG",
        "run_old_over_new": "a run: one-shot upload + predict / study predict",
    }
    for key, what in whats.items():
        ratio = result["study_session"]["ratios_old_over_new"][key]
        out[key] = {"what": what, **ratio}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer of each")
    parser.add_argument("--requests", type=int, help="predict requests per throughput round")
    parser.add_argument("--concurrency", type=int, help="clients at once (concurrent mode)")
    parser.add_argument("--rounds", type=int, help=f"timed throughput rounds (>= {MIN_ROUNDS})")
    parser.add_argument("--rate", type=float, help="open-loop requests/s (default: derived)")
    parser.add_argument("--rate-seconds", type=float, help="open-loop arrival window")
    parser.add_argument("--session-rounds", type=int, help="timed study-session rounds")
    parser.add_argument("--session-repeats", type=int, help="light requests per op and round")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--natural-length",
        action="store_true",
        help="let generation stop at <eos> (default: always --max-new-tokens tokens)",
    )
    parser.add_argument("--max-batch", type=int, help="ServeLimits.max_batch (default 8)")
    parser.add_argument("--batch-window-s", type=float, help="ServeLimits.batch_window_s")
    parser.add_argument("--seed", type=int, default=0, help="of the Poisson arrivals")
    parser.add_argument("--serve-child", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        serve_child(args)
        return
    preset = QUICK if args.quick else DEFAULT
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds < MIN_ROUNDS or args.session_rounds < MIN_ROUNDS:
        parser.error(f"--rounds and --session-rounds must be at least {MIN_ROUNDS}")
    if min(args.requests, args.concurrency, args.session_repeats, args.max_new_tokens) < 1:
        parser.error("--requests, --concurrency, --session-repeats, --max-new-tokens: >= 1")
    if args.rate_seconds <= 0 or (args.rate is not None and args.rate <= 0):
        parser.error("--rate and --rate-seconds must be positive")

    started = time.perf_counter()
    machine = Machine()
    with tempfile.TemporaryDirectory(prefix="radgrounder-bench-serve-") as tmp:
        with server_process(Path(tmp), args) as (url, server):
            result = asyncio.run(run_benchmark(url, args, server["pid"]))
        info = result.pop("_server_info")
    result["server"] = server
    problems = [
        *(f"throughput: {p}" for p in result["throughput"]["problems"]),
        *(f"latency_at_rate: {p}" for p in result["latency_at_rate"]["problems"]),
        *(f"study_session: {p}" for p in result["study_session"]["problems"]),
    ]
    if server["exit_code"] != 0:
        problems.append(f"server exit code {server['exit_code']}")
    if server["left_files"]:
        problems.append(f"the server left {len(server['left_files'])} files in its TMPDIR")
    if server["stderr"]["errors"]:
        problems.append(f"{server['stderr']['errors']} error lines on the server's stderr")
    output: dict[str, Any] = {
        "benchmark": "serve",
        "command": shlex.join([sys.executable, *sys.argv]),
        "quick": args.quick,
        "model": "tiny detection, random weights (init_model seed 0), CPU",
        "task": TASK,
        "max_new_tokens": args.max_new_tokens,
        "fixed_new_tokens": not args.natural_length,
        **result,
        "comparisons": comparisons(result),
        "unstable": any(
            result[k]["unstable"] for k in ("throughput", "study_session") if k in result
        ),
        "unstable_threshold": UNSTABLE_SPREAD,
        "problems": problems,
        "machine": machine.report(
            torch=info["torch"],
            server_torch_threads=info["torch_threads"],
            server_torch_interop_threads=info["torch_interop_threads"],
            httpx=httpx.__version__,
            clients="asyncio + httpx.AsyncClient in the benchmark process; "
            "server in a child process on the same machine",
        ),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
