"""Predict over a whole archive: a folder tree of DICOM series, NIfTI volumes and images.

Every DICOM series (grouped by SeriesInstanceUID wherever its files lie), every NIfTI volume
and every picture is one *job*. Each job's outputs are what single-scan ``radgrounder predict
--all-slices`` writes, in ``OUT/<key>/``, published atomically (written to a hidden folder,
then renamed), with ``job.json`` holding its manifest line and the fingerprint of its inputs.
``OUT/manifest.jsonl`` gets one line per job as jobs finish and is rewritten in a stable
order at the end. A rerun skips every job whose folder is there with the same fingerprint, so
a run killed at any moment resumes to the result of an uninterrupted one.

Workers (this process, or Ray actors that load the model once each) return a job's files as
bytes; only the driver writes under ``OUT``, so a worker on another node needs to read the
archive's paths but never to write to them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError
from radgrounder.executor import check_executor
from radgrounder.fileio import atomic_write_bytes, atomic_write_json

FORMAT = "radgrounder-archive-predictions/1"
KINDS = ("dicom-series", "dicom-file", "nifti", "image")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
STATUSES = ("done", "failed", "skipped")


@dataclass(frozen=True)
class ArchiveSettings:
    """What is asked of the model for every job (the same for the whole archive)."""

    task: str = "grounded-report"
    language: str = "en"
    modality: str | None = None
    window: str = "soft_tissue"
    max_new_tokens: int = 200
    question: str | None = None
    structures: tuple[str, ...] | None = None
    clinical_info: str | None = None
    clinical_question: str | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "structures": list(self.structures) if self.structures else None,
            "clinical_info": self.clinical_info,
            "clinical_question": self.clinical_question,
        }


@dataclass
class ArchiveJob:
    """One scan of the archive; plain data so it pickles to any process or Ray node."""

    key: str
    kind: str
    files: list[str]  # absolute; a series' files in discovery order
    sources: list[str]  # relative to the archive: the file, or the folders of a series
    series_uid: str | None = None
    fingerprint: str = ""
    error: str | None = None  # known unreadable at discovery: failed without a worker


@dataclass
class JobOutput:
    """A worker's answer for one job: its manifest line and its files (relative path ->
    bytes), empty when it failed."""

    record: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    # items of each model batch the worker ran since its previous output (the batch fill)
    batches: list[int] = field(default_factory=list)


@dataclass
class Discovery:
    jobs: list[ArchiveJob]
    skipped: list[dict[str, Any]]  # manifest lines of files that are no scan


@dataclass
class ArchiveReport:
    out: Path
    n_jobs: int
    done: int
    resumed: int
    failed: dict[str, str]  # key -> reason
    skipped: int
    model_loads: int
    seconds: float
    warnings: dict[str, list[str]] = field(default_factory=dict)
    batches: int = 0
    batch_fill: float | None = None  # items per batch / batch size, over all batches

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0


# -- discovery -------------------------------------------------------------------------------


def _slug(rel: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace(os.sep, "/").replace("/", "_")).strip("._")
    return s[:80] or "scan"


def job_key(rel: str, identity: str) -> str:
    """A folder name that is stable across runs, readable, and unique for ``identity``."""
    return f"{_slug(rel)}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel != "." else root.name


def _dicom_header(path: Path) -> tuple[str, Any]:
    """('image', dataset), ('other', reason), ('broken', reason) for a DICM-prefixed file
    that cannot be read, or ('none', reason) for a file without the prefix that is no
    readable DICOM image either (a scan only if its name says so)."""
    import pydicom

    from radgrounder.imaging.dicom import DICOMDIR_SOP_CLASS, has_dicm_prefix, sop_class

    prefixed = has_dicm_prefix(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=not prefixed, stop_before_pixels=True)
    except Exception as exc:
        what = "broken" if prefixed else "none"
        return what, f"cannot read DICOM file ({type(exc).__name__}: {exc})"
    sop = sop_class(ds)
    if str(sop) == DICOMDIR_SOP_CLASS:
        return "other", "DICOMDIR (an index, no image)"
    if "Rows" not in ds or "Columns" not in ds:
        if not prefixed:
            return "none", "not a readable DICOM image (no DICM header, no Rows/Columns)"
        name = sop.name if sop.name != str(sop) else (str(sop) or "unknown SOP class")
        return "other", f"DICOM {name}, no image"
    return "image", ds


def discover(
    archive: str | Path,
    *,
    include: Sequence[str] = (),
    exclude_dirs: Sequence[Path] = (),
) -> Discovery:
    """The jobs of a folder tree, in a stable order (by key). ``include``: globs matched
    against each file's path relative to the archive (``*`` crosses folders); any match keeps
    the file. Hidden files and folders and ``exclude_dirs`` are not looked at."""
    from radgrounder.imaging.nifti import is_nifti_path, nifti_label_names
    from radgrounder.imaging.raster import is_image_path

    root = Path(archive).absolute()
    if not root.is_dir():
        raise RadGrounderError("archive folder not found", path=root)
    excluded = {Path(d).absolute() for d in exclude_dirs}
    jobs: list[ArchiveJob] = []
    skipped: list[dict[str, Any]] = []
    series: dict[tuple[str, str], list[Path]] = {}  # (uid or folder, "uid"/"dir") -> files

    def skip(rel: str, reason: str) -> None:
        skipped.append({"key": None, "sources": [rel], "status": "skipped", "reason": reason})

    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and here / d not in excluded
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            rel = _rel(path, root)
            if include and not any(fnmatch.fnmatch(rel, g) for g in include):
                continue
            if not path.is_file():
                skip(rel, "not a regular file")
            elif is_nifti_path(path):
                try:
                    is_labels = nifti_label_names(path) is not None
                except Exception as exc:
                    jobs.append(_file_job("nifti", path, rel, f"cannot read NIfTI ({exc})"))
                    continue
                if is_labels:
                    skip(rel, "a label map (it carries a label table)")
                else:
                    jobs.append(_file_job("nifti", path, rel))
            elif is_image_path(path):
                jobs.append(_file_job("image", path, rel))
            else:
                what, info = _dicom_header(path)
                if what == "broken" or (what == "none" and name.lower().endswith(DICOM_SUFFIXES)):
                    jobs.append(_file_job("dicom-file", path, rel, info))
                elif what == "none":
                    skip(rel, "not a scan (no DICOM, NIfTI or image file)")
                elif what == "other":
                    skip(rel, info)
                elif int(info.get("NumberOfFrames", 1) or 1) > 1:
                    jobs.append(_file_job("dicom-file", path, rel))
                else:
                    uid = str(info.get("SeriesInstanceUID", "") or "")
                    group = (uid, "uid") if uid else (str(here), "dir")
                    series.setdefault(group, []).append(path)
    for (ident, by), files in series.items():
        folders = sorted(dict.fromkeys(_rel(f.parent, root) for f in files))
        common = Path(os.path.commonpath([str(f.parent) for f in files]))
        jobs.append(
            ArchiveJob(
                job_key(_rel(common, root), ident if by == "uid" else folders[0]),
                "dicom-series",
                [str(f) for f in files],
                folders,
                ident if by == "uid" else None,
            )
        )
    jobs.sort(key=lambda j: j.key)
    for job in jobs:
        job.fingerprint = _fingerprint(job)
    skipped.sort(key=lambda r: r["sources"][0])
    return Discovery(jobs, skipped)


def _file_job(kind: str, path: Path, rel: str, error: str | None = None) -> ArchiveJob:
    return ArchiveJob(job_key(rel, rel), kind, [str(path)], [rel], error=error)


def _fingerprint(job: ArchiveJob) -> str:
    """Names, sizes and modification times of the job's files (what rsync and make trust)."""
    h = hashlib.sha256(job.kind.encode())
    for f in sorted(job.files):
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()


