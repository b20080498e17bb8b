"""The ``radgrounder`` command line: thin wrappers over the library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from radgrounder.errors import RadGrounderError

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


@app.command(epilog=_example("radgrounder inspect data/totalseg_example/example_ct_dicom"))
def inspect(
    path: Annotated[
        Path, typer.Argument(help="DICOM file, DICOM series folder, NIfTI or PNG/JPG.")
    ],
    modality: Annotated[str | None, typer.Option(help="Override the modality (CT or MR).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print modality, shape, voxel spacing, orientation, value range and slice count."""
    from radgrounder.imaging import inspect_scan

    info = inspect_scan(path, modality=modality)
    data = info.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    rows = [
        ("path", data["path"]),
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


@app.command(epilog=_example("radgrounder demo --out demo_output"))
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the overlays and JSON.")] = Path(
        "demo_output"
    ),
) -> None:
    """Run the bundled-data demo: inspect the example scans and draw grounded slices."""
    from radgrounder.demo import run_demo

    run_demo(out)


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

    unified = unify_label_volume(read_label_map(label_map), label_task=label_task)
    lines = [
        json.dumps(r.to_dict(), separators=(",", ":"))
        for r in extract_regions(unified, axis=axis, min_area=min_area)
    ]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    n = sum(1 for line in lines if '"classes":[]' not in line)
    typer.echo(f"{len(lines)} slices ({n} with structures) -> {out}")


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
    concurrency: Annotated[int, typer.Option(help="LLM requests in flight.")] = 8,
    max_retries: Annotated[int, typer.Option(help="LLM retries per sentence.")] = 5,
    backoff: Annotated[float, typer.Option(help="First LLM retry delay, seconds.")] = 1.0,
    timeout: Annotated[float, typer.Option(help="LLM request timeout, seconds.")] = 60.0,
    text_mode: Annotated[
        str, typer.Option(help="reference (clean_punctuation, as trained) or raw.")
    ] = "reference",
) -> None:
    """Find anatomy mentions (with negation) in every report sentence."""
    from radgrounder.fileio import atomic_write_bytes
    from radgrounder.labels.keywords import extract_keywords, sentence_items
    from radgrounder.labels.reports import read_reports

    items = sentence_items(read_reports(reports), text_mode=text_mode)
    llm = (
        {
            "concurrency": concurrency,
            "max_retries": max_retries,
            "backoff": backoff,
            "timeout": timeout,
        }
        if backend == "llm"
        else {}
    )
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
    workers: Annotated[int, typer.Option(help="Scans processed in parallel.")] = 1,
    executor: Annotated[str, typer.Option(help="local (process pool) or ray.")] = "local",
    export: Annotated[str | None, typer.Option(help="Also write another layout: refrad2d.")] = None,
) -> None:
    """Scans + label maps + reports -> a grounded bilingual dataset (resumable)."""
    from radgrounder.labels.build import BuildOptions, build_dataset

    try:
        fractions = tuple(float(x) for x in split.split(","))
    except ValueError:
        raise typer.BadParameter(f"--split: expected three numbers, got {split!r}") from None
    if export not in (None, "refrad2d"):
        raise typer.BadParameter(f"--export: unknown layout {export!r} (refrad2d)")
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
        llm={"endpoint": endpoint, "model": model} if backend == "llm" else {},
    )
    report = build_dataset(scans, labels, reports, out, opts)
    counts = report.manifest["counts"]
    typer.echo(
        f"scans built {len(report.done)}, resumed {len(report.skipped)}, failed "
        f"{len(report.failed)}; samples {counts['samples']} -> {out}"
    )
    for scan, error in report.failed.items():
        typer.echo(f"failed: {scan}: {error}", err=True)
    if export == "refrad2d":
        from radgrounder.labels.export_refrad2d import export_refrad2d

        written = export_refrad2d(out, out / "refrad2d")
        typer.echo(f"refrad2d export: {written} -> {out / 'refrad2d'}")
    if report.failed:
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
        raise typer.BadParameter(f"--layout: unknown layout {layout!r} (refrad2d)")
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
) -> None:
    """Write a randomly initialised model of the real classes plus its tokenizer."""
    from radgrounder.modeling import init_model

    path = init_model(size, variant, out, seed=seed)
    typer.echo(f"{size} {variant} model -> {path}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=_example("radgrounder train configs/tiny-cpu.yaml output_dir=runs/tiny max_steps=50"),
)
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="Training config (YAML).")],
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train or fine-tune; extra key=value arguments override the config (dotted keys)."""
    from radgrounder.training import load_config
    from radgrounder.training import train as run_training

    cfg = load_config(config, list(ctx.args))
    result = run_training(cfg, progress=not quiet)
    msg = f"trained {result.steps} steps, last loss {result.last_loss:.4f}"
    if result.eval_loss is not None:
        msg += f", held-out loss {result.eval_loss:.4f}"
    typer.echo(f"{msg}; final model -> {result.final_dir}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 1."""
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except RadGrounderError as exc:
        print(f"radgrounder: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("radgrounder: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
