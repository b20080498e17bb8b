"""Gemma-2's soft-caps as switches: default = how the released checkpoints were trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from radgrounder.datasets import Example
from radgrounder.modeling import init_model, load_model
from radgrounder.modeling.softcap import set_softcaps
from radgrounder.prompts import build_prompt
from radgrounder.training.collate import image_seq_length, make_batch


@pytest.fixture(scope="module")
def detection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model("tiny", "detection", tmp_path_factory.mktemp("m") / "det", seed=0)


def _logits(loaded: Any) -> torch.Tensor:
    image = np.random.default_rng(0).normal(size=(3, 224, 224)).astype(np.float32)
    ex = Example("x", "t", "report", "en", image, build_prompt("report", "en"), "Leber.", [], {})
    batch = make_batch(
        [ex], loaded.tokenizer, n_image_tokens=image_seq_length(loaded.config), training=True
    )
    with torch.no_grad():
        return loaded.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            pixel_values=batch["pixel_values"],
        ).logits.float()


def test_defaults_are_the_training_behaviour(detection: Path) -> None:
    loaded = load_model(detection)
    text = loaded.config.get_text_config()
    assert text.final_logit_softcapping is None and text.attn_logit_softcapping == 50.0
    assert loaded.config.radgrounder["final_logit_softcap"] is False
    assert loaded.config.radgrounder["attention_softcap"] is True


def test_final_logit_softcap_switch(detection: Path) -> None:
    plain = _logits(load_model(detection))
    capped = _logits(load_model(detection, final_logit_softcap=True))
    torch.testing.assert_close(capped, torch.tanh(plain / 30.0) * 30.0, atol=1e-5, rtol=1e-5)
    # A checkpoint that records the switch keeps it.
    loaded = load_model(detection, final_logit_softcap=True)
    from radgrounder.modeling import save_model

    saved = save_model(loaded.model, loaded.tokenizer, detection.parent / "capped")
    again = load_model(saved)
    assert again.config.get_text_config().final_logit_softcapping == 30.0
    torch.testing.assert_close(_logits(again), capped)


def test_attention_softcap_switch_reaches_every_layer(detection: Path) -> None:
    on, off = load_model(detection), load_model(detection, attention_softcap=False)
    layers = [m for m in off.model.modules() if hasattr(m, "attn_logit_softcapping")]
    assert layers and all(m.attn_logit_softcapping is None for m in layers)
    assert all(
        m.attn_logit_softcapping == 50.0
        for m in on.model.modules()
        if hasattr(m, "attn_logit_softcapping")
    )
    # With attention scores far above the cap the two differ; set_softcaps on a built model
    # changes it the same way as loading with the switch.
    for loaded in (on, off):
        for name, p in loaded.model.named_parameters():
            if "language_model" in name and "q_proj" in name:
                p.data.mul_(200.0)
    a, b = _logits(on), _logits(off)
    assert (a - b).abs().max() > 1e-3
    set_softcaps(on.model, attention_softcap=False)
    torch.testing.assert_close(_logits(on), b)
