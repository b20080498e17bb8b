"""Append-only JSON-lines checkpoints: one record per finished item, durable at once."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError


def read_checkpoint(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Latest record per id, and the byte length of the intact part of the file."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    records: dict[str, dict[str, Any]] = {}
    offset = 0
    for n, line in enumerate(lines):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                if n == last:  # a write cut short by a crash
                    return records, offset
                raise RadGrounderError(f"line {n + 1} is not valid JSON", path=path) from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise RadGrounderError(f'line {n + 1} has no string "id"', path=path)
            records[record["id"]] = {**record, "_line": n + 1}
        offset += len(line) + 1
    return records, len(raw)


class CheckpointWriter:
    """Appends one JSON line per finished sentence, durable before the next one is written."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise RadGrounderError(f"cannot open checkpoint: {exc.strerror}", path=path) from None
        self._lock = threading.Lock()
        self._path = path

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                msg = f"cannot write checkpoint: {exc.strerror or exc}"
                raise RadGrounderError(msg, path=self._path) from None

    def close(self) -> None:
        with self._lock:
            self._file.close()
