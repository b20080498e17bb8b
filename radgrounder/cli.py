"""The ``radgrounder`` command line: thin wrappers over the library functions."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer

from radgrounder.errors import RadGrounderError
from radgrounder.labels.names import printable as _printable

try:  # typer >= 0.2x raises its own vendored copies of click's exceptions
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover - an older typer raises click's own
    _typer_click = click.exceptions


def _both(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class ``name`` and typer's vendored copy of it (where either exists)."""
    found = [getattr(m, name, None) for m in (click.exceptions, _typer_click)]
    return tuple(dict.fromkeys(c for c in found if isinstance(c, type)))


_NO_ARGS_HELP = _both("NoArgsIsHelpError")
_USAGE_ERRORS = _both("UsageError")
_CLICK_ERRORS = _both("ClickException")
_EXITS = tuple(dict.fromkeys((click.exceptions.Exit, typer.Exit)))
_ABORTS = tuple(dict.fromkeys((click.exceptions.Abort, typer.Abort)))
# OS errors about a path the user gave: one line, not a traceback.
_PATH_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EEXIST,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.ENOSPC,
    errno.EROFS,
    getattr(errno, "EDQUOT", errno.ENOSPC),
}
_LONGEST_SHOWN = 160  # characters of a path shown in a message; longer ones are shortened

