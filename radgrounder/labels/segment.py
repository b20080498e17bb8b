"""Batch TotalSegmentator runs over a folder of CT/MR scans, resumable and crash-safe.

Every scan ``<input>/<rel>`` (a NIfTI file or a folder holding one DICOM series) gets a
multilabel map ``<output>/<rel>.nii.gz`` and a completion marker ``<output>/<rel>.json``.
The marker is written last and atomically, so "marker and label map exist" means done; a
killed run leaves at worst a hidden ``.<name>.part-*.nii.gz`` file, removed on the next run.
Running two batches into the same output folder at once is not supported.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import pickle
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Protocol
from uuid import uuid4

import nibabel as nib
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_json
from radgrounder.imaging.dicom import dcmread, has_dicm_prefix, resolve_modality
from radgrounder.imaging.dicom_series import read_dicom_series
from radgrounder.imaging.nifti import is_nifti_path, read_nifti, sidecar_modality
from radgrounder.imaging.volume import PathType, reason
from radgrounder.labels.names import is_utf8, printable

TASK_BY_MODALITY = {"CT": "total", "MR": "total_mr"}
REPORT_NAME = "segment_report.json"
INSTALL_HINT = "pip install 'radgrounder[totalseg]'"
_DEVICE_RE = re.compile(r"(gpu|cpu|mps|gpu:\d+)")
_TASK_RE = re.compile(r"[A-Za-z0-9_]+")
_PART_INFIX = ".part-"


class Segmenter(Protocol):
    """Writes a NIfTI label map of ``input_path`` to ``output_path``; raises on failure."""

    def __call__(
        self, input_path: Path, output_path: Path, *, task: str, fast: bool, device: str
    ) -> None: ...


@dataclass(frozen=True)
class ScanInput:
    """One scan: a NIfTI file or a folder holding DICOM files; ``rel`` names its outputs."""

    path: Path
    kind: Literal["nifti", "dicom"]
    rel: str


@dataclass
class SegmentReport:
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]
    report_path: Path


def find_scans(input_dir: PathType, *, exclude: Iterable[PathType] = ()) -> list[ScanInput]:
    """Every NIfTI file and every folder directly holding DICOM files under ``input_dir``.

    Hidden files and folders and the folders in ``exclude`` are not walked. Subfolders of a
    DICOM folder are scans only if they hold DICOM files themselves. Sorted by ``rel``.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise RadGrounderError("input folder not found", path=root)
    skip = {os.path.realpath(p) for p in exclude}
    seen: set[str] = set()
    scans: list[ScanInput] = []
    # Symlinked folders are followed (datasets are often assembled from links); `seen` stops loops.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real in skip:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        has_dicom = False
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if is_nifti_path(name):
                rel = (here / name).relative_to(root).as_posix()
                scans.append(ScanInput(here / name, "nifti", _strip_nifti(rel)))
            elif not has_dicom and has_dicm_prefix(here / name):
                has_dicom = True  # one DICM file is enough to call the folder a series
        if has_dicom:
            rel = here.relative_to(root).as_posix()
            scans.append(
                ScanInput(here, "dicom", Path(os.path.abspath(root)).name if rel == "." else rel)
            )
    return sorted(scans, key=lambda s: (s.rel, s.kind, str(s.path)))


def _strip_nifti(rel: str) -> str:
    lower = rel.lower()
    return rel[: -len(".nii.gz")] if lower.endswith(".nii.gz") else rel[: -len(".nii")]


def _import_totalsegmentator() -> Callable[..., Any]:
    try:
        return importlib.import_module("totalsegmentator.python_api").totalsegmentator
    except ImportError as exc:
        raise RadGrounderError(
            f"TotalSegmentator is not installed ({reason(exc)}); install the extra: {INSTALL_HINT}"
        ) from exc


def totalsegmentator_segmenter(
    input_path: Path, output_path: Path, *, task: str, fast: bool, device: str
) -> None:
    """The default segmenter: TotalSegmentator's python API, one multilabel NIfTI (``ml=True``).

    Model weights are downloaded by TotalSegmentator on first use of a task.
    """
    totalsegmentator = _import_totalsegmentator()
    totalsegmentator(
        input=str(input_path),
        output=str(output_path),
        ml=True,
        task=task,
        fast=fast,
        device=device,
        quiet=True,
    )


