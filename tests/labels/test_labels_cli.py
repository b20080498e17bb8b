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