app = typer.Typer(
    name="radgrounder",
    help="Spatially grounded radiology vision-language models: scans in, grounded text out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _example(text: str) -> str:
    # \b stops click from re-wrapping the command, so it stays copy-pasteable.
    return f"Example:\n\n\b\n  {text}"


# -- checks on the paths a command is given, made before any expensive work ---------------


def _shown(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message: printable, and shortened when very long."""
    text = _printable(os.fspath(path))
    if len(text) <= _LONGEST_SHOWN:
        return text
    return f"{text[:100]}...{text[-40:]} ({len(text)} characters)"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_reason(exc: OSError) -> str:
    return exc.strerror or _one_line(str(exc)) or type(exc).__name__


def _label(path: Path, option: str | None) -> str:
    return f"{option} {_shown(path)}" if option else _shown(path)


def _check_name(path: Path, option: str | None = None) -> None:
    """A file name that is not valid UTF-8 cannot be written into the JSON outputs."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise RadGrounderError(
            f"{_label(path, option)}: the file name is not valid UTF-8; rename it"
        ) from None


def _check_input(path: Path, option: str | None = None, *, folder: bool = False) -> None:
    """``path`` exists (a folder when ``folder``), is readable and has a UTF-8 name."""
    _check_name(path, option)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise RadGrounderError(
            f"{_label(path, option)}: no such {'folder' if folder else 'file or folder'}"
        ) from None
    except OSError as exc:
        raise RadGrounderError(f"{_label(path, option)}: {_os_reason(exc)}") from None
    is_dir = os.path.isdir(path)
    if folder and not is_dir:
        raise RadGrounderError(f"{_label(path, option)}: not a folder")
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        raise RadGrounderError(f"{_label(path, option)}: permission denied")


def _creatable(path: Path, option: str | None) -> None:
    """``path`` does not exist yet: its nearest existing ancestor is a writable folder."""
    for parent in Path(os.path.abspath(path)).parents:
        try:
            os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise RadGrounderError(f"{_label(path, option)}: {_os_reason(exc)}") from None
        if not os.path.isdir(parent):
            raise RadGrounderError(
                f"{_label(path, option)}: cannot be created, {_shown(parent)} is not a folder"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RadGrounderError(
                f"{_label(path, option)}: cannot be created, {_shown(parent)} is not writable"
            )
        return


def _check_output(path: Path, option: str | None = None, *, folder: bool = True) -> None:
    """``path`` can be written: an existing writable folder (or file, with ``folder=False``)
    or a new one whose nearest existing ancestor is a writable folder. Nothing is created."""
    _check_name(path, option)
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        _creatable(path, option)
        return
    except OSError as exc:
        raise RadGrounderError(f"{_label(path, option)}: {_os_reason(exc)}") from None
    is_dir = os.path.isdir(path)
    if folder and not is_dir:
        raise RadGrounderError(f"{_label(path, option)}: exists and is not a folder")
    if not folder and is_dir:
        raise RadGrounderError(f"{_label(path, option)}: is a folder, expected a file name")
    if not os.access(path, os.W_OK | (os.X_OK if is_dir else 0)):
        raise RadGrounderError(f"{_label(path, option)}: not writable")
    if not is_dir:
        _creatable(path, option)  # the file is replaced atomically: its folder is written


def _choice(option: str, value: str | None, allowed: tuple[str, ...], *, optional=False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise typer.BadParameter(
            f"{value!r} is not one of {', '.join(allowed)}", param_hint=f"'{option}'"
        )


def _at_least(option: str, value: int, low: int) -> None:
    if value < low:
        raise typer.BadParameter(f"must be at least {low}, got {value}", param_hint=f"'{option}'")


def _check_dtype(dtype: str | None) -> None:
    """``--dtype``: a floating torch dtype name (checked before any weight is read)."""
    if dtype is None or dtype == "auto":
        return
    import torch

    value = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise typer.BadParameter(
            f"{dtype!r} is not a floating dtype (float32, bfloat16, ...)", param_hint="'--dtype'"
        )


def _check_device(device: str | None) -> None:
    if device is not None:
        from radgrounder.modeling.checkpoint import check_device

        check_device(device)


def _checkpoint_hint(model: str) -> tuple[str, str | None]:
    """(variant, normalisation preset) a local checkpoint's ``config.json`` names, read
    without loading the weights; ``("detection", None)`` where it says nothing."""
    try:
        raw = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "detection", None
    if not isinstance(raw, dict):
        return "detection", None
    settings = raw.get("radgrounder") if isinstance(raw.get("radgrounder"), dict) else {}
    archs = raw.get("architectures") or []
    segmentation = "GroundedGemmaForConditionalGeneration" in archs
    if settings.get("variant") == "segmentation":
        segmentation = True
    norm = settings.get("normalization")
    return "segmentation" if segmentation else "detection", norm if isinstance(norm, str) else None


def _check_model(model: str) -> None:
    """``--model``: an existing checkpoint folder, or something that can be a hub id
    (``owner/name[/subfolder]``, looked up when no such local path exists)."""
    path = Path(model).expanduser()
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        parts = model.split("/")
        # runs/tiny/final where runs/ exists is a local path with a typo, not a hub id
        local = len(parts) >= 2 and Path(parts[0]).expanduser().is_dir()
        if len(parts) < 2 or model.startswith((".", "/", "~")) or not all(parts) or local:
            raise RadGrounderError(f"--model {_shown(model)}: no such checkpoint folder") from None
        return
    except OSError as exc:
        raise RadGrounderError(f"--model {_shown(model)}: {_os_reason(exc)}") from None
    if not path.is_dir():
        raise RadGrounderError(f"--model {_shown(model)}: expected a checkpoint folder, got a file")


class _LazyPredictor:
    """A :class:`~radgrounder.inference.Predictor` made on the first ``predict`` call, so
    ``run_predict`` reads and checks the scan before the model is loaded."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        self._model, self._kwargs, self._predictor = model, kwargs, None

    @property
    def variant(self) -> str | None:
        return None if self._predictor is None else self._predictor.variant

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        if self._predictor is None:
            from radgrounder.inference import Predictor

            self._predictor = Predictor(self._model, **self._kwargs)
        return self._predictor.predict(*args, **kwargs)


@app.command(epilog=_example("radgrounder inspect data/totalseg_example/example_ct_dicom"))
def inspect(
    path: Annotated[
        Path, typer.Argument(help="DICOM file, DICOM series folder, NIfTI or PNG/JPG.")
    ],
    modality: Annotated[str | None, typer.Option(help="Override the modality (CT or MR).")] = None,
    series_uid: Annotated[
        str | None, typer.Option(help="The series to read from a folder that holds several.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print modality, shape, voxel spacing, orientation, value range and slice count; for a
    folder with several DICOM series, the list of series (pick one with --series-uid)."""
    from radgrounder.imaging import inspect_scan

    _check_input(path)
    if path.is_dir() and series_uid is None:
        from radgrounder.imaging.dicom_series import list_series

        series = list_series(path)
        if len(series) > 1:
            if as_json:
                typer.echo(json.dumps({"path": str(path), "series": series}, indent=2))
                return
            typer.echo(
                f"{_printable(str(path))}: {len(series)} series (pick one with --series-uid)"
            )
            for s in series:
                folders = ", ".join(map(str, s["folders"]))  # type: ignore[arg-type]
                typer.echo(
                    f"  {s['series_uid'] or '<no SeriesInstanceUID>'}  {s['modality'] or '-'}  "
                    f"{s['n_files']} files  {s['rows']}x{s['columns']}  "
                    f"{s['description'] or ''}  [{_printable(folders)}]"
                )
            return
    info = inspect_scan(path, modality=modality, series_uid=series_uid)
    data = info.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    rows = [
        ("path", _printable(str(data["path"]))),
        ("kind", data["kind"]),
        (
            "modality",
            (info.modality or "-") + (f" ({info.modality_source})" if info.modality_source else ""),
        ),
        ("shape", " x ".join(map(str, info.shape))),
        ("slices", str(info.n_slices)),
        ("spacing (mm)", " x ".join(f"{s:g}" for s in info.spacing)),
        ("orientation", f"{info.orientation} (file: {info.source_orientation})"),
        ("value range", f"{info.value_min:g} .. {info.value_max:g}"),
        ("dtype", str(info.dtype)),
    ]
    rows += [(k, str(v)) for k, v in info.extra.items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
    _warn(info.warnings)


def _warn(notes: list[str], prefix: str = "") -> None:
    for note in notes:
        typer.echo(f"radgrounder: warning: {prefix}{_printable(note)}", err=True)


@app.command(epilog=_example("radgrounder demo --out demo_output --serve"))
def demo(
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it exists).")] = Path(
        "demo_output"
    ),
    serve: Annotated[
        bool, typer.Option(help="Afterwards, serve the trained model with the web viewer.")
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option(help="Training steps (default: the config's 500).")
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="Evaluate only the first N held-out samples.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length limit.")] = 160,
    port: Annotated[int, typer.Option(help="Port for --serve.")] = 8000,
    seed: Annotated[
        int | None, typer.Option(help="Training seed (default: the config's 0).")
    ] = None,
) -> None:
    """The whole loop on the bundled scans: build data, train on CPU, evaluate next to a
    baseline, predict on the DICOM series, write index.html."""
    from radgrounder.demo_pipeline import run_pipeline

    _check_output(out, "--out")
    result = run_pipeline(
        out, max_steps=max_steps, eval_limit=eval_limit, max_new_tokens=max_new_tokens, seed=seed
    )
    if serve:
        from radgrounder.serve.app import serve as run_server

        run_server(result.model, port=port)


labels_app = typer.Typer(
    help="Grounded training data: segment scans, extract regions and keywords, build datasets.",
    no_args_is_help=True,
)
app.add_typer(labels_app, name="labels")

_LAYOUT = "data/totalseg_example/layout"


@labels_app.command(
    "segment",
    epilog=_example("radgrounder labels segment scans/ labels/ --device gpu --workers 2"),
)
def labels_segment(
    input_dir: Annotated[Path, typer.Argument(help="Folder of NIfTI scans / DICOM series.")],
    output_dir: Annotated[Path, typer.Argument(help="Where the label maps go (mirrored tree).")],
    task: Annotated[
        str | None, typer.Option(help="TotalSegmentator task; default from modality.")
    ] = None,
    fast: Annotated[bool, typer.Option(help="TotalSegmentator's 3 mm fast model.")] = False,
    device: Annotated[str, typer.Option(help="gpu, gpu:N, cpu or mps.")] = "gpu",
    workers: Annotated[int, typer.Option(help="Scans segmented in parallel.")] = 1,
    force: Annotated[bool, typer.Option(help="Redo scans that are already done.")] = False,
) -> None:
    """Run TotalSegmentator over every scan in a folder (needs the totalseg extra)."""
    from radgrounder.labels.segment import run_segmentation

    _check_input(input_dir, folder=True)
    _check_output(output_dir)
    report = run_segmentation(
        input_dir, output_dir, task=task, fast=fast, device=device, workers=workers, force=force
    )
    typer.echo(
        f"done {len(report.done)}, skipped {len(report.skipped)}, failed {len(report.failed)}"
        f" (report: {report.report_path})"
    )
    for scan, error in report.failed.items():
        typer.echo(f"failed: {scan}: {error}", err=True)
    if report.failed:
        raise typer.Exit(3)


@labels_app.command(
    "regions",
    epilog=_example(
        f"radgrounder labels regions {_LAYOUT}/labels/ct_upper_abdomen.nii.gz --out regions.jsonl"
    ),
)
def labels_regions(
    label_map: Annotated[Path, typer.Argument(help="TotalSegmentator label map (NIfTI).")],
    out: Annotated[Path, typer.Option(help="JSON lines file, one line per slice.")],
    label_task: Annotated[
        str | None, typer.Option(help="total or total_mr when the map has no label names.")
    ] = None,
    axis: Annotated[str, typer.Option(help="axial, coronal or sagittal.")] = "axial",
    min_area: Annotated[int, typer.Option(help="Smallest instance kept, in pixels.")] = 0,
) -> None:
    """Per slice: classes present, union box per class, 8-connected instance boxes."""
    from radgrounder.fileio import atomic_write_bytes
    from radgrounder.imaging import read_label_map
    from radgrounder.labels.regions import extract_regions, unify_label_volume

    _check_input(label_map)
    _check_output(out, "--out", folder=False)
    unified = unify_label_volume(read_label_map(label_map), label_task=label_task)
    lines = [
        json.dumps(r.to_dict(), separators=(",", ":"))
        for r in extract_regions(unified, axis=axis, min_area=min_area)
    ]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    n = sum(1 for line in lines if '"classes":[]' not in line)
    typer.echo(f"{len(lines)} slices ({n} with structures) -> {out}")


def _api_key(path: Path | None, env: str) -> str | None:
    """The API key from ``--...api-key-file`` or the environment variable ``env``."""
    from radgrounder.chat_client import read_api_key

    if path is not None:
        if os.environ.get(env):
            raise RadGrounderError(f"give the API key once: the key file or {env}")
        return read_api_key(path)
    return os.environ.get(env) or None


def _llm_options(
    api_key_file: Path | None,
    response_format: str,
    concurrency: int | None,
    timeout: float,
    connect_timeout: float,
    *,
    env: str = "RADGROUNDER_LLM_API_KEY",
    flag: str = "",
) -> dict[str, Any]:
    """The chat-server options shared by the keyword and judge commands, checked."""
    from radgrounder.labels.llm import RESPONSE_FORMATS

    _choice(f"--{flag}response-format", response_format, RESPONSE_FORMATS)
    if concurrency is not None:
        _at_least(f"--{flag}concurrency", concurrency, 1)
    for name, value in (
        (f"--{flag}timeout", timeout),
        (f"--{flag}connect-timeout", connect_timeout),
    ):
        if not value > 0:
            raise typer.BadParameter(f"must be > 0, got {value}", param_hint=f"'{name}'")
    return {
        "api_key": _api_key(api_key_file, env),
        "response_format": response_format,
        "concurrency": concurrency,
        "timeout": timeout,
        "connect_timeout": connect_timeout,
    }


@labels_app.command(
    "keywords",
    epilog=_example(
        "radgrounder labels keywords data/totalseg_example/reports.jsonl --out mentions.jsonl"
    ),
)
def labels_keywords(
    reports: Annotated[Path, typer.Argument(help="Reports table: CSV, JSON, JSONL or Parquet.")],
    out: Annotated[Path, typer.Option(help="JSON lines: one sentence with its mentions a line.")],
    backend: Annotated[str, typer.Option(help="lexicon (offline) or llm.")] = "lexicon",
    endpoint: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL, e.g. http://host:8000/v1.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name on that server.")] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="File with the server's API key (mode 600). Or RADGROUNDER_LLM_API_KEY."),
    ] = None,
    response_format: Annotated[
        str, typer.Option(help="json_schema (constrained), json_object or none (plain replies).")
    ] = "json_schema",
    concurrency: Annotated[
        int | None, typer.Option(help="LLM requests in flight (default: the server's slots, or 4).")
    ] = None,
    max_retries: Annotated[int, typer.Option(help="LLM retries per sentence.")] = 5,
    backoff: Annotated[float, typer.Option(help="First LLM retry delay, seconds.")] = 1.0,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a reply (includes server queueing).")
    ] = 120.0,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to reach the server.")] = 10.0,
    text_mode: Annotated[
        str, typer.Option(help="reference (clean_punctuation, as trained) or raw.")
    ] = "reference",
) -> None:
    """Find anatomy mentions (with negation) in every report sentence."""
    from radgrounder.fileio import atomic_write_bytes
    from radgrounder.labels.keywords import extract_keywords, sentence_items
    from radgrounder.labels.reports import read_reports

    _check_input(reports)
    _check_output(out, "--out", folder=False)
    llm: dict[str, Any] = {}
    if backend == "llm":
        llm = _llm_options(api_key_file, response_format, concurrency, timeout, connect_timeout)
        llm.update(max_retries=max_retries, backoff=backoff)
    items = sentence_items(read_reports(reports), text_mode=text_mode)
    results = extract_keywords(
        items,
        backend=backend,
        endpoint=endpoint,
        model=model,
        checkpoint=out.with_name(out.name + ".checkpoint") if backend == "llm" else None,
        progress=True,
        **llm,
    )
    atomic_write_bytes(
        out, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in results).encode()
    )
    failed = [r for r in results if r.error]
    n_mentions = sum(len(r.mentions) for r in results)
    typer.echo(f"{len(results)} sentences, {n_mentions} mentions, {len(failed)} failed -> {out}")
    for r in failed:
        typer.echo(f"failed: {r.id}: {r.error}", err=True)
    if failed:
        raise typer.Exit(3)


