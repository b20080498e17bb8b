"""The same YAML trains the same experiment on 1 process or 2 (DDP, FSDP, DeepSpeed ZeRO-2/3).

Real multi-process runs on CPU with gloo: DDP through ``torchrun``, FSDP and DeepSpeed through
``radgrounder.training.cpu_launch`` reading the shipped accelerate launch files (accelerate
itself runs those engines on GPUs only; see ``radgrounder.training.engine``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.training.conftest import TINY, overrides, records

pytestmark = pytest.mark.slow

LAUNCH_FILES = {
    "fsdp": REPO / "configs/accelerate/fsdp.yaml",
    "deepspeed": REPO / "configs/accelerate/multi-node-deepspeed-zero2.yaml",
    "zero3": REPO / "configs/accelerate/multi-node-deepspeed-zero3.yaml",
}
ENGINE_NAME = {"zero3": "deepspeed"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_deepspeed(engine: str) -> None:
    if engine not in ("deepspeed", "zero3"):
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise  # `make test` installs it; CI must run these engines
        pytest.skip("deepspeed is not installed (make installs it)")


def command(engine: str, procs: int, args: list[str]) -> list[str]:
    needs_deepspeed(engine)
    train = ["-m", "radgrounder", "train", str(TINY), "--quiet", *args]
    if engine == "single":
        return [sys.executable, *train]
    if engine == "ddp":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        return [*torchrun, "--master_port", str(_port()), *train]
    launch = [sys.executable, "-m", "radgrounder.training.cpu_launch"]
    return [
        *launch,
        "--config_file",
        str(LAUNCH_FILES[engine]),
        "--num_processes",
        str(procs),
        "--main_process_port",
        str(_port()),
        *train,
    ]


def env(engine: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if engine == "ddp":
        e["ACCELERATE_USE_CPU"] = "1"
    return e


def run(
    engine: str, procs: int, args: list[str], timeout: int = 400
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command(engine, procs, args),
        env=env(engine),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def train_records(out: Path) -> list[dict]:
    return [r for r in records(out) if "loss" in r]


def eval_records(out: Path) -> list[dict]:
    return [r for r in records(out) if "eval_loss" in r]


def common(dataset, out, variant: str, *extra: str) -> list[str]:
    return overrides(
        dataset,
        out,
        f"model.variant={variant}",
        "max_steps=4",
        "save_every=2",
        "eval_every=2",
        "eval_samples=6",
        "eval_batch_size=2",
        "global_batch_size=4",
        "optim.lr=0.001",
        *extra,
    )


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    """The reference: one process, the whole global batch of 4 in one micro-batch."""
    runs = {}
    for variant in ("detection", "segmentation"):
        out = tmp_path_factory.mktemp(f"one-{variant}") / "run"
        run("single", 1, common(dataset, out, variant, "batch_size=4"))
        runs[variant] = out
    return runs


def assert_same_experiment(a: Path, b: Path, *, exact: bool = False) -> None:
    ra, rb = train_records(a), train_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb, strict=True):
        assert y["optimizer_step"] == y["step"], y  # one optimizer step per step
        assert y["target_tokens"] == x["target_tokens"]
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-12)
        assert y["loss"] == (x["loss"] if exact else pytest.approx(x["loss"], rel=1e-5))
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        for key in x:
            if key.startswith(("loss/", "tokens/", "seg_loss", "masks")):
                assert y[key] == pytest.approx(x[key], rel=1e-5), key
    for x, y in zip(eval_records(a), eval_records(b), strict=True):
        assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=1e-5)
    ta, tb = (json.loads((p / "trainable.json").read_text()) for p in (a, b))
    assert (ta["parameters"], ta["trainable"]) == (tb["parameters"], tb["trainable"])
    assert (tb["processes"], tb["batch_size"], tb["grad_accum"]) == (2, 1, 2)
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("k_proj.bias") and not exact:
            # Attention is invariant to a key bias: its true gradient is 0, so Adam turns
            # float noise (1e-10) into ±lr steps that differ between any two summation orders.
            continue
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4, msg=k)


def ranks_disagree_on_masks(dataset) -> bool:
    """Whether, in the 2-process layout below, some step has one rank with masks in its
    micro-batch and the other without (the case that used to hang DDP)."""
    from radgrounder.training import load_config
    from radgrounder.training.data import Mixture, make_source

    cfg = load_config(TINY, common(dataset, "unused", "segmentation"))
    sources = [
        make_source(s, "segmentation", preset="reference", size=224) for s in cfg.data.sources
    ]
    mix = Mixture(sources, [s.weight for s in cfg.data.sources], cfg.data.temperature, cfg.seed)
    # batch_size 1, 2 processes, accumulation 2: rank r, micro m holds slot m * 2 + r.
    for step in range(1, 5):
        for micro in range(2):
            has = [bool(mix.example(step, micro * 2 + r, "random").masks) for r in range(2)]
            if has[0] != has[1]:
                return True
    return False


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "deepspeed", "zero3"])
@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_two_processes_train_the_same_experiment_as_one(
    engine, variant, dataset, one_process, tmp_path
):
    """2 processes x batch 1 x accumulation 2 == 1 process x batch 4 (global batch 4)."""
    if variant == "segmentation":
        assert ranks_disagree_on_masks(dataset), "the layout no longer exercises the mask case"
    out = tmp_path / "run"
    done = run(engine, 2, common(dataset, out, variant, "batch_size=1"))
    name = ENGINE_NAME.get(engine, engine)
    assert f"{name} x 2 process(es), global batch 4 = 1 per device x 2 x 2" in done.stdout
    assert done.stdout.count("trained 4 steps") == 1  # one summary line, from rank 0
    assert_same_experiment(one_process[variant], out)


def test_zero3_ranks_calling_the_lm_head_different_numbers_of_times(dataset, one_process, tmp_path):
    """With 3 target positions per LM-head chunk the two ranks' micro-batches and held-out
    batches need different numbers of head calls; ZeRO-3 checks that the ranks' module call
    sequences agree and waited forever on that (tiny-cpu.yaml's own eval batches of 16 hit it
    with the default chunk). Every rank now makes the most calls any rank needs: the same
    experiment as one process."""
    out = tmp_path / "run"
    args = common(dataset, out, "detection", "batch_size=1", "loss_chunk_tokens=3")
    run("zero3", 2, args, timeout=300)
    assert_same_experiment(one_process["detection"], out)


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    ("engine", "extra"),
    [
        ("ddp", ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.3"]),
        ("fsdp", []),
        ("deepspeed", []),
        ("zero3", []),
    ],
)
def test_kill_9_during_a_checkpoint_save_then_relaunch_continues_the_run(
    engine, extra, dataset, tmp_path
):
    args = [
        "max_steps=8",
        "save_every=2",
        "eval_every=100",
        "keep_checkpoints=2",
        "batch_size=1",
        "global_batch_size=4",
        "optim.lr=0.001",
        "data.num_workers=1",
        *extra,
    ]
    ref = tmp_path / "ref"
    run(engine, 2, overrides(dataset, ref, *args))
    out = tmp_path / "killed"
    cmd = command(engine, 2, overrides(dataset, out, *args))
    proc = subprocess.Popen(
        cmd,
        env=env(engine),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpts = out / "checkpoints"
    deadline, mid_save = time.time() + 300, False
    while time.time() < deadline:
        mid_save = (ckpts / "step-0000004.tmp").exists()
        if mid_save or (ckpts / "step-0000006").exists():
            break
        time.sleep(0.002)
    _kill_group(proc)  # launcher and every worker, mid-save when the .tmp was seen
    print(f"{engine}: killed {'during the step-4 save' if mid_save else 'after step 6'}")
    assert not (out / "final").exists(), "the run finished before it could be killed"
    # A save cut short leaves a partial folder; a later resume must not trip over it.
    (ckpts / "step-0000009.tmp").mkdir(parents=True, exist_ok=True)
    (ckpts / "step-0000009.tmp" / "garbage").write_text("x")
    run(engine, 2, overrides(dataset, out, *args))
    assert not list(ckpts.glob("*.tmp"))
    a, b = train_records(ref), train_records(out)
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        if engine == "ddp":
            assert y["loss"] == x["loss"] and y["grad_norm"] == x["grad_norm"]
        else:
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
        assert y["optimizer_step"] == y["step"]
    wa, wb = weights(ref / "final"), weights(out / "final")
    for k in wa:
        if engine == "ddp":
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize(
    ("launch_file", "procs", "expected"),
    [("ddp-8gpu.yaml", 2, "ddp x 2 process(es)"), ("single-gpu.yaml", 1, "single x 1 process")],
)
def test_the_other_shipped_launch_files_run_on_cpu_processes(
    launch_file, procs, expected, dataset, tmp_path
):
    out = tmp_path / "run"
    LAUNCH_FILES["other"] = REPO / "configs/accelerate" / launch_file
    try:
        args = ["max_steps=2", "save_every=2", "eval_every=100", "global_batch_size=2"]
        done = run("other", procs, overrides(dataset, out, "batch_size=1", *args))
    finally:
        del LAUNCH_FILES["other"]
    assert expected in done.stdout
    assert [r["optimizer_step"] for r in train_records(out)] == [1, 2]


def test_without_a_global_batch_the_batch_grows_with_the_processes_and_it_says_so(
    dataset, tmp_path
):
    args = ["max_steps=1", "save_every=1", "eval_every=100", "global_batch_size=null"]
    done = run("ddp", 2, overrides(dataset, tmp_path / "run", *args))
    assert "global batch 4 = 2 per device x 2 x 1" in done.stdout
    assert "global_batch_size is not set" in done.stderr


def test_ranks_that_cannot_see_rank_0s_checkpoint_stop_instead_of_starting_fresh(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), str(REPO / "tests/training/resume_probe.py")]
    done = subprocess.run(
        [*cmd, str(tmp_path)], env=env("ddp"), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert (
            f"rank {rank}: error: {tmp_path}/node{rank}: checkpoint step 6 is not visible on "
            "rank(s) [1]: output_dir must be on a filesystem shared by every node"
        ) in done.stdout


def test_deepspeed_bf16_trains_and_exports_a_loadable_model(dataset, tmp_path):
    """DeepSpeed does mixed precision itself (bf16 weights, fp32 master copy in the optimizer)."""
    from radgrounder.modeling import load_model

    out = tmp_path / "run"
    args = ["max_steps=2", "save_every=2", "eval_every=100", "global_batch_size=4"]
    run("deepspeed", 2, overrides(dataset, out, "batch_size=2", "precision=bf16", *args))
    rec = train_records(out)
    assert [r["optimizer_step"] for r in rec] == [1, 2] and rec[1]["loss"] < rec[0]["loss"]
    loaded = load_model(out / "final")
    assert loaded.model.dtype == torch.bfloat16


def test_two_ranks_on_a_fresh_output_dir_build_the_dataset_and_the_model_once(tmp_path):
    from tests.labels.test_build import REPORTS, small_layout

    scans, labels = small_layout(tmp_path / "layout", ids=("ct_upper_abdomen", "ct_dicom_series"))
    ds, out = tmp_path / "ds", tmp_path / "run"
    args = overrides(ds, out, "max_steps=1", "save_every=1", "eval_every=100", "batch_size=1")
    args += [
        f"data.build.out={ds}",
        f"data.build.scans={scans}",
        f"data.build.labels={labels}",
        f"data.build.reports={REPORTS}",
        "data.eval_sources=[]",
    ]
    run("ddp", 2, args)
    assert (ds / "manifest.json").is_file() and (out / "init" / "config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".init")]  # no half-written model
    assert [r["step"] for r in train_records(out)] == [1]
