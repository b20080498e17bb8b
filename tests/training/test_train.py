"""The training recipe on CPU: checkpoints, exact resume after kill -9, a loadable final model."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from radgrounder.grounding import codec
from radgrounder.modeling import generate, init_model, load_model
from radgrounder.training import load_config, train
from radgrounder.training.collate import make_batch
from radgrounder.training.config import SourceConfig
from radgrounder.training.data import BuiltSource
from radgrounder.training.setup import load_siglip_checkpoint, map_siglip_state_dict
from tests.training.conftest import TINY, losses, overrides


def test_train_checkpoints_and_the_final_model_loads_and_generates(dataset, tmp_path):
    cfg = load_config(
        TINY,
        overrides(
            dataset,
            tmp_path / "run",
            "max_steps=4",
            "save_every=2",
            "eval_every=4",
            "keep_checkpoints=1",
        ),
    )
    result = train(cfg, progress=False)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000004"]
    assert len(losses(tmp_path / "run")) == 4 and result.eval_loss is not None
    loaded = load_model(result.final_dir)
    assert loaded.variant == "detection"
    src = BuiltSource(
        SourceConfig(path=str(dataset), split="test", tasks=["grounded-report"]),
        "detection",
        preset="reference",
        size=224,
    )
    ex = src.example(0, np.random.default_rng(0), "both")
    batch = make_batch([ex], loaded.tokenizer, n_image_tokens=256, training=False)
    [out] = generate(loaded.model, loaded.tokenizer, batch, max_new_tokens=8)
    assert isinstance(out.text, str) and len(out.token_ids) <= 8
    codec("radgrounder-detect").decode(out.text)  # never raises


def test_segmentation_variant_trains_with_mask_loss(dataset, tmp_path):
    cfg = load_config(
        TINY,
        overrides(
            dataset,
            tmp_path / "seg",
            "max_steps=2",
            "model.variant=segmentation",
            "data.augment=true",
            "save_every=2",
            "eval_every=100",
            "seg_loss_scaling=reference",
        ),
    )
    train(cfg, progress=False)
    records = [json.loads(x) for x in (tmp_path / "seg/logs/train.jsonl").read_text().splitlines()]
    assert any(r.get("seg_loss", 0) > 0 for r in records)
    assert load_model(tmp_path / "seg" / "final").variant == "segmentation"


def test_kill_9_and_resume_reproduces_the_uninterrupted_loss_curve(dataset, tmp_path):
    args = overrides(dataset, tmp_path / "ref", "max_steps=16", "save_every=3", "eval_every=100")
    train(load_config(TINY, args), progress=False)
    reference = losses(tmp_path / "ref")
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "radgrounder",
        "train",
        str(TINY),
        "--quiet",
        *overrides(dataset, out, "max_steps=16", "save_every=3", "eval_every=100"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "step-0000003").is_dir():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == reference


def test_siglip_checkpoint_mapping_loads_strictly(tmp_path):
    loaded = load_model(init_model("tiny", "detection", tmp_path / "m"))
    tower = loaded.model.model.vision_tower
    reference = {k: v.clone() for k, v in tower.state_dict().items()}
    # Write the tower's weights in open_clip/timm naming, as a fine-tuned SigLIP is saved.
    clip = {}
    for k, v in reference.items():
        k2 = k.replace("embeddings.patch_embedding", "patch_embed.proj")
        k2 = k2.replace("encoder.layers.", "blocks.").replace("self_attn.out_proj", "attn.proj")
        k2 = k2.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
        k2 = k2.replace("post_layernorm.", "norm.")
        if k == "embeddings.position_embedding.weight":
            clip["model.visual.trunk.pos_embed"] = v[None] + 1
            continue
        if ".self_attn.q_proj." in k:
            kv = k.replace("q_proj", "k_proj")
            vv = k.replace("q_proj", "v_proj")
            fused = torch.cat([v, reference[kv], reference[vv]]) + 1
            clip["model.visual.trunk." + k2.replace("self_attn.q_proj", "attn.qkv")] = fused
            continue
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        clip["model.visual.trunk." + k2] = v + 1
    clip["model.visual.trunk.attn_pool.latent"] = torch.zeros(1)
    assert set(map_siglip_state_dict(clip)) == set(reference)
    torch.save({"state_dict": clip}, tmp_path / "siglip.pt")
    load_siglip_checkpoint(loaded.model, tmp_path / "siglip.pt")
    for k, v in tower.state_dict().items():
        assert torch.allclose(v, reference[k] + 1), k


def test_lora_with_bf16_autocast_trains_adapters_and_merges_into_the_final_model(dataset, tmp_path):
    cfg = load_config(
        TINY,
        overrides(
            dataset,
            tmp_path / "lora",
            "max_steps=2",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "precision=bf16",
            "save_every=2",
            "eval_every=100",
        ),
    )
    train(cfg, progress=False)
    trainable = json.loads((tmp_path / "lora" / "trainable.json").read_text())
    assert 0 < trainable["trainable"] < 0.5 * trainable["parameters"]
    merged = load_model(tmp_path / "lora" / "final")
    init = load_model(tmp_path / "lora" / "init")
    names = dict(merged.model.named_parameters())
    changed = [n for n, p in init.model.named_parameters() if not torch.equal(p, names[n])]
    assert any("language_model" in n and "q_proj" in n for n in changed)
    assert not any("vision_tower" in n for n in changed)
    assert not any("lora" in n for n in names)
