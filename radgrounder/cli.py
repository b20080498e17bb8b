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
    return f"Example:\n\n    {text}"


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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 1."""
    try:
        app(args=argv, standalone_mode=False)
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
