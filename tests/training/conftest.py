"""Shared training fixtures: a small built dataset and config overrides for the tiny model."""

import json

import pytest

from tests.conftest import REPO

TINY = REPO / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    from radgrounder.labels.build import BuildOptions, build_dataset
    from tests.labels.test_build import REPORTS, small_layout

    root = tmp_path_factory.mktemp("train-ds")
    scans, labels = small_layout(root, ids=("ct_upper_abdomen", "ct_dicom_series"))
    build_dataset(
        scans, labels, REPORTS, root / "ds", BuildOptions(splits=(0.5, 0, 0.5)), progress=False
    )
    return root / "ds"


def overrides(dataset, out, *extra):
    return [
        f"output_dir={out}",
        "data.build.out=null",
        f"data.sources.0.path={dataset}",
        f"data.sources.1.path={dataset}",
        f"data.eval_sources.0.path={dataset}",
        "global_batch_size=2",
        "batch_size=2",
        "max_target_tokens=24",
        "eval_samples=4",
        "eval_batch_size=4",
        "log_every=1",
        "model.init=tiny",
        "data.num_workers=0",
        *extra,
    ]


def records(out):
    lines = (out / "logs" / "train.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def losses(out):
    return [(r["step"], r["loss"]) for r in records(out) if "loss" in r]
