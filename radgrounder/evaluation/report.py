"""A self-contained ``report.html`` for one evaluation run folder.

The run folder holds ``samples.parquet`` (one row per sample), ``summary.json`` (means with
bootstrap CIs per subset, corpus BLEU, mAP@50, judge counts, failures) and optionally
``examples/index.json`` with drawn slices. The report is one HTML file with inline CSS and
base64-embedded PNGs: no JavaScript and no external URLs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_bytes

# Non-metric columns of samples.parquet; every other float column is a metric.
STRING_COLUMNS = frozenset(
    "id dataset split task language question_type prompt raw_prediction prediction "  # noqa: SIM905
    "raw_reference reference image_ref error llm_judge_status llm_judge_reason pred_spans "
    "ref_spans class_ious".split()
)
N_FIRST = 20
N_LOWEST = 10
MAX_TEXT = 300

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.notice{background:#fff3cd;border:1px solid #e0b400;padding:.6em 1em;margin:1em 0}
.grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}
figcaption{font-size:.85em;color:#555;max-width:480px}
td.text{max-width:320px;white-space:pre-wrap;word-break:break-word;font-size:.85em}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    """A finite float, or None for null, NaN, infinities and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    """3 decimals (CIDEr and LLM scores exceed 1, so no percentages); a dash for no value."""
    number = _num(value)
    return "–" if number is None else f"{number:.3f}"


def _count(value: Any) -> str:
    """A count as an integer (JSON writers may emit ``735.0``)."""
    number = _num(value)
    return "–" if number is None else str(round(number))


def _trunc(text: Any, limit: int = MAX_TEXT) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(headers: list[str], rows: list[list[tuple[str, str]]], cls: str = "") -> str:
    """A table from already-escaped cells; each cell is ``(html, css_class)``."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{c}">{cell}</td>' if c else f"<td>{cell}</td>" for cell, c in r)
        + "</tr>"
        for r in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    return _table(["", ""], [[(_esc(k), ""), (_esc(v), "")] for k, v in pairs])


def _img(data: bytes, alt: str) -> str:
    """An ``<img>`` with the picture inline; JPEG is recognised, anything else is PNG."""
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:{mime};base64,{b64}" alt="{_esc(alt)}">'


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def _new_figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas: no pyplot, so no global figure registry or backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _histogram(name: str, values: list[float]) -> bytes:
    fig = _new_figure(3.2, 2.2)
    ax = fig.add_subplot()
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9 * max(1.0, abs(hi)):  # one value, up to rounding: a single bar
        bins, span = 1, (lo - 0.5, hi + 0.5)
    else:
        bins, span = max(1, min(20, len(set(values)))), (lo, hi)
    ax.hist(values, bins=bins, range=span, color="#4878a8", edgecolor="white")
    ax.set_title(f"{name} (n={len(values)})", fontsize=9)
    ax.tick_params(labelsize=7)
    return _figure_png(fig)


def _barh(title: str, labels: list[str], values: list[float], xlabel: str) -> bytes:
    fig = _new_figure(6.0, 1.0 + 0.28 * len(labels))
    ax = fig.add_subplot()
    ax.barh(range(len(values)), values, color="#4878a8")
    ax.set_yticks(range(len(labels)), labels)
    ax.tick_params(labelsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, *values))
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    return _figure_png(fig)


# ---------------------------------------------------------------------------- loading


def _load(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    summary_path, samples_path = run_dir / "summary.json", run_dir / "samples.parquet"
    for path in (summary_path, samples_path):
        if not path.is_file():
            raise RadGrounderError(f"missing {path.name} in the run folder", path=path)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RadGrounderError(
            f"summary.json is not valid JSON ({exc})", path=summary_path
        ) from exc
    if not isinstance(summary, dict):
        raise RadGrounderError("summary.json must hold a JSON object", path=summary_path)

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(samples_path)
    except (pa.ArrowException, OSError) as exc:
        raise RadGrounderError(f"cannot read samples.parquet ({exc})", path=samples_path) from exc
    metrics = [
        f.name
        for f in table.schema
        if pa.types.is_floating(f.type) and f.name not in STRING_COLUMNS
    ]
    return summary, table.to_pylist(), metrics


def _class_ious(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per class name, the IoUs of matched keyword pairs over all samples."""
    per_class: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        raw = row.get("class_ious")
        if not raw:
            continue
        try:
            items = json.loads(raw)
        except (json.JSONDecodeError, TypeError):
            continue
        for item in items if isinstance(items, list) else []:
            iou = _num(item.get("iou")) if isinstance(item, dict) else None
            if iou is not None and item.get("class") is not None:
                per_class[str(item["class"])].append(iou)
    return per_class


# ---------------------------------------------------------------------------- sections


