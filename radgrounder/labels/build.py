"""``radgrounder labels build``: scans + label maps + reports → a grounded dataset folder."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import radgrounder
from radgrounder.errors import RadGrounderError
from radgrounder.executor import check_executor, run_tasks
from radgrounder.fileio import atomic_write_json, sha256_tree
from radgrounder.imaging.nifti import is_nifti_path
from radgrounder.labels.dataset import SPLITS
from radgrounder.labels.keywords import extract_keywords, sentence_items
from radgrounder.labels.names import is_utf8, printable
from radgrounder.labels.regions import SLICE_AXES
from radgrounder.labels.reports import Report, read_reports
from radgrounder.labels.scanjob import ScanJob, ScanResult, build_scan


@dataclass
class BuildOptions:
    modality: str | None = None
    label_task: str | None = None
    slice_axis: str = "axial"
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    instances: bool = False
    min_area: int = 0
    text_mode: str = "reference"
    vqa: bool = True
    languages: tuple[str, ...] = ("en", "de")
    keyword_backend: str = "lexicon"
    llm: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    executor: str = "local"
    # scan id -> SeriesInstanceUID, for scan folders that hold several series (otherwise the
    # series on the label map's grid is used)
    series: dict[str, str] = field(default_factory=dict)

    def fingerprint_config(self) -> dict[str, Any]:
        """The options that change the output (not how it is computed)."""
        return {
            "modality": self.modality,
            "label_task": self.label_task,
            "slice_axis": self.slice_axis,
            "splits": list(self.splits),
            "seed": self.seed,
            "instances": self.instances,
            "min_area": self.min_area,
            "text_mode": self.text_mode,
            "vqa": self.vqa,
            "languages": list(self.languages),
            "keyword_backend": self.keyword_backend,
            "llm_model": self.llm.get("model") if self.keyword_backend == "llm" else None,
        }


@dataclass
class BuildReport:
    out_dir: Path
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]
    manifest: dict[str, Any]
    warnings: dict[str, list[str]] = field(default_factory=dict)  # scan id -> notes on its input
    # sentence id -> why keyword extraction failed (LLM backend): its mentions are missing
    failed_sentences: dict[str, str] = field(default_factory=dict)


def _scan_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _non_utf8_member(path: Path) -> Path | None:
    """The first file or folder under the folder ``path`` whose name is not valid UTF-8."""
    if not path.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            if not is_utf8(name):
                return Path(dirpath) / name
    return None


def discover_scans(scans_dir: Path, problems: dict[str, str] | None = None) -> dict[str, Path]:
    """``<scan_id>.nii[.gz]`` files and ``<scan_id>/`` DICOM folders directly in ``scans_dir``.

    A scan that cannot be built under its name (two inputs share an id, or the name is not
    valid UTF-8) raises; with ``problems`` it is left out and its reason stored there
    (keyed by the printable id), so one bad name does not stop a batch.
    """
    if not scans_dir.is_dir():
        raise RadGrounderError("scan folder not found", path=scans_dir)
    found: dict[str, Path] = {}
    bad: dict[str, str] = {}
    for p in sorted(scans_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or is_nifti_path(p):
            sid = _scan_id(p)
            if not is_utf8(sid):
                bad[printable(sid)] = str(
                    RadGrounderError(
                        "the file name is not valid UTF-8; rename it", path=printable(str(p))
                    )
                )
            elif sid in found or sid in bad:
                bad[sid] = str(
                    RadGrounderError(
                        f"two scans share the id {sid!r} ({found.pop(sid, scans_dir / sid).name}"
                        f" and {p.name}); rename one",
                        path=scans_dir,
                    )
                )
            else:
                found[sid] = p
    if bad and problems is None:
        raise RadGrounderError(next(iter(bad.values())))
    if problems is not None:
        problems.update(bad)
    return found


def assign_splits(scan_ids: Iterable[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Whole scans to train/val/test, seeded: the same ids and seed give the same split."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1):
        raise RadGrounderError(f"splits: need three fractions summing to 1, got {fractions}")
    ids = sorted(scan_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = round(fractions[0] * len(ids))
    n_val = round(fractions[1] * len(ids))
    if len(ids) >= 3 and n_train == len(ids) and fractions[1] + fractions[2] > 0:
        n_train -= 1  # keep a held-out scan when there are enough scans
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def build_dataset(
    scans_dir: str | Path,
    labels_dir: str | Path,
    reports: str | Path | Sequence[Report],
    out_dir: str | Path,
    options: BuildOptions | None = None,
    *,
    progress: bool = True,
) -> BuildReport:
    """Build (or resume) a grounded dataset. Failures are collected, never fatal."""
    from rich.progress import Progress

    opts = options or BuildOptions()
    if opts.slice_axis not in SLICE_AXES:
        raise RadGrounderError(f"slice_axis: unknown value {opts.slice_axis!r}")
    check_executor(opts.executor, opts.workers)
    # Absolute on the driver: a worker (a Ray node, a pool process) may run in another folder.
    scans_dir, labels_dir = Path(scans_dir).absolute(), Path(labels_dir).absolute()
    out = Path(out_dir).absolute()
    if not labels_dir.is_dir():
        raise RadGrounderError("label folder not found", path=labels_dir)
    report_list = list(reports) if not isinstance(reports, str | Path) else read_reports(reports)
    failed: dict[str, str] = {}
    scans = discover_scans(scans_dir, failed)
    unknown = sorted(set(opts.series) - set(scans))
    if unknown:
        raise RadGrounderError(
            f"series: no scan {unknown[0]!r} in the scan folder (series are chosen per scan id)",
            path=scans_dir,
        )
    labels: dict[str, Path] = {}
    for sid in scans:
        cands = [labels_dir / f"{sid}.nii.gz", labels_dir / f"{sid}.nii"]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            failed[sid] = f"no label map {sid}.nii.gz in {labels_dir}"
        else:
            labels[sid] = hit
    by_scan: dict[str, dict[str, Report]] = {}
    for rep in report_list:
        by_scan.setdefault(rep.scan_id, {})[rep.language] = rep
    # Reports for scans outside this folder are normal when building a subset: noted only.
    unmatched = sorted(sid for sid in by_scan if sid not in scans)

    usable = [sid for sid in scans if sid in labels]
    wanted = [r for r in report_list if r.scan_id in labels]
    items = sentence_items(wanted, text_mode=opts.text_mode)
    results = extract_keywords(
        items,
        backend=opts.keyword_backend,
        checkpoint=out / "state" / "keywords_llm.jsonl" if opts.keyword_backend == "llm" else None,
        progress=progress,
        **opts.llm,
    )
    sentence_failures = {r.id: r.error for r in results if r.error}
    per_report: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        sid, lang, _ = r.id.rsplit("/", 2)
        per_report.setdefault((sid, lang), []).append({"text": r.text, "mentions": r.mentions})

    splits = assign_splits(usable, opts.splits, opts.seed)
    config = opts.fingerprint_config()
    jobs = []
    for sid in usable:
        member = _non_utf8_member(scans[sid])
        if member is not None:
            failed[sid] = str(
                RadGrounderError(
                    "a file name in the series is not valid UTF-8; rename it",
                    path=printable(str(member)),
                )
            )
            continue
        try:
            fp_inputs = (sha256_tree(scans[sid]), sha256_tree(labels[sid]))
        except Exception as exc:  # an unreadable file: this scan fails alone
            failed[sid] = printable(
                str(RadGrounderError(f"cannot read ({type(exc).__name__}: {exc})", path=scans[sid]))
            )
            continue
        reps = {
            lang: {
                "clinical_info": rep.clinical_info,
                "clinical_question": rep.clinical_question,
                "sentences": per_report.get((sid, lang), []),
            }
            for lang, rep in by_scan.get(sid, {}).items()
        }
        fp = _fingerprint(
            *fp_inputs,
            splits[sid],
            config,
            {
                lang: {
                    "sentences": [
                        (s["text"], [m.to_dict() for m in s["mentions"]]) for s in v["sentences"]
                    ],
                    "clinical_info": v["clinical_info"],
                    "clinical_question": v["clinical_question"],
                }
                for lang, v in reps.items()
            },
            radgrounder.__version__,
            opts.series.get(sid),
        )
        jobs.append(
            ScanJob(
                sid,
                str(scans[sid]),
                str(labels[sid]),
                splits[sid],
                str(out),
                reps,
                {**config, "slice_axis": opts.slice_axis},
                fp,
                opts.languages,
                opts.series.get(sid),
            )
        )

    done, skipped = [], []
    per_scan: dict[str, dict[str, Any]] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("building scans", total=len(jobs))

        def on_done(res: ScanResult) -> None:
            if res.ok:
                (skipped if res.skipped else done).append(res.scan_id)
                per_scan[res.scan_id] = res.counts
            else:
                failed[res.scan_id] = printable(res.error or "unknown error")
            bar.advance(task)

        def on_lost(job: ScanJob, reason: str) -> None:
            on_done(ScanResult(job.scan_id, False, error=reason))

        # A job whose worker dies (kill -9, out of memory, a task Ray gave up on) is retried
        # once, then reported as failed: never an abort.
        run_tasks(build_scan, jobs, executor=opts.executor, workers=opts.workers,
                  on_done=on_done, on_lost=on_lost)  # fmt: skip

    manifest = _manifest(jobs, per_scan, splits, scans, labels, config, sentence_failures)
    manifest["n_sentences"] = len(items)
    notes = {sid: c["warnings"] for sid, c in sorted(per_scan.items()) if c.get("warnings")}
    atomic_write_json(out / "manifest.json", manifest)
    atomic_write_json(
        out / "build_report.json",
        {
            "failed_scans": dict(sorted(failed.items())),
            "failed_sentences": dict(sorted(sentence_failures.items())),
            "reports_without_scan": unmatched,
            "warnings": notes,
        },
    )
    return BuildReport(
        out,
        sorted(done),
        sorted(skipped),
        dict(sorted(failed.items())),
        manifest,
        notes,
        dict(sorted(sentence_failures.items())),
    )


def _manifest(jobs, per_scan, splits, scans, labels, config, sentence_failures) -> dict[str, Any]:
    totals: dict[str, Any] = {
        "scans": {},
        "slices": {},
        "samples": {},
        "tasks": {},
        "languages": {},
        "classes": {},
    }
    sources = {}
    for job in jobs:
        if job.scan_id not in per_scan:
            continue
        c, split = per_scan[job.scan_id], job.split
        totals["scans"][split] = totals["scans"].get(split, 0) + 1
        totals["slices"][split] = totals["slices"].get(split, 0) + c["slices"]
        totals["samples"][split] = totals["samples"].get(split, 0) + c["samples"]
        for key in ("tasks", "languages", "classes"):
            bucket = totals[key].setdefault(split, {})
            for k, v in c[key].items():
                bucket[k] = bucket.get(k, 0) + v
        sources[job.scan_id] = {
            "split": split,
            "scan": Path(job.scan_path).name,
            "labels": Path(job.label_path).name,
            "fingerprint": job.fingerprint,
            **{k: c[k] for k in ("series_uid", "dropped_label_ids") if c.get(k)},
        }
    return {
        "format": "radgrounder-grounded-dataset/1",
        "tool": {"name": "radgrounder", "version": radgrounder.__version__},
        "config": config,
        "splits": list(SPLITS),
        "counts": totals,
        "sources": sources,
        "n_failed_sentences": len(sentence_failures),
    }
