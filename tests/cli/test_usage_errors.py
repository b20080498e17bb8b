"""Every usage error and bad input is one line on stderr (issue #14).

``radgrounder: error: ...`` and exit code 2 for a usage error (unknown option, missing or
malformed value), 1 for bad input (a missing, unreadable or broken file, a bad setting); no
traceback, and no expensive work (model load, initial checkpoint, dataset build) before the
inputs and the output folder are checked. A bad file name in a batch is one failed item.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from radgrounder.cli import main
from tests.conftest import EXAMPLES, REPO

CT = EXAMPLES / "example_ct_sm.nii.gz"
LAYOUT = EXAMPLES / "layout"
REPORTS = EXAMPLES / "reports.jsonl"
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
LONG = "/tmp/" + "a" * (os.pathconf("/", "PC_PATH_MAX") + 10)
BAD_BYTES = b"scan_\xff.nii.gz"
BUILD = ("labels", "build", "--scans", LAYOUT / "scans", "--labels", LAYOUT / "labels")


def cli(capsys, *args) -> tuple[int, str, str]:
    """``radgrounder *args`` in this process: (exit code, stdout, stderr)."""
    try:
        main([os.fspath(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_error(result: tuple[int, str, str], code: int, *needles: str) -> str:
    got, _, err = result
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("radgrounder: error: "), line
    assert got == code, (got, line)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from radgrounder.modeling import init_model

    return init_model("tiny", "detection", tmp_path_factory.mktemp("cli-model") / "m", seed=0)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the command must stop before it."""

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    import radgrounder.inference
    import radgrounder.modeling

    monkeypatch.setattr(radgrounder.modeling, "load_model", boom, raising=False)
    monkeypatch.setattr(radgrounder.inference, "Predictor", boom)


def non_utf8(folder: Path, name: bytes = BAD_BYTES, data: bytes = b"") -> Path:
    """A file in ``folder`` whose name is not valid UTF-8."""
    raw = os.path.join(os.fsencode(folder), name)
    with open(raw, "wb") as fh:
        fh.write(data)
    return Path(os.fsdecode(raw))


# -- usage errors: exit 2 ----------------------------------------------------------------


def test_usage_errors(capsys, tmp_path, model):
    scans = ("--scans", LAYOUT / "scans", "--labels", LAYOUT / "labels", "--reports", REPORTS)
    ev = ("eval", "--model", model, "--dataset", "slake", "--data-root", tmp_path)
    cases = [
        (["inspect", CT, "--bogus"], "--bogus"),
        (["labels", "build", "--bogus"], "--bogus"),
        (["predict", CT, "--out", tmp_path / "p"], "--model"),
        (["inspect"], "'path'"),
        ([*ev, "--out", tmp_path / "e", "--batch-size", "x"], "--batch-size"),
        (["frobnicate"], "frobnicate"),
        (["model", "init", tmp_path / "m", "--seed", "1.5"], "--seed"),
        (["labels", "build", *scans, "--out", tmp_path / "b", "--split", "a,b"], "--split"),
        ([*ev, "--out", tmp_path / "e", "--split", "a,b"], "--split"),
        ([*ev, "--out", tmp_path / "e", "--meteor", "maybe"], "--meteor"),
        (["eval", *ev[1:4], "nope", "--data-root", tmp_path, "--out", tmp_path / "e"], "--dataset"),
        (["predict", CT, "--model", model, "--out", tmp_path / "p", "--task", "x"], "--task"),
        (
            ["predict", CT, "--model", model, "--out", tmp_path / "p", "--batch-size", "0"],
            "--batch",
        ),
    ]
    for args, needle in cases:
        one_error(cli(capsys, *args), 2, needle)
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()
    assert not (tmp_path / "b").exists() and not (tmp_path / "m").exists()