def _header(summary: dict[str, Any]) -> str:
    ds, model = summary.get("dataset") or {}, summary.get("model") or {}
    sha = str(model.get("sha256") or "")[:12]
    versions = ", ".join(f"{k} {v}" for k, v in (summary.get("versions") or {}).items())
    gen = ", ".join(f"{k}={v}" for k, v in (summary.get("generation") or {}).items())
    boot = summary.get("bootstrap") or {}
    pairs = [
        ("Dataset", f"{ds.get('name', '?')} / {ds.get('split', '?')}"),
        ("Samples", f"{ds.get('n', '?')} ({ds.get('n_failed', 0)} failed)"),
        ("Dataset root", ds.get("root", "")),
        ("Model", f"{model.get('path', '?')} (variant {model.get('variant', '?')}, {sha})"),
        ("Created", summary.get("created", "")),
        ("Versions", versions),
        ("Generation", gen),
        ("Compat", summary.get("compat", "")),
        ("Bootstrap", ", ".join(f"{k}={v}" for k, v in boot.items())),
        ("Format", summary.get("format", "")),
    ]
    return _kv_table(pairs)


def _failures(summary: dict[str, Any]) -> str:
    failures = summary.get("failures") or []
    n_failed = (summary.get("dataset") or {}).get("n_failed") or len(failures)
    if not n_failed and not failures:
        return ""
    rows = [
        [(_esc(f.get("id")), ""), (_esc(_trunc(f.get("error"))), "")]
        for f in failures
        if isinstance(f, dict)
    ]
    return (
        f'<div class="notice"><strong>{_esc(n_failed)} sample(s) failed</strong> and have no '
        f"metrics; they are left out of every mean below.{_table(['id', 'error'], rows)}</div>"
    )


def _metric_tables(summary: dict[str, Any]) -> str:
    alpha = _num((summary.get("bootstrap") or {}).get("alpha"))
    level = f"{100 * (1 - (alpha if alpha is not None else 0.05)):g}% CI"
    subsets = summary.get("metrics") or {}
    order = sorted(subsets, key=lambda s: s != "all")  # "all" first, then file order
    parts = ["<h2>Metrics</h2>"]
    for subset in order:
        rows = [
            [
                (_esc(name), ""),
                (_fmt(m.get("mean")), "num"),
                (f"[{_fmt(m.get('low'))}, {_fmt(m.get('high'))}]", "num"),
                (_count(m.get("n")), "num"),
            ]
            for name, m in (subsets[subset] or {}).items()
            if isinstance(m, dict)
        ]
        parts.append(f"<h3>Subset: {_esc(subset)}</h3>")
        parts.append(_table(["metric", "mean", level, "n"], rows, "metrics"))
    corpus = summary.get("corpus") or {}
    if corpus:
        # {subset: {metric: value}} as the runner writes it; a flat {metric: value} also works
        nested = {k: v for k, v in corpus.items() if isinstance(v, dict)}
        flat = {k: v for k, v in corpus.items() if not isinstance(v, dict)}
        rows = [[(_esc(k), ""), ("", ""), (_fmt(v), "num")] for k, v in flat.items()]
        rows += [
            [(_esc(metric), ""), (_esc(subset), ""), (_fmt(v), "num")]
            for subset, values in nested.items()
            for metric, v in values.items()
        ]
        parts.append("<h3>Corpus-level</h3>")
        parts.append(_table(["metric", "subset", "value"], rows))
    m50 = summary.get("map50")
    if isinstance(m50, dict) and m50.get("map50") is not None:
        parts.append("<h3>Detection</h3>")
        parts.append(_table(["metric", "value"], [[("mAP@50", ""), (_fmt(m50["map50"]), "num")]]))
    judge = summary.get("judge")
    if isinstance(judge, dict):
        counts = ("n", "ok", "unparseable", "error")
        keys = ["model", "url", *counts, "mean_score", "mean_normalized"]
        rows = []
        for k in keys:
            if (v := judge.get(k)) is None:
                continue
            number = (_count if k in counts else _fmt)(v)
            rows.append([(_esc(k), ""), (_esc(v), "") if isinstance(v, str) else (number, "num")])
        parts.append("<h3>LLM judge</h3>" + _table(["field", "value"], rows))
    return "".join(parts)


