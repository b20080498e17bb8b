"""Global-batch semantics, the run lock, the chunked target-only loss and the loader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from radgrounder.errors import RadGrounderError
from radgrounder.modeling import init_model, load_model
from radgrounder.training import load_config
from radgrounder.training.checkpoints import RunLock
from radgrounder.training.collate import make_batch
from radgrounder.training.config import batch_layout
from radgrounder.training.data import Mixture, make_source
from radgrounder.training.loader import StepBatchSampler, make_loader
from radgrounder.training.objective import TrainingObjective, mask_loss_sums
from tests.conftest import REPO
from tests.training.conftest import TINY, overrides

PAPER_BATCH = 288  # spec §6.2: 24 per device x 12 accumulation on one GPU


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_the_3b_configs_are_the_papers_batch_on_1_8_and_16_gpus(variant, gpus):
    cfg = load_config(REPO / f"configs/radgrounder-{variant}-3b.yaml")
    accum, global_batch = batch_layout(cfg, gpus)
    assert global_batch == PAPER_BATCH
    assert cfg.batch_size * gpus * accum == PAPER_BATCH


def test_a_global_batch_the_layout_cannot_divide_is_refused_with_the_sizes_that_fit():
    cfg = load_config(TINY, ["global_batch_size=288", "batch_size=24"])
    assert batch_layout(cfg, 1) == (12, 288)
    with pytest.raises(RadGrounderError, match=r"288 is not divisible by .* 24 x 8 = 192") as e:
        batch_layout(cfg, 8)
    assert "[1, 2, 3, 4, 6, 9, 12, 18]" in str(e.value)


def test_grad_accum_without_a_global_batch_is_per_process_and_both_together_are_refused():
    cfg = load_config(TINY, ["global_batch_size=null", "grad_accum=3", "batch_size=2"])
    assert batch_layout(cfg, 4) == (3, 24)
    with pytest.raises(RadGrounderError, match=r"config\.grad_accum: expected unset"):
        load_config(TINY, ["grad_accum=3"])


def test_a_locked_output_dir_is_refused_by_a_second_job(dataset, tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)
    assert lock.acquire() is None
    try:
        cmd = [sys.executable, "-m", "radgrounder", "train", str(TINY), "--quiet"]
        done = subprocess.run(
            [*cmd, *overrides(dataset, out, "max_steps=1")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        lock.release()
    assert done.returncode == 1
    assert "another training job is writing this output_dir" in done.stderr
    assert f"pid {__import__('os').getpid()}" in done.stderr
    assert not (out / "checkpoints").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}
    for variant in ("detection", "segmentation"):
        path = init_model("tiny", variant, tmp_path_factory.mktemp(variant) / "m")
        out[variant] = load_model(path)
    return out


def _batch(dataset, loaded, variant):
    cfg = load_config(TINY, overrides(dataset, "x", f"model.variant={variant}"))
    sources = [make_source(s, variant, preset="reference", size=224) for s in cfg.data.sources]
    mix = Mixture(sources, [s.weight for s in cfg.data.sources], 1.0, 0)
    seg = loaded.tokenizer.convert_tokens_to_ids("</seg>") if variant == "segmentation" else None
    examples = [mix.example(1, i, "random") for i in range(3)]
    return make_batch(examples, loaded.tokenizer, n_image_tokens=256, seg_token_id=seg)


@pytest.mark.parametrize("chunk", [1024, 5])
def test_target_only_loss_equals_cross_entropy_over_the_models_full_logits(chunk, dataset, tiny):
    """Same per-row sums and the same gradients as the full (B, T, vocab) logits path."""
    loaded = tiny["detection"]
    model = loaded.model
    batch = _batch(dataset, loaded, "detection")
    inputs = {
        k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")
    }
    model.zero_grad()
    logits = model(**inputs).logits
    labels = batch["labels"]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    full = ce.sum(1)
    full.sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = TrainingObjective(model, segmentation=False, chunk=chunk)(**inputs, labels=labels)
    torch.testing.assert_close(out["lm_sums"], full, rtol=1e-5, atol=1e-4)
    assert out["counts"].tolist() == (labels[:, 1:] != -100).sum(1).tolist()
    out["lm_sums"].sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)


def test_a_segmentation_batch_without_masks_still_reaches_every_head_parameter(dataset, tiny):
    loaded = tiny["segmentation"]
    batch = _batch(dataset, loaded, "segmentation")
    batch.pop("seg_token_pos", None)
    batch.pop("segment_gt", None)
    loaded.model.zero_grad()
    out = TrainingObjective(loaded.model, segmentation=True)(**batch)
    assert float(out["seg_sum"]) == 0.0
    (out["lm_sums"].sum() + out["seg_sum"]).backward()
    head = dict(loaded.model.segmentation_head.named_parameters())
    assert all(p.grad is not None and not p.grad.any() for p in head.values())


def test_mask_loss_sums_is_mask_loss_times_the_number_of_masks():
    from radgrounder.modeling import mask_loss

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(3, 1, 16, 16)).astype(np.float32))
    gt = torch.from_numpy(rng.random((3, 16, 16)) > 0.6).float()
    bce, dice = mask_loss(logits, gt)
    assert float(mask_loss_sums(logits.squeeze(1), gt)) == pytest.approx(3 * float(bce + dice))


def test_the_sampler_shards_every_layout_of_a_global_batch_onto_the_same_slots():
    def slots(world, batch, accum, start=0):
        s = StepBatchSampler(max_steps=3, batch_size=batch, grad_accum=accum, world_size=world)
        s.set_start(start)
        by_step: dict[int, set] = {}
        for k, micro in enumerate(s):
            for step, slot in micro:
                by_step.setdefault(step, set()).add((slot, k % world))
        return {st: sorted(x for x, _ in v) for st, v in by_step.items()}

    want = {1: list(range(8)), 2: list(range(8)), 3: list(range(8))}
    assert slots(1, 8, 1) == slots(2, 4, 1) == slots(2, 2, 2) == slots(4, 1, 2) == want
    assert slots(2, 2, 2, start=2) == {3: list(range(8))}


def test_loader_workers_give_the_same_batches_as_the_main_process(dataset, tiny):
    loaded = tiny["detection"]
    cfg = load_config(TINY, overrides(dataset, "x"))
    sources = [make_source(s, "detection", preset="reference", size=224) for s in cfg.data.sources]
    mix = Mixture(sources, [s.weight for s in cfg.data.sources], 1.0, 0)

    def batches(workers):
        loader = make_loader(
            mix,
            loaded.tokenizer,
            prefix_style="random",
            max_steps=3,
            batch_size=2,
            grad_accum=1,
            world_size=1,
            n_image_tokens=256,
            seg_token_id=None,
            max_target_tokens=24,
            num_workers=workers,
            prefetch_factor=2,
        )
        return list(loader)

    a, b = batches(0), batches(2)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["pixel_values"], y["pixel_values"])
