"""The labels subcommands as a user runs them, in a real subprocess."""

import json
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES
from tests.labels.fake_openai_server import FakeOpenAIServer, Fault

REPORTS = EXAMPLES / "reports.jsonl"
FAST = ("--max-retries", "1", "--backoff", "0.01", "--timeout", "5")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "radgrounder", "labels", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_keywords_lexicon_cli(tmp_path):
    out = tmp_path / "mentions.jsonl"
    res = run("keywords", str(REPORTS), "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["language"] for line in lines} == {"en", "de"}
    liver = [m for line in lines for m in line["mentions"] if m["class_name"] == "liver"]
    assert {m["text"] for m in liver} >= {"liver", "Leber"}
    for line in lines:
        for m in line["mentions"]:
            assert line["sentence"][m["start"] : m["end"]] == m["text"]


def test_keywords_llm_cli_reports_failures_and_resumes(tmp_path):
    out = tmp_path / "mentions.jsonl"
    with FakeOpenAIServer() as server:
        llm_args = [
            "keywords",
            str(REPORTS),
            "--out",
            str(out),
            "--backend",
            "llm",
            "--endpoint",
            server.url,
            "--model",
            "test-model",
            *FAST,
        ]
        server.fail(Fault("status", 503), times=None)
        res = run(*llm_args)
        assert res.returncode == 3
        assert "failed:" in res.stderr and "503" in res.stderr
        failed = [json.loads(line) for line in out.read_text().splitlines()]
        assert failed and all("failed" in line for line in failed)
        server.reset()
        res = run(*llm_args)
        assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(failed) and all("mentions" in line for line in lines)
    assert any(m["class_name"] == "liver" for line in lines for m in line["mentions"])


def _build_args(tmp_path, server, *extra: str) -> list[str]:
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    scans.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    for sub, root in (("scans", scans), ("labels", labels)):
        target = root / "ct_upper_abdomen.nii.gz"
        if not target.exists():
            target.symlink_to(EXAMPLES / "layout" / sub / "ct_upper_abdomen.nii.gz")
    inputs = ["--scans", str(scans), "--labels", str(labels), "--reports", str(REPORTS)]
    llm = ["--backend", "llm", "--endpoint", server.url, "--model", "m"]
    return ["build", *inputs, "--no-vqa", *llm, *extra]


def test_build_with_failing_keyword_requests_exits_3_and_says_so(tmp_path):
    with FakeOpenAIServer() as server:
        server.fail(Fault("status", 400), times=None)
        res = run(*_build_args(tmp_path, server, "--out", str(tmp_path / "ds")))
    assert res.returncode == 3, res.stderr
    report = json.loads((tmp_path / "ds" / "build_report.json").read_text())
    n = len(report["failed_sentences"])
    assert n > 0
    assert f"keywords failed for {n} of {n} sentences" in res.stderr
    assert "HTTP 400" in res.stderr and "build_report.json" in res.stderr


def test_api_key_from_a_file_or_the_environment(tmp_path):
    import os

    key = tmp_path / "key"
    key.write_text("sk-local-abc\n")
    key.chmod(0o644)
    with FakeOpenAIServer() as server:
        base = ["keywords", str(REPORTS), "--backend", "llm", "--endpoint", server.url,
                "--model", "m", *FAST]  # fmt: skip
        res = run(*base, "--out", str(tmp_path / "a.jsonl"), "--api-key-file", str(key))
        assert res.returncode == 1 and "readable by others" in res.stderr
        assert res.stderr.count("\n") == 1 and server.count() == 0
        key.chmod(0o600)
        res = run(*base, "--out", str(tmp_path / "b.jsonl"), "--api-key-file", str(key))
        assert res.returncode == 0, res.stderr
        assert {r.headers["Authorization"] for r in server.requests} == {"Bearer sk-local-abc"}
        server.reset()
        env = {**os.environ, "RADGROUNDER_LLM_API_KEY": "sk-env"}
        done = subprocess.run(
            [sys.executable, "-m", "radgrounder", "labels", *base, "--out",
             str(tmp_path / "c.jsonl")],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert {r.headers["Authorization"] for r in server.requests} == {"Bearer sk-env"}
        # With the build command the same flag and variable; the JSON mode goes with it.
        server.reset()
        extra = ["--api-key-file", str(key), "--response-format", "json_object"]
        res = run(*_build_args(tmp_path, server, "--out", str(tmp_path / "ds"), *extra))
        assert res.returncode == 0, res.stderr
        assert {r.headers["Authorization"] for r in server.requests} == {"Bearer sk-local-abc"}
        assert {r.body["response_format"]["type"] for r in server.requests} == {"json_object"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["keywords", "missing.csv", "--out", "x.jsonl"], "missing.csv"),
        (["keywords", str(REPORTS), "--out", "x.jsonl", "--backend", "llm"], "--endpoint"),
        (
            [
                "build",
                "--scans",
                "nope",
                "--labels",
                "nope",
                "--reports",
                str(REPORTS),
                "--out",
                "o",
            ],
            "nope",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needle):
    res = subprocess.run(
        [sys.executable, "-m", "radgrounder", "labels", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_every_labels_command_help_ends_with_an_example():
    for command in ("segment", "regions", "keywords", "build", "export"):
        res = run(command, "--help")
        assert res.returncode == 0
        assert f"radgrounder labels {command}" in res.stdout.strip().splitlines()[-1]