@labels_app.command(
    "build",
    epilog=_example(
        f"radgrounder labels build --scans {_LAYOUT}/scans --labels {_LAYOUT}/labels "
        "--reports data/totalseg_example/reports.jsonl --out grounded_dataset"
    ),
)
def labels_build(
    scans: Annotated[Path, typer.Option(help="<scan_id>.nii.gz files / <scan_id>/ DICOM folders.")],
    labels: Annotated[Path, typer.Option(help="<scan_id>.nii.gz label maps.")],
    reports: Annotated[Path, typer.Option(help="Reports table (scan_id, language, text, ...).")],
    out: Annotated[Path, typer.Option(help="Dataset folder (created or resumed).")],
    modality: Annotated[str | None, typer.Option(help="CT or MR for NIfTI scans.")] = None,
    label_task: Annotated[
        str | None, typer.Option(help="total or total_mr when maps carry no label names.")
    ] = None,
    axis: Annotated[str, typer.Option(help="axial, coronal or sagittal.")] = "axial",
    split: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Seed for splits and VQA sampling.")] = 0,
    instances: Annotated[
        bool, typer.Option(help="One box per connected component instead of per class.")
    ] = False,
    min_area: Annotated[int, typer.Option(help="Smallest instance kept, in pixels.")] = 0,
    text_mode: Annotated[str, typer.Option(help="reference or raw report text.")] = "reference",
    vqa: Annotated[bool, typer.Option(help="Add templated (grounding) VQA items.")] = True,
    backend: Annotated[str, typer.Option(help="Keyword backend: lexicon or llm.")] = "lexicon",
    endpoint: Annotated[str | None, typer.Option(help="LLM base URL for --backend llm.")] = None,
    model: Annotated[str | None, typer.Option(help="LLM model for --backend llm.")] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="File with the LLM server's API key (mode 600). Or RADGROUNDER_LLM_API_KEY."
        ),
    ] = None,
    response_format: Annotated[
        str, typer.Option(help="LLM replies: json_schema, json_object or none (plain).")
    ] = "json_schema",
    llm_concurrency: Annotated[
        int | None, typer.Option(help="LLM requests in flight (default: the server's slots, or 4).")
    ] = None,
    llm_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for an LLM reply (includes queueing).")
    ] = 120.0,
    workers: Annotated[int, typer.Option(help="Scans processed in parallel.")] = 1,
    executor: Annotated[str, typer.Option(help="local (process pool) or ray.")] = "local",
    export: Annotated[str | None, typer.Option(help="Also write another layout: refrad2d.")] = None,
    series_uid: Annotated[
        list[str] | None,
        typer.Option(
            help="SCAN_ID=UID: the series of a scan folder that holds several (repeatable; "
            "default: the series on the label map's grid)."
        ),
    ] = None,
) -> None:
    """Scans + label maps + reports -> a grounded bilingual dataset (resumable)."""
    from radgrounder.labels.build import BuildOptions, build_dataset

    series: dict[str, str] = {}
    for item in series_uid or []:
        sid, sep, uid = item.partition("=")
        if not sep or not sid.strip() or not uid.strip():
            raise typer.BadParameter(
                f"expected SCAN_ID=UID, got {item!r}", param_hint="'--series-uid'"
            )
        series[sid.strip()] = uid.strip()

    try:
        fractions = tuple(float(x) for x in split.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3:
        raise typer.BadParameter(
            f"expected three fractions such as 0.8,0.1,0.1, got {split!r}", param_hint="'--split'"
        )
    if export not in (None, "refrad2d"):
        raise typer.BadParameter(f"unknown layout {export!r} (refrad2d)", param_hint="'--export'")
    _check_input(scans, "--scans", folder=True)
    _check_input(labels, "--labels", folder=True)
    _check_input(reports, "--reports")
    _check_output(out, "--out")
    llm: dict[str, Any] = {}
    if backend == "llm":
        llm = _llm_options(api_key_file, response_format, llm_concurrency, llm_timeout, 10.0,
                           flag="llm-")  # fmt: skip
        llm.update(endpoint=endpoint, model=model)
    opts = BuildOptions(
        modality=modality,
        label_task=label_task,
        slice_axis=axis,
        splits=fractions,
        seed=seed,
        instances=instances,
        min_area=min_area,
        text_mode=text_mode,
        vqa=vqa,
        keyword_backend=backend,
        workers=workers,
        executor=executor,
        llm=llm,
        series=series,
    )
    report = build_dataset(scans, labels, reports, out, opts)
    for scan, notes in report.warnings.items():
        _warn(notes, prefix=f"{scan}: ")
    counts = report.manifest["counts"]
    typer.echo(
        f"scans built {len(report.done)}, resumed {len(report.skipped)}, failed "
        f"{len(report.failed)}; samples {counts['samples']} -> {out}"
    )
    for scan, error in report.failed.items():
        typer.echo(f"failed: {scan}: {error}", err=True)
    if report.failed_sentences:
        n_sentences = report.manifest.get("n_sentences", 0)
        typer.echo(
            f"keywords failed for {len(report.failed_sentences)} of {n_sentences} sentences "
            f"(their mentions are missing from the dataset; all in "
            f"{_printable(str(out / 'build_report.json'))}):",
            err=True,
        )
        for sid, error in list(report.failed_sentences.items())[:10]:
            typer.echo(f"  {sid}: {_one_line(_printable(error))}", err=True)
        if len(report.failed_sentences) > 10:
            typer.echo(f"  ... and {len(report.failed_sentences) - 10} more", err=True)
    if export == "refrad2d":
        from radgrounder.labels.export_refrad2d import export_refrad2d

        written = export_refrad2d(out, out / "refrad2d")
        typer.echo(f"refrad2d export: {written} -> {out / 'refrad2d'}")
    if report.failed or report.failed_sentences:
        raise typer.Exit(3)


@labels_app.command(
    "export",
    epilog=_example("radgrounder labels export grounded_dataset refrad2d_out"),
)
def labels_export(
    dataset: Annotated[Path, typer.Argument(help="A dataset folder from labels build.")],
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    layout: Annotated[str, typer.Option(help="Target layout.")] = "refrad2d",
) -> None:
    """Write a built dataset in another layout (the reference's RefRad2D)."""
    from radgrounder.labels.export_refrad2d import export_refrad2d

    if layout != "refrad2d":
        raise typer.BadParameter(f"unknown layout {layout!r} (refrad2d)", param_hint="'--layout'")
    _check_input(dataset, folder=True)
    _check_output(out)
    written = export_refrad2d(dataset, out)
    typer.echo(f"refrad2d export: {written} -> {out}")


model_app = typer.Typer(help="Create and inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command(
    "init", epilog=_example("radgrounder model init --size tiny --variant detection models/tiny")
)
def model_init(
    out: Annotated[Path, typer.Argument(help="Folder for the new model.")],
    size: Annotated[
        str, typer.Option(help="tiny (unit tests), small (CPU demos) or 3b (real shapes).")
    ] = "tiny",
    variant: Annotated[str, typer.Option(help="detection or segmentation.")] = "detection",
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in the folder.")] = False,
) -> None:
    """Write a randomly initialised model of the real classes plus its tokenizer."""
    from radgrounder.modeling import init_model

    _check_output(out)
    path = init_model(size, variant, out, seed=seed, overwrite=overwrite)
    typer.echo(f"{size} {variant} model -> {path}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=_example("radgrounder train configs/tiny-cpu.yaml output_dir=runs/tiny-50 max_steps=50"),
)
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="Training config (YAML).")],
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train or fine-tune; extra key=value arguments override the config (dotted keys)."""
    from radgrounder.training import load_config
    from radgrounder.training import train as run_training

    _check_input(config)
    cfg = load_config(config, list(ctx.args))
    try:
        result = run_training(cfg, progress=not quiet)
    finally:
        _leave_process_group()
    if not result.main_process:
        return
    msg = f"trained {result.steps} steps, last loss {result.last_loss:.4f}"
    if result.eval_loss is not None:
        msg += f", held-out loss {result.eval_loss:.4f}"
    typer.echo(f"{msg}; final model -> {result.final_dir}")


def _leave_process_group() -> None:
    """Destroy the distributed process group a launched run created, so no communication
    thread is still running when the interpreter exits (which aborts the process with
    "terminate called without an active exception" and a non-zero exit code)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_EVAL_EXAMPLE = (
    "radgrounder eval --model runs/tiny-50/final --dataset built "
    "--data-root runs/datasets/totalseg_example --split test --out runs/eval-tiny-50 --limit 40"
)


