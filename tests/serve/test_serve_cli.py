"""``radgrounder serve`` options: where the token comes from, what is refused, the limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.serve.app import read_token_file
from radgrounder.serve.limits import MiB, ServeLimits


@pytest.fixture
def captured(monkeypatch) -> dict[str, Any]:
    """``serve``'s arguments instead of a running server."""
    import radgrounder.serve.app as app_module

    calls: dict[str, Any] = {}
    monkeypatch.setattr(app_module, "serve", lambda model, **kw: calls.update(model=model, **kw))
    monkeypatch.delenv("RADGROUNDER_TOKEN", raising=False)
    return calls


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    from radgrounder.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_token_file(tmp_path: Path, captured: dict[str, Any], capsys) -> None:
    path = tmp_path / "token"
    path.write_text("k" * 32 + "\n")
    path.chmod(0o600)
    assert read_token_file(path) == "k" * 32
    code, err = run_cli(["serve", "--model", "m", "--token-file", str(path)], capsys)
    assert code == 0 and err == ""
    assert captured["token"] == "k" * 32
    path.chmod(0o640)
    code, err = run_cli(["serve", "--model", "m", "--token-file", str(path)], capsys)
    assert code == 1 and "readable by others (mode 640); chmod 600" in err
    assert err.count("\n") == 1
    path.chmod(0o600)
    path.write_text("short")
    with pytest.raises(RadGrounderError, match="at least 16 characters"):
        read_token_file(path)
    code, err = run_cli(["serve", "--model", "m", "--token-file", str(tmp_path / "no")], capsys)
    assert code == 1 and "cannot read the token file" in err


def test_token_from_the_environment_or_argv(monkeypatch, captured, capsys) -> None:
    monkeypatch.setenv("RADGROUNDER_TOKEN", "e" * 20)
    code, err = run_cli(["serve", "--model", "m"], capsys)
    assert code == 0 and captured["token"] == "e" * 20 and err == ""
    monkeypatch.delenv("RADGROUNDER_TOKEN")
    monkeypatch.setattr("sys.argv", ["radgrounder", "serve", "--model", "m", "--token", "a" * 20])
    code, err = run_cli(["serve", "--model", "m", "--token", "a" * 20], capsys)
    assert code == 0 and "visible to every user" in err


def test_limits_reach_the_server(captured: dict[str, Any], capsys) -> None:
    code, _ = run_cli(
        [
            "serve",
            "--model",
            "m",
            "--host",
            "0.0.0.0",
            "--insecure-no-token",
            "--allowed-host",
            "ct.example",
            "--allowed-host",
            "10.0.0.5",
            "--max-queue",
            "9",
            "--request-timeout",
            "12",
            "--max-prompt-tokens",
            "100",
            "--study-storage-mb",
            "64",
            "--study-ttl",
            "60",
            "--max-concurrent-uploads",
            "2",
            "--max-connections",
            "50",
            "--max-upload-mb",
            "8",
        ],
        capsys,
    )
    assert code == 0
    limits: ServeLimits = captured["limits"]
    assert (limits.max_queued_items, limits.request_timeout_s, limits.max_prompt_tokens) == (
        9,
        12.0,
        100,
    )
    assert limits.study_storage_bytes == 64 * MiB and limits.study_ttl_s == 60
    assert (limits.max_concurrent_uploads, limits.max_connections) == (2, 50)
    assert limits.max_upload_bytes == 8 * MiB
    assert captured["allowed_hosts"] == ["ct.example", "10.0.0.5"]
    assert captured["insecure_no_token"] is True
    code, err = run_cli(["serve", "--model", "m", "--max-queue", "0"], capsys)
    assert code == 1 and "max_queued_items: must be positive" in err


def test_defaults_are_the_documented_ones() -> None:
    """docs/serving.md lists every limit with its default; keep them in step."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    limits = ServeLimits()
    from dataclasses import fields

    for f in fields(limits):
        assert f"`{f.name}`" in doc, f"docs/serving.md does not list {f.name}"
    for row in doc.splitlines():
        if row.startswith("| `") and "` |" in row:
            name = row.split("`")[1]
            if hasattr(limits, name):
                value = getattr(limits, name)
                shown = row.split("|")[2].strip()
                assert shown == _shown(name, value), (name, shown)


def _shown(name: str, value: Any) -> str:
    if name.endswith("_bytes"):
        return f"{value // MiB} MiB"
    if name.endswith("_s"):
        return f"{value:g} s"
    if name == "max_voxels":
        return "2^29"
    return str(value)


def test_serve_option_defaults_are_the_limits_defaults() -> None:
    """The CLI cannot import the (FastAPI) serve package at start-up, so its defaults are
    literals: keep them equal to ``ServeLimits()``."""
    import typer

    from radgrounder.cli import app

    params = {p.name: p.default for p in typer.main.get_command(app).commands["serve"].params}
    limits = ServeLimits()
    assert params["max_upload_mb"] * MiB == limits.max_upload_bytes
    assert params["max_prompt_tokens"] == limits.max_prompt_tokens
    assert params["max_queue"] == limits.max_queued_items
    assert params["request_timeout"] == limits.request_timeout_s
    assert params["max_concurrent_uploads"] == limits.max_concurrent_uploads
    assert params["study_storage_mb"] * MiB == limits.study_storage_bytes
    assert params["study_ttl"] == limits.study_ttl_s
    assert params["max_connections"] == limits.max_connections
    predict = {p.name: p.default for p in typer.main.get_command(app).commands["predict"].params}
    from radgrounder.inference.predictor import DEFAULT_MAX_PROMPT_TOKENS

    assert predict["max_prompt_tokens"] == DEFAULT_MAX_PROMPT_TOKENS == limits.max_prompt_tokens
