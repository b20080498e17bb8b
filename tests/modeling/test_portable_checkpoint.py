"""save_model folders that stock transformers reads: the released key layout, portable tokenizer
and processor files, Gemma's ``<mask>`` (spec §2.1, §3.6). The cross-version round trip against a
real transformers 4.54 lives in test_roundtrip_transformers4.py (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, PaliGemmaForConditionalGeneration

from radgrounder.errors import RadGrounderError
from radgrounder.modeling import (
    GroundedGemmaForConditionalGeneration,
    build_tokenizer,
    load_model,
    save_model,
)
from radgrounder.modeling.checkpoint import read_state_dict
from tests.modeling.helpers import reference_keys

GEMMA_SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}


def test_offline_tokenizer_has_gemmas_special_ids():
    tok = build_tokenizer("segmentation")
    for token, tid in GEMMA_SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == tid
    assert tok.mask_token == "<mask>" and "<mask>" in tok.all_special_tokens
    assert tok.convert_tokens_to_ids("<0x00>") == 5  # byte fallback right after the specials
    assert tok.convert_tokens_to_ids("<loc0000>") == 1024
    assert tok.convert_tokens_to_ids("<image>") == 1024 + 1152
    assert tok.convert_tokens_to_ids("</seg>") == 1024 + 1154 == len(tok) - 1
    assert tok("Answer: liver")["input_ids"][0] != tok.bos_token_id  # prompts place BOS


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_saved_weights_have_the_released_key_layout(tiny_dirs, variant):
    folder = tiny_dirs[variant]
    config = load_model(folder).config
    stored = set(read_state_dict(folder))
    assert stored == reference_keys(config, variant)
    assert len([k for k in stored if k.startswith("vision_tower.")]) == 37  # tiny SigLIP


def test_saved_files_are_portable(tiny_dirs):
    folder = tiny_dirs["detection"]
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "GemmaTokenizerFast"
    assert tok_config["additional_special_tokens"] == ["<image>"]
    assert "extra_special_tokens" not in tok_config  # a list there breaks transformers 4.x
    assert (tok_config["add_bos_token"], tok_config["add_eos_token"]) == (False, False)
    assert (tok_config["mask_token"], tok_config["padding_side"]) == ("<mask>", "left")
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special["mask_token"] == "<mask>" and special["pad_token"] == "<pad>"
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "SiglipImageProcessor"
    assert pre["size"] == {"height": 224, "width": 224} and pre["image_seq_length"] == 256
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["rescale_factor"] == pytest.approx(1 / 255)
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["rope_theta"] == 10000.0  # what 4.x reads
    assert "torch_dtype" not in json.dumps(config)


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_stock_transformers_loads_saved_folders_strictly(tiny_dirs, variant):
    folder = tiny_dirs[variant]
    cls = (
        GroundedGemmaForConditionalGeneration
        if variant == "segmentation"
        else PaliGemmaForConditionalGeneration
    )
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    ours = load_model(folder).model
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    vocab = ours.config.text_config.vocab_size
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "PaliGemmaProcessor"
    assert processor.image_seq_length == 256 and len(processor.tokenizer) == vocab
    assert len(AutoTokenizer.from_pretrained(folder)) == vocab


def _without_mask(src: Path, dst: Path) -> Path:
    """A checkpoint whose vocabulary lacks ``<mask>`` (id 4 renamed), with a Gemma tokenizer
    config, as radgrounder wrote them before ``<mask>`` joined the offline tokenizer."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["<unused_mask>"] = vocab.pop("<mask>")
    for entry in data["added_tokens"]:
        if entry["content"] == "<mask>":
            entry["content"] = "<unused_mask>"
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def test_a_tokenizer_without_mask_is_repaired_on_load(tiny_dirs, tmp_path):
    folder = _without_mask(tiny_dirs["detection"], tmp_path / "nomask")
    vocab = load_model(tiny_dirs["detection"]).config.text_config.vocab_size
    stock = AutoTokenizer.from_pretrained(folder)
    assert len(stock) == vocab + 1 and stock.convert_tokens_to_ids("<mask>") == vocab

    model, tokenizer = load_model(folder)
    assert len(tokenizer) == vocab and tokenizer.mask_token is None

    with pytest.raises(RadGrounderError, match="lacks Gemma's <mask>"):
        save_model(model, stock, tmp_path / "bad")
    out = save_model(model, tokenizer, tmp_path / "resaved")
    assert json.loads((out / "tokenizer_config.json").read_text())["mask_token"] is None
    assert len(AutoTokenizer.from_pretrained(out)) == vocab  # portable again
    assert len(load_model(out).tokenizer) == vocab


def test_a_4x_config_with_dtypes_per_block_loads_in_the_requested_dtype(tiny_dirs, tmp_path):
    folder = shutil.copytree(tiny_dirs["segmentation"], tmp_path / "hf4")
    config = json.loads((folder / "config.json").read_text())
    for block in (config, config["text_config"], config["vision_config"]):
        block["torch_dtype"] = "float32"  # what transformers 4.54 writes
    (folder / "config.json").write_text(json.dumps(config))
    model = load_model(folder, dtype="bfloat16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
