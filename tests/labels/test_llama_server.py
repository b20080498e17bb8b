"""Keyword extraction and the judge against a real llama.cpp ``llama-server`` on loopback,
serving a tiny random-weight GGUF model written by the test (slow; ``.ci/run`` builds the
server from the llama.cpp sources on PyPI)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.llama_server import llama_server, server_binary, write_tiny_gguf

pytestmark = pytest.mark.slow

SENTENCES = [
    ("s1", "The liver is normal in size; both kidneys without hydronephrosis.", "en"),
    ("s2", "Kein Hinweis auf eine Raumforderung der Leber.", "de"),
    ("s3", "Degenerative changes at L4/L5.", "en"),
    ("s4", "The spleen is not enlarged.", "en"),
]
KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = server_binary()
    if binary is None:
        if "CI" in __import__("os").environ:
            pytest.fail("no llama-server built (.ci/build-llama-server)")
        pytest.skip("no llama-server here: run .ci/build-llama-server")
    tmp = tmp_path_factory.mktemp("llama")
    model = write_tiny_gguf(tmp / "tiny.gguf")
    with llama_server(binary, model, slots=2, api_key=KEY, log=tmp / "server.log") as url:
        yield url


def test_keywords_finish_bounded_with_the_servers_slots(server: str) -> None:
    from radgrounder.labels.llm import LLMExtractor

    ex = LLMExtractor(server, "tiny", api_key=KEY, timeout=120, max_retries=1)
    run = ex.extract_many(SENTENCES, progress=False)
    # The schema's enum, maxItems and maxLength, enforced by llama.cpp's grammar, make even
    # noise a valid reply: every sentence ends, none fails, within the token budget.
    assert run.failures == {}
    assert set(run.results) == {sid for sid, _, _ in SENTENCES}
    assert (ex.concurrency, ex.concurrency_source) == (2, "server")
    for sid, sentence, _ in SENTENCES:
        for mention in run.results[sid]:  # whatever was kept occurs verbatim
            assert sentence[mention.start : mention.end] == mention.text


def test_a_keyed_server_without_the_key_fails_every_sentence_at_once(
    server: str, tmp_path: Path
) -> None:
    reports = tmp_path / "reports.jsonl"
    reports.write_text('{"scan_id": "a", "language": "en", "text": "The liver is normal."}\n')
    llm = ["--backend", "llm", "--endpoint", server, "--model", "tiny", "--max-retries", "1"]
    base = [sys.executable, "-m", "radgrounder", "labels", "keywords", str(reports), *llm]
    done = subprocess.run([*base, "--out", str(tmp_path / "a.jsonl")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 3 and "HTTP 401" in done.stderr
    key = tmp_path / "key"
    key.write_text(KEY)
    key.chmod(0o600)
    done = subprocess.run([*base, "--out", str(tmp_path / "b.jsonl"), "--api-key-file", str(key)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 sentences" in done.stdout and "0 failed" in done.stdout


def test_the_judge_gets_valid_scores_and_bounded_failures(server: str) -> None:
    from radgrounder.evaluation.judge import JudgeItem, LLMJudge

    items = [JudgeItem(f"q{i}", "Which organ?", "The liver.", "liver") for i in range(3)]
    # One character per token: the default 512 tokens hold the bounded reason (400) and JSON.
    judge = LLMJudge(server, "tiny", api_key=KEY, max_retries=1)
    results = judge.score(items, progress=False)
    assert [r.status for r in results] == ["ok"] * 3
    assert all(r.score in (1.0, 2.0, 3.0, 4.0, 5.0) for r in results)
    # Unconstrained, the random model writes noise: each item is resampled twice and then
    # reported unparseable, never scored and never retried without end.
    loose = LLMJudge(server, "tiny", api_key=KEY, json_mode="none", max_tokens=32)
    results = loose.score(items[:1], progress=False)
    assert results[0].status == "unparseable" and results[0].attempts == 3
