"""Report tables: one row per (scan, language) with the report text and clinical context."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError

REQUIRED = ("scan_id", "language", "text")
OPTIONAL = ("clinical_info", "clinical_question")
LANGUAGES = ("en", "de")


@dataclass(frozen=True)
class Report:
    scan_id: str
    language: str
    text: str
    clinical_info: str = ""
    clinical_question: str = ""


def _records(path: Path) -> list[dict[str, Any]]:
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:
                return list(csv.DictReader(fh))
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "reports" in data:
                data = data["reports"]
            if not isinstance(data, list):
                raise RadGrounderError("expected a JSON list of report records", path=path)
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise RadGrounderError(f"cannot read report table ({exc})", path=path) from exc
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        if isinstance(exc, RadGrounderError):
            raise
        raise RadGrounderError(f"cannot read report table ({exc})", path=path) from exc
    raise RadGrounderError(
        f"unsupported report table type {suffix!r} (use .csv, .json, .jsonl or .parquet)",
        path=path,
    )


def read_reports(path: str | Path) -> list[Report]:
    """Read reports from CSV, JSON (a list of records), JSONL or Parquet.

    Columns: ``scan_id``, ``language`` (``en`` or ``de``), ``text``, and optionally
    ``clinical_info`` and ``clinical_question``. A (scan_id, language) pair may occur once.
    """
    path = Path(path)
    if not path.is_file():
        raise RadGrounderError("report table not found", path=path)
    reports, seen = [], set()
    for i, rec in enumerate(_records(path), start=1):
        if not isinstance(rec, dict):
            raise RadGrounderError(
                f"record {i}: expected an object, got {type(rec).__name__}", path=path
            )
        missing = [k for k in REQUIRED if not str(rec.get(k) or "").strip()]
        if missing:
            raise RadGrounderError(f"record {i}: missing {', '.join(missing)}", path=path)
        language = str(rec["language"]).strip().lower()
        if language not in LANGUAGES:
            raise RadGrounderError(
                f"record {i}: language {rec['language']!r} is not one of {', '.join(LANGUAGES)}",
                path=path,
            )
        key = (str(rec["scan_id"]).strip(), language)
        if key in seen:
            raise RadGrounderError(
                f"record {i}: second {language} report for scan {key[0]!r}", path=path
            )
        seen.add(key)
        reports.append(
            Report(
                key[0],
                language,
                str(rec["text"]),
                *(str(rec.get(k) or "").strip() for k in OPTIONAL),
            )
        )
    if not reports:
        raise RadGrounderError("report table has no records", path=path)
    return reports