def test_help_still_works(capsys):
    code, out, err = cli(capsys, "predict", "--help")
    assert code == 0 and err == ""
    assert out.strip().splitlines()[-1].strip().startswith("radgrounder predict --model")
    code, out, err = cli(capsys, "labels", "build", "--help")
    assert code == 0 and "Example:" in out
    code, _, err = cli(capsys)  # no command: the help, as click shows it, and no traceback
    assert code == 2 and "Usage: radgrounder" in err and "Traceback" not in err


# -- bad input paths: exit 1 --------------------------------------------------------------


def test_missing_inputs_are_named(capsys, tmp_path, model, no_model_load):
    nope = tmp_path / "nope.nii.gz"
    cases = [
        ["inspect", nope],
        ["predict", nope, "--model", model, "--out", tmp_path / "p"],
        ["eval", "--model", model, "--dataset", "slake", "--data-root", nope, "--out", tmp_path],
        ["labels", "regions", nope, "--out", tmp_path / "r.jsonl"],
        ["labels", "keywords", nope, "--out", tmp_path / "k.jsonl"],
        [*BUILD[:3], nope, *BUILD[4:], "--reports", REPORTS, "--out", tmp_path / "b"],
        [*BUILD, "--reports", nope, "--out", tmp_path / "b"],
        ["labels", "segment", nope, tmp_path / "s"],
        ["labels", "export", nope, tmp_path / "x"],
        ["compare", nope, tmp_path],
        ["train", nope],
        ["serve", "--model", model, "--token-file", nope],
    ]
    for args in cases:
        one_error(cli(capsys, *args), 1, "nope.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_predict_checks_the_input_before_loading_the_model(capsys, tmp_path, no_model_load):
    nope = tmp_path / "nope.nii.gz"
    t0 = time.perf_counter()
    line = one_error(
        cli(capsys, "predict", nope, "--model", tmp_path / "no-model", "--out", tmp_path / "o"),
        1,
        "nope.nii.gz",
    )
    assert time.perf_counter() - t0 < 10
    assert "no-model" not in line
    # a broken scan is read (and refused) before the model is loaded as well
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(CT.read_bytes()[:2000])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    one_error(cli(capsys, "predict", broken, "--model", model_dir, "--out", tmp_path / "o"), 1)
    # and a local --model that does not exist is named before anything is read
    one_error(
        cli(capsys, "predict", CT, "--model", tmp_path / "no-model", "--out", tmp_path / "o"),
        1,
        "no-model",
    )
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_or_a_folder(capsys, tmp_path, model, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    label_map = LAYOUT / "labels" / "ct_upper_abdomen.nii.gz"
    cases = [
        (["predict", CT, "--model", model, "--out", afile], "exists and is not a folder"),
        (["predict", CT, "--model", model, "--out", afile / "sub"], "is not a folder"),
        (
            [
                "eval",
                "--model",
                model,
                "--dataset",
                "slake",
                "--data-root",
                tmp_path,
                "--out",
                afile,
            ],
            "exists and is not a folder",
        ),
        ([*BUILD, "--reports", REPORTS, "--out", afile], "exists and is not a folder"),
        (["model", "init", afile], "not a folder"),
        (["labels", "regions", label_map, "--out", tmp_path], "is a folder"),
        (["labels", "keywords", REPORTS, "--out", tmp_path], "is a folder"),
        (["demo", "--out", afile], "exists and is not a folder"),
    ]
    for args, needle in cases:
        line = one_error(cli(capsys, *args), 1, needle)
        assert "--out" in line or str(afile) in line
    assert afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_out_in_an_unwritable_folder(capsys, tmp_path, model, no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a mode-500 folder is still writable")
        label_map = LAYOUT / "labels" / "ct_upper_abdomen.nii.gz"
        for args in (
            ["predict", CT, "--model", model, "--out", locked / "o"],
            ["labels", "regions", label_map, "--out", locked / "r.jsonl"],
            [*BUILD, "--reports", REPORTS, "--out", locked / "b"],
            ["model", "init", locked / "m"],
        ):
            one_error(cli(capsys, *args), 1, "not writable", str(locked))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_a_path_longer_than_path_max(capsys, tmp_path, model, no_model_load):
    label_map = LAYOUT / "labels" / "ct_upper_abdomen.nii.gz"
    for args in (
        ["inspect", LONG],
        ["predict", LONG, "--model", model, "--out", tmp_path / "o"],
        ["predict", CT, "--model", model, "--out", LONG],
        ["labels", "regions", label_map, "--out", LONG + "/r.jsonl"],
        ["train", LONG],
    ):
        line = one_error(cli(capsys, *args), 1, "/tmp/aaaa", "characters")
        assert len(line) < 400  # the path is shortened in the message
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_while_working_is_one_line(capsys, tmp_path, monkeypatch):
    """The last line of defence: an OS error about a path, raised mid-command."""
    import radgrounder.labels.regions as regions

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/somewhere/r.jsonl")

    monkeypatch.setattr(regions, "extract_regions", denied)
    label_map = LAYOUT / "labels" / "ct_upper_abdomen.nii.gz"
    result = cli(capsys, "labels", "regions", label_map, "--out", tmp_path / "r.jsonl")
    one_error(result, 1, "/somewhere/r.jsonl", "Permission denied")


# -- broken evaluation data: exit 1, before the model is loaded ---------------------------


def test_eval_broken_dataset_files(capsys, tmp_path, model, no_model_load):
    slake = tmp_path / "slake"
    (slake / "imgs").mkdir(parents=True)
    (slake / "test.json").write_text("{not json")
    fields = tmp_path / "slake-fields"
    (fields / "imgs").mkdir(parents=True)
    (fields / "test.json").write_text(json.dumps([{"question": "q"}]))
    built = tmp_path / "built"
    (built / "samples" / "test").mkdir(parents=True)
    (built / "manifest.json").write_text("{}")
    (built / "samples" / "test" / "scan.parquet").write_bytes(b"PAR1 not really parquet")
    manifest = tmp_path / "built-manifest"
    manifest.mkdir()
    (manifest / "manifest.json").write_text("{broken")
    refrad = tmp_path / "refrad"
    refrad.mkdir()
    (refrad / "refrad2d_reports.parquet").write_bytes(b"PAR1garbage")
    cases = [
        ("slake", slake, "test.json", "not valid JSON"),
        ("slake", fields, "test.json", "img_name"),
        ("built", built, "scan.parquet", "Parquet"),
        ("built", manifest, "manifest.json", "not valid JSON"),
        ("refrad2d", refrad, "refrad2d_reports.parquet", "reports table"),
    ]
    for name, root, file, needle in cases:
        result = cli(
            capsys,
            *("eval", "--model", model, "--dataset", name, "--data-root", root),
            *("--out", tmp_path / "run"),
        )
        one_error(result, 1, file, needle)
    assert not (tmp_path / "run").exists()
    # labels export reads the same dataset layer: the same one line.
    for root, file, needle in ((manifest, "manifest.json", "not valid JSON"),
                               (built, "scan.parquet", "Parquet")):  # fmt: skip
        one_error(cli(capsys, "labels", "export", root, tmp_path / "x"), 1, file, needle)


# -- train: config and override errors, nothing written ------------------------------------


def test_train_config_errors_write_nothing(capsys, tmp_path):
    broken_ds = tmp_path / "ds"
    broken_ds.mkdir()
    (broken_ds / "manifest.json").write_text("{broken")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: [1, 2\n")
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- 1\n- 2\n")
    out = tmp_path / "run"
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = [
        f"output_dir={out}",
        "data.build.out=null",
        "model.init=tiny",
        "max_steps=1",
        "data.num_workers=0",
        *(f"data.{k}.path={broken_ds}" for k in ("sources.0", "sources.1", "eval_sources.0")),
    ]
    cases = [
        (TINY_CONFIG, ["foo=1"], "config.foo: unknown setting"),
        (TINY_CONFIG, ["model.foo=1"], "config.model.foo"),
        (TINY_CONFIG, ["max_steps=abc"], "config.max_steps"),
        (TINY_CONFIG, ["max_steps"], "expected key=value"),
        (TINY_CONFIG, ["optim.betas=0.9"], "config.optim.betas"),
        (TINY_CONFIG, ["model=3"], "config.model"),
        (TINY_CONFIG, ["data.sources.7.path=x"], "data.sources has 2 entries"),
        (TINY_CONFIG, ["data.sources.name=x"], "data.sources is a list"),
        (TINY_CONFIG, ["eval_every=0"], "config.eval_every"),
        (TINY_CONFIG, ["log_every=0"], "config.log_every"),
        (TINY_CONFIG, ["model.dtype=float16"], "config.model.dtype"),
        (TINY_CONFIG, ["data.preset=foo"], "config.data.preset"),
        (TINY_CONFIG, ["data.sources.0.tasks=[foo]"], "config.data.sources[0].tasks"),
        (TINY_CONFIG, ["data.sources.0.languages=[xx]"], "config.data.sources[0].languages"),
        (TINY_CONFIG, ["data.sources.0.split=foo"], "config.data.sources[0].split"),
        (TINY_CONFIG, ["data.sources=[]"], "config.data.sources"),
        (TINY_CONFIG, [f"output_dir={afile}"], "config.output_dir"),
        (TINY_CONFIG, ["model.siglip_checkpoint=/nonexistent.pt"], "siglip_checkpoint"),
        (TINY_CONFIG, ["model.path=./no-such-model"], "config.model.path"),
        (TINY_CONFIG, ["data.sources.0.path=/nonexistent"], "/nonexistent"),
        (TINY_CONFIG, [], "manifest.json"),  # the dataset is read before the model is made
        (bad_yaml, [], "invalid YAML (line 2"),
        (a_list, [], "expected a mapping"),
    ]
    for config, extra, needle in cases:
        one_error(cli(capsys, "train", config, *base, *extra), 1, needle)
        assert not out.exists(), (extra, sorted(p.name for p in out.iterdir()))
    assert afile.read_text() == "x"


# -- batches: one bad file name is one failed item -----------------------------------------


def test_labels_build_lists_a_non_utf8_name_and_builds_the_rest(capsys, tmp_path):
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    scans.mkdir()
    labels.mkdir()
    for sid in ("ct_upper_abdomen", "ct_dicom_series"):
        (labels / f"{sid}.nii.gz").symlink_to(LAYOUT / "labels" / f"{sid}.nii.gz")
    (scans / "ct_upper_abdomen.nii.gz").symlink_to(LAYOUT / "scans" / "ct_upper_abdomen.nii.gz")
    non_utf8(scans, data=(LAYOUT / "scans" / "ct_upper_abdomen.nii.gz").read_bytes())
    # a DICOM series with one member whose name is not UTF-8
    series = scans / "ct_dicom_series"
    shutil.copytree(LAYOUT / "scans" / "ct_dicom_series", series, symlinks=False)
    first = sorted(series.iterdir())[0]
    non_utf8(series, b"member_\xfe.dcm", first.read_bytes())
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys,
        *("labels", "build", "--scans", scans, "--labels", labels),
        *("--reports", REPORTS, "--out", out),
    )
    assert code == 3, err
    assert "Traceback" not in err
    assert "scans built 1" in stdout and "failed 2" in stdout
    failed_lines = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed_lines) == 2, err
    assert any("scan_\\xff" in line and "not valid UTF-8" in line for line in failed_lines)
    assert any("member_\\xfe.dcm" in line for line in failed_lines)
    report = json.loads((out / "build_report.json").read_text(encoding="utf-8"))
    assert set(report["failed_scans"]) == {"scan_\\xff", "ct_dicom_series"}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["sources"]) == {"ct_upper_abdomen"}
    assert not list((out / "state" / "scans").glob("scan_*"))


def test_labels_segment_lists_a_non_utf8_name(tmp_path):
    from functools import partial

    from radgrounder.labels.segment import run_segmentation
    from tests.labels.test_segment import fake_segmenter

    root = tmp_path / "in"
    root.mkdir()
    shutil.copyfile(CT, root / "good.nii.gz")
    non_utf8(root, data=CT.read_bytes())
    seg = partial(fake_segmenter, log=tmp_path / "calls.jsonl")
    report = run_segmentation(root, tmp_path / "out", segmenter=seg, progress=False)
    assert report.done == ["good"]
    assert list(report.failed) == ["scan_\\xff"]
    assert "not valid UTF-8" in report.failed["scan_\\xff"]
    written = json.loads(report.report_path.read_text(encoding="utf-8"))
    assert [f["scan"] for f in written["failed"]] == ["scan_\\xff"]


def test_predict_refuses_a_non_utf8_name_before_writing_anything(capsys, tmp_path, model):
    scan = non_utf8(tmp_path, data=CT.read_bytes())
    out = tmp_path / "pred"
    line = one_error(
        cli(capsys, "predict", scan, "--model", model, "--out", out, "--max-new-tokens", "4"),
        1,
        "scan_\\xff.nii.gz",
        "not valid UTF-8",
    )
    assert "\udcff" not in line
    assert not out.exists()
    one_error(cli(capsys, "inspect", scan), 1, "scan_\\xff.nii.gz")


# -- what the docs walkthrough found (issue #19) ---------------------------------------------


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_one_line_naming_the_torch_build(capsys, tmp_path, model):
    import torch

    for args in (
        ("predict", CT, "--model", model, "--out", tmp_path / "p", "--device", "cuda"),
        ("eval", "--model", model, "--dataset", "vqa-rad", "--data-root", tmp_path,
         "--out", tmp_path / "e", "--device", "cuda:1"),
        ("serve", "--model", model, "--device", "cuda"),
    ):  # fmt: skip
        line = one_error(cli(capsys, *args), 1, "--device cuda", f"torch {torch.__version__}")
        assert "--device cpu" in line
    assert not (tmp_path / "p").exists()


def test_model_init_into_an_existing_model_names_the_option(capsys, tmp_path):
    assert cli(capsys, "model", "init", tmp_path / "m")[0] == 0
    one_error(cli(capsys, "model", "init", tmp_path / "m"), 1, "--overwrite")
    code, out, _ = cli(capsys, "model", "init", tmp_path / "m", "--overwrite", "--seed", "1")
    assert code == 0 and "tiny detection model" in out


def test_a_typo_in_a_local_model_path_is_not_looked_up_on_the_hub(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    one_error(cli(capsys, "predict", CT, "--model", "runs/tyop/final", "--out", "o"), 1,
              "--model runs/tyop/final: no such checkpoint folder")  # fmt: skip


def test_training_past_max_steps_says_so(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY_CONFIG, f"output_dir={out}", "max_steps=2",
                            "save_every=1", "--quiet")  # fmt: skip
    assert code == 0, err
    one_error(cli(capsys, "train", TINY_CONFIG, f"output_dir={out}", "max_steps=1", "--quiet"),
              1, "already at step 2, past max_steps=1", "another output_dir")  # fmt: skip


def test_an_llm_endpoint_that_does_not_answer_fails_at_once(capsys, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    url = f"http://127.0.0.1:{port}/v1"
    result = cli(capsys, "labels", "keywords", REPORTS, "--out", tmp_path / "m.jsonl",
                 "--backend", "llm", "--endpoint", url, "--model", "x")  # fmt: skip
    one_error(result, 1, "cannot connect", "is the server running")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "m.jsonl").exists()