# -- the worker ------------------------------------------------------------------------------


@dataclass
class _Active:
    job: ArchiveJob
    volume: Any
    slices: list[Any]
    inputs: list[Any]
    t0: float
    next_input: int = 0
    preds: list[Any] = field(default_factory=list)
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is not None or len(self.preds) == len(self.inputs)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RadGrounderError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class ArchiveWorker:
    """A model loaded once and a stream of jobs: slices of consecutive jobs share batches
    (a batch is filled from the next series before it runs), and each job's outputs are
    handed back as soon as its last slice is predicted."""

    def __init__(
        self,
        model: str | Path | Any,
        settings: ArchiveSettings,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        max_prompt_tokens: int | None = 256,
    ) -> None:
        from radgrounder.inference.predictor import Predictor

        self.settings = settings
        self.predictor = (
            model
            if isinstance(model, Predictor)
            else Predictor(
                model,
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                max_prompt_tokens=max_prompt_tokens,
            )
        )
        # Which model load answered a job: counts loads across processes and nodes.
        self.load_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._batches: list[int] = []

    def _out(self, output: JobOutput) -> JobOutput:
        output.batches, self._batches = self._batches, []
        return output

    def process(self, jobs: Sequence[ArchiveJob]) -> list[JobOutput]:
        """Every job's output (the Ray actors' method)."""
        return list(self.run(jobs))

    def _start(self, job: ArchiveJob) -> _Active:
        from radgrounder.imaging import load_scan, read_dicom_files
        from radgrounder.inference.outputs import model_inputs

        t0 = time.perf_counter()
        mod = self.settings.modality
        if job.kind == "dicom-series":
            volume = read_dicom_files(job.files, series_uid=job.series_uid, modality=mod)
            source: str | Path = volume.source
        else:
            volume = load_scan(job.files[0], modality=mod)
            source = job.files[0]
        slices, inputs = model_inputs(volume, source, range(volume.n_slices))
        return _Active(job, volume, slices, inputs, t0)

    def run(self, jobs: Iterable[ArchiveJob]) -> Iterator[JobOutput]:
        s, p = self.settings, self.predictor
        pending = iter(jobs)
        active: deque[_Active] = deque()
        exhausted = False
        while True:
            chunk: list[tuple[_Active, list[Any]]] = []
            n_items = 0
            while n_items < p.batch_size:
                current = next((a for a in active if a.next_input < len(a.inputs)), None)
                if current is None:
                    if exhausted:
                        break
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                        break
                    if job.error is not None:
                        yield self._out(self._failed(job, job.error, 0.0))
                        continue
                    t0 = time.perf_counter()
                    try:
                        active.append(self._start(job))
                    except Exception as exc:  # a corrupt or unsupported scan: this job only
                        yield self._out(self._failed(job, _reason(exc), time.perf_counter() - t0))
                    continue
                item = current.inputs[current.next_input]
                current.next_input += 1
                try:
                    prepared = p.prepare([item], s.task, s.language, **s.fields())
                except Exception as exc:
                    current.error = _reason(exc)
                    current.next_input = len(current.inputs)
                    continue
                chunk.append((current, prepared))
                n_items += len(prepared)
            if chunk:
                self._generate(chunk)
            for a in list(active):
                if a.complete and a.next_input >= len(a.inputs):
                    active.remove(a)
                    yield self._out(self._finish(a))
            if not chunk and not active and exhausted:
                return

    def _generate(self, chunk: list[tuple[_Active, list[Any]]]) -> None:
        live = [(a, items) for a, items in chunk if a.error is None]
        if not live:
            return
        items = [it for _, its in live for it in its]
        self._batches.append(len(items))
        try:
            preds = self.predictor.run(items, self.settings.max_new_tokens)
        except Exception as exc:  # out of memory in generation: every job of the batch
            for a, _ in live:
                a.error = f"generation failed: {_reason(exc)}"
            return
        for (a, _), pred in zip(live, preds, strict=True):
            if a.error is None:
                a.preds.append(pred)

    def _record(self, job: ArchiveJob, status: str, seconds: float, **extra: Any) -> dict:
        return {
            "key": job.key,
            "kind": job.kind,
            "sources": job.sources,
            "series_uid": job.series_uid,
            "status": status,
            "seconds": round(seconds, 3),
            "model_load": self.load_id,
            **extra,
        }

    def _failed(self, job: ArchiveJob, reason: str, seconds: float) -> JobOutput:
        return JobOutput(self._record(job, "failed", seconds, reason=reason, slices=0))

    def _finish(self, a: _Active) -> JobOutput:
        from radgrounder.inference.outputs import series_summary, write_predictions

        job = a.job
        if a.error is not None:
            return self._failed(job, a.error, time.perf_counter() - a.t0)
        files: dict[str, bytes] = {}
        try:
            write_predictions(
                Path("."), a.preds, a.slices, window=self.settings.window,
                write=files.__setitem__,
            )  # fmt: skip
            if len(a.slices) > 1:
                files["series.json"] = _json_bytes(series_summary(a.volume, a.preds))
        except Exception as exc:
            return self._failed(job, f"writing the outputs failed: {_reason(exc)}", 0.0)
        record = self._record(
            job,
            "done",
            time.perf_counter() - a.t0,
            reason=None,
            slices=len(a.preds),
            modality=a.volume.modality,
            warnings=list(a.volume.metadata.get("warnings") or []),
        )
        return JobOutput(record, files)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


