"""``radgrounder eval``: generate for every item of a dataset split, score, and write
``samples.parquet``/``samples.csv``, ``summary.json`` and ``report.html`` into one folder.

Generation results go to ``generations.jsonl`` one sample at a time (fsynced), so an
interrupted run resumes where it stopped; judge scores go to ``judge.jsonl`` the same way.
Everything else is recomputed from those two files at the end of every run.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.datasets import EvalDataset
from radgrounder.evaluation.generation_pass import generate_records
from radgrounder.evaluation.parsing import plain_text
from radgrounder.evaluation.scoring import (
    GROUNDING_METRICS,
    NAN,
    TEXT_METRICS,
    corpus_bleu,
    detection_map,
    summarize_metrics,
    text_scores,
)
from radgrounder.fileio import atomic_write_bytes, atomic_write_json, sha256_tree
from radgrounder.labels.checkpoint import CheckpointWriter, read_checkpoint

FORMAT = "radgrounder-eval/1"
STRING_COLUMNS = (
    "id", "dataset", "split", "task", "language", "question_type", "prompt", "raw_prediction",
    "prediction", "raw_reference", "reference", "image_ref", "error", "llm_judge_status",
    "llm_judge_reason", "pred_spans", "ref_spans", "class_ious",
)  # fmt: skip


class DifferentRunError(RadGrounderError):
    """The output folder holds an evaluation of another model, dataset or settings."""


@dataclass
class EvalOptions:
    """Settings of one evaluation run (the CLI flags of ``radgrounder eval``)."""

    batch_size: int = 8
    max_new_tokens: int = 200
    mask_threshold: str | None = None
    compat: str = "none"
    # None: the checkpoint's (training) setting; compat "reference" turns attention's off,
    # as the reference's sdpa evaluation did (radgrounder.modeling.softcap).
    final_logit_softcap: bool | None = None
    attention_softcap: bool | None = None
    matcher: str = "lexical"  # exact | lexical | a local sentence-encoder folder
    embedding_model: str | None = None
    meteor: bool | None = None  # None: when WordNet data is installed
    n_resamples: int = 10_000
    seed: int = 0
    n_examples: int = 8
    limit: int | None = None
    progress: bool = True
    judge: Any = field(default=None, repr=False)  # an LLMJudge


@dataclass
class EvalRun:
    out: Path
    summary: dict[str, Any]
    n: int
    failures: list[dict[str, str]]


def _identity(loaded: Any, dataset: EvalDataset, opts: EvalOptions) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": {
            "path": str(loaded.path),
            "sha256": sha256_tree(loaded.path),
            "variant": loaded.variant,
        },
        "dataset": {
            "name": dataset.name,
            "split": dataset.split,
            "file_split": dataset.file_split,
            "root": str(dataset.root),
            "sha256": dataset.fingerprint(),
        },
        "generation": {
            "batch_size": opts.batch_size,
            "max_new_tokens": opts.max_new_tokens,
            "greedy": True,
            "mask_threshold": opts.mask_threshold
            or loaded.config.radgrounder.get("mask_threshold", "probability"),
            "preset": dataset.source.preset,
            "prefix_style": dataset.prefix_style,
            "limit": opts.limit,
            "final_logit_softcap": bool(loaded.config.radgrounder.get("final_logit_softcap")),
            "attention_softcap": bool(loaded.config.radgrounder.get("attention_softcap", True)),
        },
        "compat": opts.compat,
        "matcher": opts.matcher,
    }


def _check_out(out: Path, identity: dict[str, Any]) -> None:
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        same = {k: v for k, v in identity.items() if k != "generation"}
        old_same = {k: v for k, v in old.items() if k != "generation"}
        gen = {k: v for k, v in identity["generation"].items() if k != "batch_size"}
        old_gen = {k: v for k, v in old.get("generation", {}).items() if k != "batch_size"}
        if same != old_same or gen != old_gen:
            diff = sorted(k for k in identity if identity.get(k) != old.get(k))
            raise DifferentRunError(
                f"the folder holds a different evaluation ({', '.join(diff)} differ); "
                "use another --out or delete it",
                path=out,
            )
    atomic_write_json(path, identity)


def _judge(judge: Any, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    from radgrounder.evaluation.judge import JudgeItem, JudgeResult, summarize

    path = out / "judge.jsonl"
    done = read_checkpoint(path)[0] if path.is_file() else {}
    model = getattr(judge, "model", None)
    # A score by another judge model, or a failed item, is judged again by this one.
    done = {k: d for k, d in done.items() if d.get("model") == model and d.get("status") == "ok"}
    todo = [
        JudgeItem(
            r["id"],
            r["prompt"].removeprefix("<image>\n").strip(),
            r["prediction"],
            r["reference"],
            "vqa" if r["task"] in ("vqa", "grounded-vqa") else "report",
        )
        for r in rows
        if r["id"] not in done
    ]
    writer = CheckpointWriter(path)
    try:
        concurrency = judge.resolve_concurrency() if hasattr(judge, "resolve_concurrency") else 8
        step = max(1, 4 * concurrency)
        for start in range(0, len(todo), step):
            for res in judge.score(todo[start : start + step], progress=False):
                record = {**asdict(res), "model": model}
                writer.write(record)
                done[res.id] = record
    finally:
        writer.close()
    results = []
    for r in rows:
        d = done[r["id"]]
        r["llm_score"] = NAN if d.get("score") is None else float(d["score"])
        r["llm_judge_status"], r["llm_judge_reason"] = d.get("status"), d.get("reason")
        results.append(JudgeResult(**{k: d[k] for k in JudgeResult.__dataclass_fields__}))
    return {
        "url": getattr(judge, "url", None),
        "model": model,
        "concurrency": getattr(judge, "concurrency", None),
        "concurrency_source": getattr(judge, "concurrency_source", None),
        **summarize(results),
    }


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from radgrounder import __version__

    return {
        "radgrounder": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _rows(
    dataset: EvalDataset, records: dict[str, dict[str, Any]], variant: str, opts: EvalOptions
):
    rows, failures = [], []
    for item in dataset.items[: opts.limit]:
        rec = records[item.id]
        if "error" in rec:
            failures.append({"id": item.id, "error": rec["error"]})
            continue
        g = rec.get("grounding") or {}
        row = {
            "id": item.id,
            "dataset": dataset.name,
            "split": dataset.split,
            "task": rec["task"],
            "language": rec["language"],
            "question_type": rec["question_type"],
            "prompt": rec["prompt"],
            "raw_prediction": rec["raw_prediction"],
            "prediction": plain_text(rec["raw_prediction"], variant).strip(),
            "raw_reference": rec["raw_reference"],
            "reference": plain_text(rec["raw_reference"], variant).strip(),
            "image_ref": rec["image_ref"],
            "error": None,
            "pred_spans": json.dumps(rec.get("pred_spans"), ensure_ascii=False)
            if "pred_spans" in rec
            else None,
            "ref_spans": json.dumps(rec.get("ref_spans"), ensure_ascii=False)
            if "ref_spans" in rec
            else None,
            "class_ious": json.dumps(rec.get("class_ious", []), ensure_ascii=False),
            "seconds": float(rec.get("seconds", NAN)),
        }
        for m in GROUNDING_METRICS:
            value = g.get(m)
            row[m] = NAN if value is None else float(value)
        rows.append(row)
    return rows, failures


def _text_metrics(rows: list[dict[str, Any]], dataset: EvalDataset, opts: EvalOptions) -> list[str]:
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    if opts.compat == "reference" and dataset.name == "slake":
        groups = [r["question_type"] for r in rows]  # the reference ran each subset apart
    else:
        groups = [(r["task"], r["language"]) for r in rows]
    metrics = list(TEXT_METRICS)
    for name, values in text_scores(preds, refs, groups).items():
        for r, v in zip(rows, values, strict=True):
            r[name] = v
    use_meteor = opts.meteor
    if use_meteor is None:
        from radgrounder.evaluation.metrics_meteor import meteor_available

        use_meteor = meteor_available()
    if use_meteor:
        from radgrounder.evaluation.metrics_meteor import meteor

        for r in rows:
            r["meteor"] = meteor(r["prediction"], r["reference"])
        metrics.append("meteor")
    if opts.embedding_model:
        from radgrounder.evaluation.embedding import SentenceEncoder, embedding_similarity

        values = embedding_similarity(preds, refs, SentenceEncoder(opts.embedding_model))
        for r, v in zip(rows, values, strict=True):
            r["embedding_similarity"] = v
        metrics.append("embedding_similarity")
    return metrics


def _write_samples(out: Path, rows: list[dict[str, Any]], metrics: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fields = [pa.field(c, pa.string()) for c in STRING_COLUMNS]
    fields += [pa.field(m, pa.float64()) for m in [*metrics, "seconds"]]
    schema = pa.schema(fields)
    table = pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in fields} for r in rows], schema=schema
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(out / "samples.parquet", buf.getvalue())
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    atomic_write_bytes(out / "samples.csv", buf.getvalue())


def evaluate(
    model: str | Path | Any,
    dataset: EvalDataset,
    out: str | Path,
    options: EvalOptions | None = None,
) -> EvalRun:
    """Evaluate ``model`` (a checkpoint folder/hub id or a loaded model) on ``dataset`` and
    write the run folder ``out``; resumes a run the folder already holds."""
    from radgrounder.modeling import load_model
    from radgrounder.modeling.generation import flush_denormals

    opts = options or EvalOptions()
    if opts.compat == "reference" and opts.mask_threshold is None:
        opts = replace(opts, mask_threshold="logit")  # the reference's evaluation threshold
    if opts.compat == "reference" and opts.attention_softcap is None:
        opts = replace(opts, attention_softcap=False)  # the reference evaluated with sdpa
    if opts.batch_size < 1 or opts.max_new_tokens < 1:
        raise RadGrounderError("batch_size and max_new_tokens must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    softcaps = {
        "final_logit_softcap": opts.final_logit_softcap,
        "attention_softcap": opts.attention_softcap,
    }
    if hasattr(model, "tokenizer"):
        loaded = model
        if any(v is not None for v in softcaps.values()):
            from radgrounder.modeling.softcap import set_softcaps

            set_softcaps(loaded.model, **softcaps)
    else:
        loaded = load_model(model, **softcaps)
    if dataset.name in ("built", "refrad2d") and dataset.source.variant != loaded.variant:
        raise RadGrounderError(
            f"the dataset was opened for the {dataset.source.variant} model, "
            f"the model is {loaded.variant}"
        )
    identity = _identity(loaded, dataset, opts)
    _check_out(out, identity)
    items = dataset.items[: opts.limit]
    path = out / "generations.jsonl"
    records: dict[str, dict[str, Any]] = {}
    if path.is_file():
        records, intact = read_checkpoint(path)
        if intact < path.stat().st_size:  # a line cut short by a crash: drop it
            os.truncate(path, intact)
    todo = [it for it in items if it.id not in records or "error" in records[it.id]]
    n_shown = sum(1 for r in records.values() if "example" in r)
    if todo:
        with flush_denormals():
            generate_records(loaded, dataset, todo, out, opts, n_shown)
        records = read_checkpoint(path)[0]

    rows, failures = _rows(dataset, records, loaded.variant, opts)
    metrics = _text_metrics(rows, dataset, opts) if rows else list(TEXT_METRICS)
    judge_summary = None
    if opts.judge is not None and rows:
        judge_summary = _judge(opts.judge, rows, out)
        metrics.append("llm_score")
    present = [m for m in GROUNDING_METRICS if any(math.isfinite(r.get(m, NAN)) for r in rows)]
    metrics += present
    examples = [
        {"id": i.id, "file": records[i.id]["example"], "caption": records[i.id]["raw_prediction"]}
        for i in items
        if "example" in records.get(i.id, {})
    ]
    if examples:
        atomic_write_json(out / "examples" / "index.json", examples)
    summary = {
        **identity,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {**identity["dataset"], "n": len(rows), "n_items": len(items),
                    "n_failed": len(failures)},
        "versions": _versions(),
        "bootstrap": {"n_resamples": opts.n_resamples, "seed": opts.seed, "alpha": 0.05,
                      "method": "percentile"},
        "metrics": summarize_metrics(rows, metrics, n_resamples=opts.n_resamples,
                                     seed=opts.seed) if rows else {},
        "corpus": corpus_bleu(rows) if rows else {},
        "map50": detection_map(
            [records[r["id"]] for r in rows if "ref_spans" in records[r["id"]]]
        ) if loaded.variant == "detection" else None,
        "judge": judge_summary,
        "failures": failures,
    }  # fmt: skip
    _write_samples(out, rows, metrics)
    atomic_write_json(out / "summary.json", summary)
    from radgrounder.evaluation.report import write_report

    write_report(out)
    return EvalRun(out, summary, len(rows), failures)