@app.command("eval", epilog=_example(_EVAL_EXAMPLE))
def eval_cmd(
    model: Annotated[str, typer.Option(help="Checkpoint folder (or hub id in the local cache).")],
    dataset: Annotated[
        str, typer.Option(help="slake, vqa-rad, vqa-rad-official, built or refrad2d.")
    ],
    data_root: Annotated[Path, typer.Option(help="The dataset's folder.")],
    out: Annotated[Path, typer.Option(help="Run folder (resumed if it holds this run).")],
    split: Annotated[str, typer.Option(help="train, val or test (test means test).")] = "test",
    images: Annotated[
        Path | None, typer.Option(help="VQA-RAD image folder (default DATA_ROOT/images).")
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option(help="Built datasets: task(s) to evaluate (repeat).")
    ] = None,
    language: Annotated[
        list[str] | None, typer.Option(help="Built/RefRad2D: language(s), en and/or de.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per generation batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length limit.")] = 200,
    compat: Annotated[
        str, typer.Option(help="none, or reference: the reference's split/threshold choices.")
    ] = "none",
    matcher: Annotated[
        str,
        typer.Option(help="Keyword similarity for G-IoU: exact, lexical or an encoder folder."),
    ] = "lexical",
    embedding_model: Annotated[
        Path | None, typer.Option(help="Local sentence-encoder folder: adds a similarity score.")
    ] = None,
    meteor: Annotated[str, typer.Option(help="auto (when WordNet is installed), on, off.")] = (
        "auto"
    ),
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible server for the LLM judge.")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="Judge model name.")] = None,
    judge_api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="File with the judge server's API key (mode 600). Or RADGROUNDER_JUDGE_API_KEY."
        ),
    ] = None,
    judge_response_format: Annotated[
        str, typer.Option(help="Judge replies: json_schema, json_object or none (plain).")
    ] = "json_schema",
    judge_concurrency: Annotated[
        int | None,
        typer.Option(help="Judge requests in flight (default: the server's slots, or 4)."),
    ] = None,
    judge_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a judge reply (includes queueing).")
    ] = 120.0,
    mask_threshold: Annotated[
        str | None, typer.Option(help="probability or logit (default: the checkpoint's).")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Normalisation preset (default: the checkpoint's).")
    ] = None,
    prefix_style: Annotated[
        str, typer.Option(help="Clinical context in report prompts: both, none, ...")
    ] = "both",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Bootstrap and sampling seed.")] = 0,
    examples: Annotated[int, typer.Option(help="Example overlays to draw.")] = 8,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ...")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Score a model on a dataset split: samples.parquet/csv, summary.json (bootstrap CIs)
    and report.html in --out. Exit code 3 when some samples failed (listed at the end)."""
    _check_input(data_root, "--data-root", folder=True)
    if images is not None:
        _check_input(images, "--images", folder=True)
    if embedding_model is not None:
        _check_input(embedding_model, "--embedding-model", folder=True)
    if matcher not in ("exact", "lexical"):
        _check_input(Path(matcher), "--matcher", folder=True)
    _check_output(out, "--out")
    from radgrounder.evaluation.datasets import BUILT_TASKS, COMPAT_MODES, DATASETS, open_dataset
    from radgrounder.evaluation.runner import EvalOptions, evaluate

    _choice("--dataset", dataset, DATASETS)
    _choice("--split", split, ("train", "val", "validate", "test"))
    _choice("--compat", compat, COMPAT_MODES)
    _choice("--meteor", meteor, ("auto", "on", "off"))
    _choice("--mask-threshold", mask_threshold, ("probability", "logit"), optional=True)
    for t in task or ():
        _choice("--task", t, BUILT_TASKS)
    for lang in language or ():
        _choice("--language", lang, ("en", "de"))
    _at_least("--batch-size", batch_size, 1)
    _at_least("--max-new-tokens", max_new_tokens, 1)
    _check_dtype(dtype)
    _check_device(device)
    if (judge_url is None) != (judge_model is None):
        raise typer.BadParameter("--judge-url and --judge-model go together")
    _check_model(model)
    judge = None
    if judge_url:
        from radgrounder.evaluation.judge import LLMJudge

        options = _llm_options(judge_api_key_file, judge_response_format, judge_concurrency,
                               judge_timeout, 10.0, env="RADGROUNDER_JUDGE_API_KEY",
                               flag="judge-")  # fmt: skip
        options["json_mode"] = options.pop("response_format")
        judge = LLMJudge(judge_url, judge_model, **options)

    def open_for(variant: str, norm: str) -> Any:
        return open_dataset(
            dataset,
            data_root,
            split=split,
            variant=variant,
            preset=norm,
            images=images,
            tasks=task or None,
            languages=language or None,
            compat=compat,
            prefix_style=prefix_style,
            seed=seed,
        )

    # The dataset is read (and a broken file reported) before the model is loaded; it is
    # opened again in the rare case the checkpoint's config.json did not tell the variant.
    guess_variant, guess_norm = _checkpoint_hint(model)
    opened_as = (guess_variant, preset or guess_norm or "reference")
    ds = open_for(*opened_as)
    from radgrounder.modeling import load_model

    loaded = load_model(model, device=device, dtype=dtype)
    wanted = (loaded.variant, preset or loaded.config.radgrounder.get("normalization", "reference"))
    if wanted != opened_as:
        ds = open_for(*wanted)
    opts = EvalOptions(
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        mask_threshold=mask_threshold,
        compat=compat,
        matcher=matcher,
        embedding_model=str(embedding_model) if embedding_model else None,
        meteor=None if meteor == "auto" else meteor == "on",
        n_resamples=bootstrap,
        seed=seed,
        n_examples=examples,
        limit=limit,
        progress=not quiet,
        judge=judge,
    )
    run = evaluate(loaded, ds, out, opts)
    table = run.summary["metrics"].get("all", {})
    typer.echo(f"{ds.name}/{ds.split}: {run.n} samples scored")
    for name, v in table.items():
        typer.echo(f"  {name:<30} {v['mean']:.4f}  [{v['low']:.4f}, {v['high']:.4f}]  n={v['n']}")
    typer.echo(f"report -> {run.out / 'report.html'}")
    judged = run.summary.get("judge") or {}
    judge_failed = judged.get("unparseable", 0) + judged.get("error", 0)
    if judged:
        typer.echo(
            f"judge {judged['model']}: ok {judged['ok']}, unparseable {judged['unparseable']}, "
            f"error {judged['error']} of {judged['n']} (concurrency {judged.get('concurrency')}, "
            f"{judged.get('concurrency_source')})"
        )
    if judge_failed:
        typer.echo(
            f"{judge_failed} judge item(s) failed (not scored; reasons in "
            f"{run.out / 'judge.jsonl'}); rerun the same command to retry them",
            err=True,
        )
    if run.failures:
        typer.echo(f"{len(run.failures)} sample(s) failed:", err=True)
        for f in run.failures:
            typer.echo(f"  {f['id']}: {f['error']}", err=True)
    if run.failures or judge_failed:
        raise typer.Exit(3)


@app.command(
    epilog=_example("radgrounder compare runs/eval-tiny runs/eval-tiny-50 --out compare.json")
)
def compare(
    run_a: Annotated[Path, typer.Argument(help="First evaluation run folder.")],
    run_b: Annotated[Path, typer.Argument(help="Second run folder (same dataset and split).")],
    out: Annotated[Path | None, typer.Option(help="Also write the result as JSON.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Paired differences A - B per metric on the shared samples, with a paired bootstrap
    95% CI and p-value."""
    from radgrounder.evaluation.compare import compare_runs
    from radgrounder.fileio import atomic_write_json

    _check_input(run_a, folder=True)
    _check_input(run_b, folder=True)
    if out is not None:
        _check_output(out, "--out", folder=False)
    result = compare_runs(run_a, run_b, n_resamples=bootstrap, seed=seed)
    typer.echo(f"{result['n_shared']} shared samples; A = {run_a}, B = {run_b}")
    for subset, metrics in result["metrics"].items():
        typer.echo(f"[{subset}]")
        for name, v in metrics.items():
            typer.echo(
                f"  {name:<30} A {v['a']:.4f}  B {v['b']:.4f}  A-B {v['diff']:+.4f} "
                f"[{v['low']:+.4f}, {v['high']:+.4f}]  p={v['p_value']:.4f}"
            )
    if out:
        atomic_write_json(out, result)
        typer.echo(f"-> {out}")


_PREDICT_EXAMPLE = (
    "radgrounder predict --model runs/tiny/final data/totalseg_example/example_ct_dicom "
    "--all-slices --task grounded-report --language de --out predictions"
)


@app.command(epilog=_example(_PREDICT_EXAMPLE))
def predict(
    input_path: Annotated[
        Path, typer.Argument(help="DICOM file, DICOM series folder, NIfTI or PNG/JPG.")
    ],
    model: Annotated[str, typer.Option(help="Checkpoint folder (or hub id in the local cache).")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    task: Annotated[
        str, typer.Option(help="report, grounded-report, vqa, detect or segment.")
    ] = "grounded-report",
    slice_index: Annotated[
        int | None, typer.Option("--slice", help="Slice index (default: the middle one).")
    ] = None,
    all_slices: Annotated[
        bool, typer.Option(help="Every slice, plus a 3-D summary (series.json).")
    ] = False,
    window: Annotated[str, typer.Option(help="Display window of the overlays.")] = "soft_tissue",
    language: Annotated[str, typer.Option(help="en or de.")] = "en",
    question: Annotated[str | None, typer.Option(help="The question (task vqa).")] = None,
    structures: Annotated[
        str | None, typer.Option(help="Comma-separated structures (tasks detect/segment).")
    ] = None,
    clinical_info: Annotated[str | None, typer.Option(help="Clinical information.")] = None,
    clinical_question: Annotated[str | None, typer.Option(help="Clinical question.")] = None,
    series_uid: Annotated[
        str | None, typer.Option(help="The series to read from a folder that holds several.")
    ] = None,
    modality: Annotated[
        str | None, typer.Option(help="CT or MR, overriding the tag, sidecar or inference.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length limit.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Slices per batch.")] = 8,
    max_prompt_tokens: Annotated[
        int,
        typer.Option(help="Longest prompt (question + clinical fields) in tokens."),
    ] = 256,
    export: Annotated[
        str | None, typer.Option(help="dicom-seg or dicom-sr (needs the dicom extra).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ...")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16.")] = None,
    archive: Annotated[
        bool,
        typer.Option(
            "--archive",
            help="Treat the folder as an archive even when it holds one series "
            "(OUT/<key>/ per scan, OUT/manifest.jsonl).",
        ),
    ] = False,
    include: Annotated[
        list[str] | None,
        typer.Option(help="Archive: only files whose relative path matches this glob."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Archive: the first N scans.")] = None,
    executor: Annotated[str, typer.Option(help="Archive: local or ray.")] = "local",
    workers: Annotated[
        int | None,
        typer.Option(help="Archive on Ray: model actors (default: one per GPU, else one)."),
    ] = None,
) -> None:
    """Run a model on a scan: predictions.jsonl, one overlay PNG per slice, mask PNGs,
    series.json for several slices, optionally a DICOM SEG/SR referencing the series.

    Given a folder tree that holds more than one scan (DICOM series, NIfTI volumes,
    pictures; or any folder with --archive), every scan is predicted on all slices into
    OUT/<key>/, with OUT/manifest.jsonl listing each scan's status; a rerun resumes."""
    # The paths first: they need no import of the (slow to import) model code.
    _check_input(input_path)
    _check_output(out, "--out")
    _check_model(model)
    _choice("--executor", executor, ("local", "ray"))
    for name, value in (("--workers", workers), ("--limit", limit)):
        if value is not None:
            _at_least(name, value, 1)
    found = None
    if input_path.is_dir() and series_uid is None:
        from radgrounder.inference.archive import discover

        found = discover(input_path, include=include or (), exclude_dirs=[out])
        one_series = len(found.jobs) == 1 and found.jobs[0].kind == "dicom-series"
        if one_series and not archive and not include and limit is None:
            found = None
    elif archive:
        raise typer.BadParameter("--archive needs a folder (and no --series-uid)")
    if found is None and (include or limit is not None or executor != "local" or workers):
        raise typer.BadParameter(
            "--include, --limit, --executor and --workers apply to an archive folder "
            "(see --archive)"
        )
    from radgrounder.imaging import WINDOWS
    from radgrounder.inference import LANGUAGES, TASKS
    from radgrounder.inference.outputs import EXPORTS, run_predict

    _choice("--task", task, tuple(dict.fromkeys(t for ts in TASKS.values() for t in ts)))
    _choice("--language", language, LANGUAGES)
    _choice("--window", window, tuple(WINDOWS))
    _choice("--export", export, EXPORTS, optional=True)
    if slice_index is not None and all_slices:
        raise typer.BadParameter("--slice and --all-slices exclude each other")
    _at_least("--batch-size", batch_size, 1)
    _at_least("--max-new-tokens", max_new_tokens, 1)
    _at_least("--max-prompt-tokens", max_prompt_tokens, 1)
    _check_dtype(dtype)
    _check_device(device)
    if found is not None:
        if slice_index is not None or export is not None:
            raise typer.BadParameter("--slice and --export apply to one scan, not an archive")
        _predict_archive(
            model, input_path, out, task=task, language=language, modality=modality,
            window=window, max_new_tokens=max_new_tokens, question=question,
            structures=structures, clinical_info=clinical_info,
            clinical_question=clinical_question, include=include or (), limit=limit,
            executor=executor, workers=workers, batch_size=batch_size, device=device,
            dtype=dtype, max_prompt_tokens=max_prompt_tokens, found=found,
        )  # fmt: skip
        return
    # The model is loaded on the first prediction, after the scan has been read and checked.
    predictor = _LazyPredictor(
        model,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
    )
    run = run_predict(
        predictor,
        input_path,
        out,
        task=task,
        language=language,
        slice_index=slice_index,
        all_slices=all_slices,
        window=window,
        export=export,
        max_new_tokens=max_new_tokens,
        series_uid=series_uid,
        modality=modality,
        question=question,
        structures=[s.strip() for s in structures.split(",") if s.strip()] if structures else None,
        clinical_info=clinical_info,
        clinical_question=clinical_question,
    )
    _warn(run.warnings)
    typer.echo(f"{run.n} prediction(s) -> {_printable(str(run.out))}")
    for name, path in run.files.items():
        dropped = f" ({run.export_dropped} empty left out)" if name == export else ""
        typer.echo(f"  {name}: {_printable(str(path))}{dropped if run.export_dropped else ''}")


def _predict_archive(
    model: str,
    archive: Path,
    out: Path,
    *,
    structures: str | None,
    include: Sequence[str],
    limit: int | None,
    executor: str,
    workers: int | None,
    batch_size: int,
    device: str | None,
    dtype: str | None,
    max_prompt_tokens: int,
    found: Any,
    **settings: Any,
) -> None:
    from radgrounder.inference.archive import ArchiveSettings, predict_archive

    names = tuple(x.strip() for x in structures.split(",") if x.strip()) if structures else None
    opts = ArchiveSettings(structures=names, **settings)
    shown = min(len(found.jobs), limit) if limit else len(found.jobs)
    typer.echo(f"archive: {shown} scan(s) in {_printable(str(archive))} -> {_printable(str(out))}")

    def on_job(line: dict[str, Any]) -> None:
        if line["status"] == "failed":
            where = ", ".join(line["sources"])
            typer.echo(f"failed: {line['key']} ({where}): {_one_line(line['reason'])}", err=True)

    report = predict_archive(
        model, archive, out, opts, include=include, limit=limit, executor=executor,
        workers=workers, batch_size=batch_size, device=device, dtype=dtype,
        max_prompt_tokens=max_prompt_tokens, progress=sys.stderr.isatty(), on_job=on_job,
        found=found,
    )  # fmt: skip
    for key, notes in report.warnings.items():
        _warn(notes, f"{key}: ")
    typer.echo(
        f"scans done {report.done}, resumed {report.resumed}, failed {len(report.failed)}, "
        f"skipped files {report.skipped}; model loads {report.model_loads}"
        + (f", batch fill {report.batch_fill:.0%}" if report.batch_fill is not None else "")
        + f"; {report.seconds:.1f} s -> {_printable(str(out / 'manifest.jsonl'))}"
    )
    if report.failed:
        raise typer.Exit(3)


@app.command(epilog=_example("radgrounder serve --model runs/tiny/final --port 8000"))
def serve(
    model: Annotated[str, typer.Option(help="Checkpoint folder (or hub id in the local cache).")],
    host: Annotated[
        str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the bearer token (mode 600). Or set RADGROUNDER_TOKEN."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="RADGROUNDER_TOKEN",
            show_envvar=True,
            help="Bearer token; prefer the environment variable or --token-file: "
            "a value on the command line is visible to every user in ps.",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Another Host name to answer to (repeatable; '*' for any)."),
    ] = None,
    insecure_no_token: Annotated[
        bool, typer.Option(help="Allow a non-loopback --host without a token.")
    ] = False,
    max_upload_mb: Annotated[int, typer.Option(help="Largest accepted upload (MiB).")] = 512,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="Longest prompt (question + clinical fields), in tokens.")
    ] = 256,
    max_queue: Annotated[
        int, typer.Option(help="Slices waiting for the model before 503 + Retry-After.")
    ] = 64,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds from admission to answer before 504.")
    ] = 300.0,
    max_concurrent_uploads: Annotated[
        int, typer.Option(help="Uploads received at once before 503.")
    ] = 4,
    study_storage_mb: Annotated[
        int, typer.Option(help="Disk for stored studies (MiB; least recently used evicted).")
    ] = 4096,
    study_ttl: Annotated[
        float, typer.Option(help="Seconds a stored study lives without use.")
    ] = 1800.0,
    max_connections: Annotated[int, typer.Option(help="Open connections before 503.")] = 256,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ...")] = None,
) -> None:
    """Serve the REST API (OpenAPI at /docs) and the grounded web viewer at /."""
    from radgrounder.serve.app import read_token_file
    from radgrounder.serve.app import serve as run_server
    from radgrounder.serve.limits import MiB, ServeLimits

    if token_file is not None:
        if token:
            raise RadGrounderError("give the token once: --token-file or RADGROUNDER_TOKEN/--token")
        token = read_token_file(token_file)
    elif token and any(a == "--token" or a.startswith("--token=") for a in sys.argv[1:]):
        typer.echo(
            "radgrounder: warning: --token on the command line is visible to every user "
            "(ps, /proc); use RADGROUNDER_TOKEN or --token-file",
            err=True,
        )
    try:
        limits = ServeLimits(
            max_upload_bytes=max_upload_mb * MiB,
            max_prompt_tokens=max_prompt_tokens,
            max_queued_items=max_queue,
            request_timeout_s=request_timeout,
            max_concurrent_uploads=max_concurrent_uploads,
            study_storage_bytes=study_storage_mb * MiB,
            study_ttl_s=study_ttl,
            max_connections=max_connections,
        )
    except ValueError as exc:
        raise RadGrounderError(str(exc)) from None
    _check_device(device)
    run_server(
        model,
        host=host,
        port=port,
        token=token,
        max_upload_mb=max_upload_mb,
        device=device,
        limits=limits,
        allowed_hosts=allowed_host or (),
        insecure_no_token=insecure_no_token,
    )


def _fail(message: str, code: int) -> NoReturn:
    print(f"radgrounder: error: {_one_line(_printable(message))}", file=sys.stderr)
    sys.exit(code)


def _usage_message(exc: Any) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _os_error_message(exc: OSError) -> str:
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    where = " -> ".join(_shown(os.fsdecode(n)) for n in names)
    return f"{where}: {_os_reason(exc)}" if where else _os_reason(exc)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error is one line on stderr, ``radgrounder: error: ...``,
    with exit code 2 for a usage error (unknown option, missing or malformed value) and 1
    for bad input (a missing, unreadable or broken file, a bad setting). Commands exit 3
    when some items of a batch failed (they list them)."""
    try:
        code = app(args=argv, prog_name="radgrounder", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except RadGrounderError as exc:
        _fail(str(exc), 1)
    except _EXITS as exc:
        sys.exit(exc.exit_code)
    except _NO_ARGS_HELP as exc:  # a bare group name: its help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except _USAGE_ERRORS as exc:
        _fail(_usage_message(exc), exc.exit_code)
    except _CLICK_ERRORS as exc:
        _fail(exc.format_message(), exc.exit_code)
    except (*_ABORTS, KeyboardInterrupt):
        print("radgrounder: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # stdout went away (| head): point it at /dev/null so the exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:
        if exc.errno not in _PATH_ERRNOS:
            raise
        _fail(_os_error_message(exc), 1)


if __name__ == "__main__":
    main()