# -- the driver ------------------------------------------------------------------------------


def _manifest_line(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("key", "kind", "sources", "series_uid", "modality", "status", "reason", "slices",
            "seconds", "warnings")  # fmt: skip
    return {k: record.get(k) for k in keys}


def _publish(out: Path, output: JobOutput, fingerprint: str) -> None:
    """Write a job's files into a hidden folder, then rename it to ``OUT/<key>``: readers
    (and a resumed run) see the whole job or none of it."""
    key = output.record["key"]
    tmp = out / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for rel, data in output.files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    job_json = {"fingerprint": fingerprint, "record": _manifest_line(output.record)}
    (tmp / "job.json").write_bytes(_json_bytes(job_json))
    final = out / key
    if final.exists():  # inputs changed since the last run: replace the old outputs
        trash = out / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _finished(out: Path, job: ArchiveJob) -> dict[str, Any] | None:
    """The manifest line of a job an earlier run finished with the same inputs."""
    try:
        data = json.loads((out / job.key / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != job.fingerprint:
        return None
    record = data.get("record")
    return record if isinstance(record, dict) and record.get("status") == "done" else None


def _check_run(out: Path, settings: ArchiveSettings, model: str) -> None:
    """``OUT/archive.json`` names what the outputs are answers to; a rerun with another task,
    language or model into the same folder is refused instead of mixing the two."""
    wanted = {"format": FORMAT, "model": model, "settings": asdict(settings)}
    wanted["settings"]["structures"] = list(settings.structures or []) or None
    path = out / "archive.json"
    if path.exists():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RadGrounderError(f"cannot read ({exc})", path=path) from None
        if have != wanted:
            have = have if isinstance(have, dict) else {}
            before = have.get("settings") if isinstance(have.get("settings"), dict) else {}
            diff = [k for k, v in wanted["settings"].items() if before.get(k) != v]
            diff += ["model"] if have.get("model") != model else []
            raise RadGrounderError(
                f"the folder holds predictions made with other settings ({', '.join(diff)}); "
                "use another --out or remove it",
                path=out,
            )
        return
    atomic_write_json(path, wanted)


def _clean_leftovers(out: Path) -> None:
    for p in out.iterdir():
        if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _sorted_manifest(path: Path) -> None:
    """Rewrite the manifest in a stable order, the last line of each job winning (a rerun
    appends): the same archive gives the same file however often the run was interrupted."""
    lines: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            lines[rec.get("key") or "\0" + rec["sources"][0]] = rec
    body = "".join(
        json.dumps(lines[k], sort_keys=True, ensure_ascii=False) + "\n"
        for k in sorted(lines, key=lambda k: k.lstrip("\0"))
    )
    atomic_write_bytes(path, body.encode("utf-8"))


def _model_name(model: Any) -> str:
    if isinstance(model, str | Path):
        p = Path(model).expanduser()
        return str(p.absolute()) if p.exists() else str(model)
    loaded = getattr(model, "loaded", None)  # a Predictor
    return str(Path(loaded.path).absolute()) if hasattr(loaded, "path") else type(model).__name__


def predict_archive(
    model: str | Path | Any,
    archive: str | Path,
    out: str | Path,
    settings: ArchiveSettings | None = None,
    *,
    include: Sequence[str] = (),
    limit: int | None = None,
    executor: str = "local",
    workers: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    max_prompt_tokens: int | None = 256,
    jobs_per_call: int = 4,
    progress: bool = True,
    on_job: Callable[[dict[str, Any]], None] | None = None,
    found: Discovery | None = None,
) -> ArchiveReport:
    """Predict every scan of ``archive`` into ``out`` (see the module docstring); resumes,
    never aborts for one bad scan. ``model`` is a checkpoint folder or hub id (or, with the
    local executor, a loaded :class:`~radgrounder.inference.Predictor`). ``workers``: Ray
    actors (default: one per GPU of the cluster, else one). ``on_job`` gets
    each finished job's manifest line (the CLI prints failures with it); ``found``: the
    archive's :func:`discover` result when the caller already has it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    t_start = time.perf_counter()
    settings = settings or ArchiveSettings()
    check_executor(executor, 1 if workers is None else workers)
    if limit is not None and limit < 1:
        raise RadGrounderError(f"limit: must be >= 1, got {limit}")
    archive, out = Path(archive).absolute(), Path(out).absolute()
    if executor == "ray" and not isinstance(model, str | Path):
        raise RadGrounderError("executor ray: pass the model as a checkpoint path or hub id")
    if found is None:
        found = discover(archive, include=include, exclude_dirs=[out])
    if not found.jobs:
        what = f" matching {', '.join(include)}" if include else ""
        raise RadGrounderError(
            f"no scans{what} in the folder ({len(found.skipped)} other file(s) looked at)",
            path=archive,
        )
    jobs = found.jobs[:limit] if limit else found.jobs
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, settings, _model_name(model))
    _clean_leftovers(out)

    manifest = out / "manifest.jsonl"
    todo: list[ArchiveJob] = []
    resumed = 0
    with open(manifest, "w", encoding="utf-8") as fh:
        for rec in found.skipped:
            fh.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
        for job in jobs:
            rec = _finished(out, job)
            if rec is None:
                todo.append(job)
            else:
                resumed += 1
                fh.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
    fingerprints = {job.key: job.fingerprint for job in todo}
    failed: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    loads: set[str] = set()
    batches: list[int] = []
    done = 0

    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())  # fmt: skip
    with (
        Progress(*columns, disable=not progress, transient=True) as bar,
        open(manifest, "a", encoding="utf-8") as fh,
    ):
        task = bar.add_task("jobs", total=len(todo), rate="")
        t_run = time.perf_counter()

        def on_done(output: JobOutput) -> None:
            nonlocal done
            batches.extend(output.batches)
            rec = output.record
            if rec.get("model_load"):
                loads.add(rec["model_load"])
            if rec["status"] == "done":
                try:
                    _publish(out, output, fingerprints[rec["key"]])
                except OSError as exc:
                    rec = {**rec, "status": "failed", "reason": f"cannot write outputs: {exc}"}
            line = _manifest_line(rec)
            if line["status"] == "done":
                done += 1
                if line.get("warnings"):
                    notes[line["key"]] = line["warnings"]
            else:
                failed[line["key"]] = line["reason"] or "unknown error"
            fh.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
            fh.flush()
            finished = done + len(failed)
            rate = finished / max(time.perf_counter() - t_run, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.2f} jobs/s")
            if on_job is not None:
                on_job(line)

        def on_lost(job: ArchiveJob, reason: str) -> None:
            on_done(JobOutput({"key": job.key, "kind": job.kind, "sources": job.sources,
                               "series_uid": job.series_uid, "status": "failed",
                               "reason": reason, "slices": 0, "seconds": 0.0}))  # fmt: skip

        common = {"device": device, "dtype": dtype, "batch_size": batch_size,
                  "max_prompt_tokens": max_prompt_tokens}  # fmt: skip
        for job in todo:  # unreadable at discovery: failed without loading a model
            if job.error is not None:
                on_lost(job, job.error)
        todo = [job for job in todo if job.error is None]
        if todo and executor == "ray":
            _run_on_ray(model, settings, todo, workers, jobs_per_call, common, on_done, on_lost)
        elif todo:
            worker = ArchiveWorker(model, settings, **common)
            for output in worker.run(todo):
                on_done(output)
    _sorted_manifest(manifest)
    size = getattr(model, "batch_size", batch_size)  # a Predictor has its own
    fill = sum(batches) / (len(batches) * size) if batches else None
    return ArchiveReport(
        out, len(jobs), done, resumed, dict(sorted(failed.items())), len(found.skipped),
        len(loads), time.perf_counter() - t_start, notes, len(batches), fill,
    )  # fmt: skip


def _run_on_ray(
    model: str | Path,
    settings: ArchiveSettings,
    jobs: list[ArchiveJob],
    workers: int | None,
    jobs_per_call: int,
    common: dict[str, Any],
    on_done: Callable[[JobOutput], None],
    on_lost: Callable[[ArchiveJob, str], None],
) -> None:
    """One actor per GPU of the cluster when it has GPUs (``workers`` caps it), else
    ``workers`` CPU actors; each loads the model once."""
    from radgrounder.executor import connect_ray, run_actors

    ray = connect_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        n, num_gpus = min(workers or gpus, gpus), 1.0
        common = {**common, "device": common.get("device") or "cuda"}
    else:
        n, num_gpus = workers or 1, 0.0
    p = Path(model).expanduser()
    name = str(p.absolute()) if p.exists() else str(model)
    # Small archives: fewer jobs per call, so that every actor gets some.
    per_call = max(1, min(jobs_per_call, len(jobs) // (2 * n)))
    run_actors(
        ArchiveWorker,
        {"model": name, "settings": settings, **common},
        jobs,
        workers=n,
        num_gpus=num_gpus,
        jobs_per_call=per_call,
        on_done=on_done,
        on_lost=on_lost,
    )