def _distributions(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    figures = []
    for name in metrics:
        values = [v for v in (_num(r.get(name)) for r in rows) if v is not None]
        if values:
            png = _histogram(name, values)
            figures.append(f"<figure>{_img(png, f'histogram of {name}')}</figure>")
    if not figures:
        return ""
    return '<h2>Metric distributions</h2><div class="grid">' + "".join(figures) + "</div>"


def _grounding(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    per_class = _class_ious(rows)
    m50 = summary.get("map50")
    ap = (m50.get("ap_per_class") or {}) if isinstance(m50, dict) else {}
    if not per_class and not ap:
        return ""
    means = {c: sum(v) / len(v) for c, v in per_class.items()}
    ordered = sorted(means, key=lambda c: (-means[c], c))
    ordered += sorted(c for c in ap if c not in means)
    parts = ['<h2 id="per-class">Per-class grounding</h2><div class="grid">']
    if means:
        labels = [f"{c} (n={len(per_class[c])})" for c in ordered if c in means]
        png = _barh("mean IoU per class", labels, [means[c] for c in ordered if c in means], "IoU")
        parts.append(f"<figure>{_img(png, 'mean IoU per class')}</figure>")
    if ap:
        ap_order = sorted(ap, key=lambda c: (-(_num(ap[c]) or 0.0), c))
        png = _barh("AP@50 per class", ap_order, [_num(ap[c]) or 0.0 for c in ap_order], "AP@50")
        parts.append(f"<figure>{_img(png, 'AP@50 per class')}</figure>")
    table_rows = [
        [
            (_esc(c), ""),
            (_fmt(means.get(c)), "num"),
            (str(len(per_class.get(c, []))), "num"),
            (_fmt(ap.get(c)), "num"),
        ]
        for c in ordered
    ]
    parts.append("</div>" + _table(["class", "mean IoU", "n", "AP@50"], table_rows, "per-class"))
    return "".join(parts)


def _examples(run_dir: Path) -> str:
    index_path = run_dir / "examples" / "index.json"
    if not index_path.is_file():
        return ""
    try:
        entries = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RadGrounderError(f"not valid JSON ({exc})", path=index_path) from exc
    root = run_dir.resolve()
    figures = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not entry.get("file"):
            continue
        path = (run_dir / str(entry["file"])).resolve()
        caption = f"{entry.get('id', '')}: {entry.get('caption', '')}"
        if not path.is_relative_to(root) or not path.is_file():
            figures.append(
                f"<figure><figcaption>{_esc(caption)} (image missing: "
                f"{_esc(entry['file'])})</figcaption></figure>"
            )
            continue
        img = _img(path.read_bytes(), caption)
        figures.append(f"<figure>{img}<figcaption>{_esc(caption)}</figcaption></figure>")
    if not figures:
        return ""
    return '<h2>Example images</h2><div class="grid">' + "".join(figures) + "</div>"


def _sample_table(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    cols = [m for m in ("f1", "accuracy", "grounding_iou", "llm_score") if m in metrics]
    headers = ["id", "task", "prompt", "prediction", "reference", *cols, "error"]
    body = []
    for r in rows:
        text = [(_esc(_trunc(r.get(k))), "text") for k in ("prompt", "prediction", "reference")]
        body.append(
            [(_esc(r.get("id")), ""), (_esc(r.get("task")), ""), *text]
            + [(_fmt(r.get(m)), "num") for m in cols]
            + [(_esc(_trunc(r.get("error") or "", 160)), "text")]
        )
    return _table(headers, body, "samples")


def _samples(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    if not rows:
        return ""
    parts = [f"<h2>Samples</h2><h3>First {min(N_FIRST, len(rows))} samples</h3>"]
    parts.append(_sample_table(rows[:N_FIRST], metrics))
    scored = [r for r in rows if _num(r.get("f1")) is not None]
    if scored:
        lowest = sorted(scored, key=lambda r: _num(r["f1"]))[:N_LOWEST]
        parts.append(f"<h3>{len(lowest)} lowest-F1 samples</h3>")
        parts.append(_sample_table(lowest, metrics))
    return "".join(parts)


# ---------------------------------------------------------------------------- entry point


def write_report(
    run_dir: str | Path, *, out: str | Path | None = None, title: str | None = None
) -> Path:
    """Write a self-contained HTML report for the evaluation run in ``run_dir``.

    Reads ``summary.json``, ``samples.parquet`` and (if present) ``examples/index.json`` and
    writes ``out`` (default ``run_dir/report.html``) atomically. Returns the written path.
    Raises :class:`RadGrounderError` naming the file when a required file is missing or
    unreadable.
    """
    run_dir = Path(run_dir)
    summary, rows, metrics = _load(run_dir)
    out_path = Path(out) if out is not None else run_dir / "report.html"
    if title is None:
        ds, model = summary.get("dataset") or {}, summary.get("model") or {}
        title = (
            f"Evaluation: {ds.get('name', '?')} / {ds.get('split', '?')} — "
            f"{model.get('variant') or model.get('path') or '?'}"
        )
    body = "".join(
        [
            f"<h1>{_esc(title)}</h1>",
            _header(summary),
            _failures(summary),
            _metric_tables(summary),
            _distributions(rows, metrics),
            _grounding(rows, summary),
            _examples(run_dir),
            _samples(rows, metrics),
        ]
    )
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    atomic_write_bytes(out_path, doc.encode("utf-8"))
    return out_path