def scan_modality(scan: ScanInput) -> tuple[str, str]:
    """(``"CT"`` | ``"MR"``, source): DICOM tag of one file, NIfTI sidecar, or intensities."""
    if scan.kind == "dicom":
        files = [p for p in sorted(scan.path.iterdir()) if not p.name.startswith(".")]
        first = next((p for p in files if p.is_file() and has_dicm_prefix(p)), None)
        if first is None:
            raise RadGrounderError("no DICOM files in folder", path=scan.path)
        # The header of one file is enough; decoding the series would take seconds.
        ds, _ = dcmread(first, stop_before_pixels=True)
        return resolve_modality({str(ds.get("Modality", "") or "")}, None, scan.path)
    # A sidecar spares loading the voxels just to learn the modality.
    from_sidecar = sidecar_modality(scan.path)
    if from_sidecar is not None:
        return from_sidecar[0], "sidecar"
    vol = read_nifti(scan.path)
    return str(vol.modality), str(vol.metadata.get("modality_source"))


@dataclass(frozen=True)
class _Job:
    scan: ScanInput
    label_path: Path
    marker_path: Path
    task: str | None
    fast: bool
    device: str
    segmenter: Segmenter
    versions: dict[str, str | None]


def _segment_one(job: _Job) -> str | None:
    """Segment one scan (runs in a worker process when workers > 1); the error, or None."""
    started, t0 = _now(), time.monotonic()
    scan = job.scan
    try:
        try:
            modality, source = scan_modality(scan)
        except (RadGrounderError, OSError) as exc:
            if job.task is None:
                raise RadGrounderError(
                    f"cannot determine the modality to pick a task ({_describe(exc)})",
                    path=scan.path,
                ) from exc
            modality, source = None, None  # a fixed task does not need it
        task = job.task or TASK_BY_MODALITY[str(modality)]
        job.label_path.parent.mkdir(parents=True, exist_ok=True)
        # A redo is "not done" from its start: a crash now must not leave the old marker valid.
        job.marker_path.unlink(missing_ok=True)
        stem = job.label_path.name[: -len(".nii.gz")]
        # Leftovers of a killed run; the .nii.gz ending lets the segmenter pick the format.
        for stale in job.label_path.parent.glob(f".{stem}{_PART_INFIX}*.nii.gz"):
            stale.unlink(missing_ok=True)
        token = uuid4().hex[:8]
        part = job.label_path.with_name(f".{stem}{_PART_INFIX}{token}.nii.gz")
        converted = job.label_path.with_name(f".{stem}{_PART_INFIX}{token}.input.nii.gz")
        try:
            given = scan.path
            if scan.kind == "dicom":
                # The series as every other command reads it (same geometry rules and
                # refusals), so the label map lies on the grid `labels build` reads.
                _series_as_nifti(scan.path, converted)
                given = converted
            job.segmenter(given, part, task=task, fast=job.fast, device=job.device)
            _check_label_map(part, scan)
            with open(part, "rb") as fh:  # on disk before the rename makes it look complete
                os.fsync(fh.fileno())
            os.replace(part, job.label_path)
        finally:
            part.unlink(missing_ok=True)
            converted.unlink(missing_ok=True)
        record = {
            "scan": str(scan.path),
            "rel": scan.rel,
            "kind": scan.kind,
            "task": task,
            "modality": modality,
            "modality_source": source,
            "fast": job.fast,
            "device": job.device,
            "label_map": job.label_path.name,
            "segmenter": _qualname(job.segmenter),
            "versions": job.versions,
            "started": started,
            "finished": _now(),
            "seconds": round(time.monotonic() - t0, 3),
        }
        atomic_write_json(job.marker_path, record)
        return None
    except Exception as exc:  # a per-scan failure must never stop the batch
        return _describe(exc)


def _series_as_nifti(folder: Path, out: Path) -> None:
    """The DICOM series in ``folder`` as a NIfTI on radgrounder's canonical grid."""
    import numpy as np

    volume = read_dicom_series(folder)
    data = volume.data
    if np.all(np.mod(data, 1) == 0) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)  # HU: integers, half the bytes
    nib.save(nib.Nifti1Image(data, volume.affine), str(out))


def _check_label_map(path: Path, scan: ScanInput) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        raise RadGrounderError("the segmenter returned without writing a label map", path=scan.path)
    try:
        shape = nib.load(str(path)).shape  # header only: cheap
    except Exception as exc:
        raise RadGrounderError(
            f"the segmenter wrote an unreadable label map: {reason(exc)}", path=scan.path
        ) from exc
    if len(shape) < 3 or 0 in shape:
        raise RadGrounderError(f"the segmenter wrote a label map of shape {shape}", path=scan.path)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RadGrounderError):
        return str(exc)
    return f"{type(exc).__name__}: {reason(exc)}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _qualname(fn: object) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', repr(inner))}"


def _tool_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("radgrounder", "TotalSegmentator", "nnunetv2", "torch", "nibabel", "pydicom"):
        try:
            out[dist.lower()] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.lower()] = None
    return out


def _validate(
    input_dir: Path, output_dir: Path, task: str | None, device: str, workers: int
) -> None:
    if not input_dir.exists():
        raise RadGrounderError("input folder not found", path=input_dir)
    if not input_dir.is_dir():
        raise RadGrounderError("input must be a folder of scans", path=input_dir)
    inp, out = input_dir.resolve(), output_dir.resolve()
    if inp == out or inp.is_relative_to(out):
        raise RadGrounderError(
            f"output_dir must not be the input folder or contain it ({inp}): "
            "label maps and markers could overwrite inputs",
            path=output_dir,
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise RadGrounderError("output_dir exists and is not a folder", path=output_dir)
    if task is not None and (not isinstance(task, str) or not _TASK_RE.fullmatch(task)):
        raise RadGrounderError(f"task must be a TotalSegmentator task name or None, got {task!r}")
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise RadGrounderError(f"device must be 'gpu', 'cpu', 'mps' or 'gpu:N', got {device!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise RadGrounderError(f"workers must be an integer >= 1, got {workers!r}")


def _skip_state(marker: Path, label: Path, task: str | None, fast: bool) -> str | None:
    """None: redo; "skip": done with the same settings; else why the old result conflicts."""
    if not (marker.is_file() and label.is_file()):
        return None
    try:
        old = json.loads(marker.read_text(encoding="utf-8"))
        old_task, old_fast = old["task"], old["fast"]
    except (OSError, ValueError, TypeError, KeyError):
        return None  # not a marker we wrote: redo rather than trust it
    wanted = {task} if task is not None else set(TASK_BY_MODALITY.values())
    if old_task in wanted and old_fast == fast:
        return "skip"
    return (
        f"already segmented with task={old_task!r}, fast={old_fast} ({marker}); "
        "pass force=True to replace it"
    )


def _finished_since(job: _Job, started: float) -> bool:
    try:
        return job.label_path.is_file() and job.marker_path.stat().st_mtime >= started
    except OSError:
        return False


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[tuple[_Job, str | None]]:
    if workers == 1 or not jobs:
        for job in jobs:
            yield job, _segment_one(job)
        return
    # spawn, not fork: a forked child of a process that has touched CUDA cannot use it.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx)
    started = time.time()
    try:
        futures = {pool.submit(_segment_one, job): job for job in jobs}
        for fut in as_completed(futures):
            try:
                error = fut.result()
            except BrokenProcessPool:
                # A scan that finished just before another worker died is done (its marker
                # is written last, after this run started), though its result never came.
                error = (
                    None
                    if _finished_since(futures[fut], started)
                    else (
                        "a worker process died (crash or out of memory) while this scan was running"
                    )
                )
            except Exception as exc:
                error = _describe(exc)
            yield futures[fut], error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_segmentation(
    input_dir: PathType,
    output_dir: PathType,
    *,
    task: str | None = None,
    fast: bool = False,
    device: str = "gpu",
    workers: int = 1,
    segmenter: Segmenter | None = None,
    force: bool = False,
    progress: bool = True,
) -> SegmentReport:
    """Segment every scan under ``input_dir`` into ``output_dir`` (mirroring its layout).

    ``task=None`` picks ``total`` for CT and ``total_mr`` for MR per scan. Scans already done
    (marker + label map) are skipped unless ``force``. Per-scan failures are collected in
    ``<output_dir>/segment_report.json``, never raised. ``workers > 1`` runs scans in spawned
    processes: ``segmenter`` must then be picklable (a top-level function or a
    ``functools.partial`` of one), and a script calling this needs an
    ``if __name__ == "__main__":`` guard. Each worker loads its own model (GPU memory!).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _validate(input_dir, output_dir, task, device, workers)
    seg: Segmenter = segmenter or totalsegmentator_segmenter
    if seg is totalsegmentator_segmenter:
        _import_totalsegmentator()  # one clear error now rather than one per scan
    if workers > 1:
        try:
            pickle.dumps(seg)
        except Exception as exc:
            raise RadGrounderError(
                "segmenter must be picklable (a top-level function) when workers > 1: "
                f"{reason(exc)}"
            ) from exc
    scans = find_scans(input_dir, exclude=[output_dir])
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RadGrounderError(
            f"cannot create output folder: {reason(exc)}", path=output_dir
        ) from exc

    versions = _tool_versions()
    rel_count = Counter(s.rel for s in scans)
    failed: dict[str, str] = {}
    where = {s.rel: s.path for s in scans}
    skipped: list[str] = []
    done: list[str] = []
    jobs: list[_Job] = []
    for scan in scans:
        if not is_utf8(scan.rel):
            key = printable(scan.rel)
            error = RadGrounderError(
                "the file name is not valid UTF-8; rename it", path=printable(str(scan.path))
            )
            failed[key], where[key] = str(error), scan.path
            continue
        if rel_count[scan.rel] > 1:
            # Two inputs (a/ct.nii and a/ct.nii.gz, or a/ct/ and a/ct.nii.gz) share one output.
            # Keyed by the input path, the one name that stays unique.
            key = scan.path.relative_to(input_dir).as_posix()
            others = [str(s.path) for s in scans if s.rel == scan.rel and s is not scan]
            msg = f"output name {scan.rel!r} is shared with {others}; rename one"
            failed[key], where[key] = str(RadGrounderError(msg, path=scan.path)), scan.path
            continue
        label, marker = output_dir / f"{scan.rel}.nii.gz", output_dir / f"{scan.rel}.json"
        state = None if force else _skip_state(marker, label, task, fast)
        if state == "skip":
            skipped.append(scan.rel)
        elif state is not None:
            failed[scan.rel] = state
        else:
            jobs.append(_Job(scan, label, marker, task, fast, device, seg, versions))

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    columns += (TimeElapsedColumn(),)
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        bar_id = bar.add_task("segmenting", total=len(jobs))
        n_failed = 0
        for job, error in _run_jobs(jobs, workers):
            if error is None:
                done.append(job.scan.rel)
            else:
                failed[job.scan.rel] = printable(error)
                n_failed += 1
            bar.update(
                bar_id, advance=1, description=f"segmenting: {len(done)} done, {n_failed} failed"
            )

    report_path = output_dir / REPORT_NAME
    outcome = {"done": done, "skipped": skipped, "failed": failed}
    report = {
        "input_dir": printable(str(input_dir)),
        "output_dir": printable(str(output_dir)),
        "task": task or "auto (CT: total, MR: total_mr)",
        "fast": fast,
        "device": device,
        "workers": workers,
        "force": force,
        "finished": _now(),
        "counts": {"scans": len(scans), **{k: len(v) for k, v in outcome.items()}},
        "done": sorted(done),
        "skipped": skipped,
        "failed": [
            {"scan": rel, "path": printable(str(where[rel])), "error": err}
            for rel, err in sorted(failed.items())
        ],
    }
    atomic_write_json(report_path, report)
    return SegmentReport(sorted(done), skipped, dict(sorted(failed.items())), report_path)
