"""Checkpoint folders: round trips, key layouts, weight formats and clear errors (spec §3.6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import PaliGemmaForConditionalGeneration

from radgrounder.errors import RadGrounderError
from radgrounder.modeling import (
    GroundedGemmaForConditionalGeneration,
    LoadedModel,
    build_tokenizer,
    init_model,
    legacy_state_dict,
    load_model,
    save_model,
)
from radgrounder.modeling.checkpoint import read_state_dict
from radgrounder.modeling.keys import current_state_dict

PALIGEMMA2_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def _copy_tokenizer_and_config(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _reference_like(src: Path, dst: Path) -> Path:
    """A config as the reference wrote it: no radgrounder block, no auto_map, 4.x fields."""
    return _copy_tokenizer_and_config(
        src,
        dst,
        radgrounder=None,
        auto_map=None,
        architectures=["GroundedGemmaForConditionalGeneration"],
        _vocab_size=257152,
        torch_dtype="float32",
        transformers_version="4.54.1",
    )


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_init_save_load_round_trip(tiny_dirs, tmp_path, variant):
    loaded = load_model(tiny_dirs[variant])
    assert isinstance(loaded, LoadedModel) and loaded.variant == variant
    model, tokenizer = loaded
    expected_cls = (
        GroundedGemmaForConditionalGeneration
        if variant == "segmentation"
        else PaliGemmaForConditionalGeneration
    )
    assert type(model) is expected_cls and not model.training
    assert model.lm_head.weight is model.get_input_embeddings().weight
    for token, tid in PALIGEMMA2_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == tid
    base = 1024
    assert tokenizer.convert_tokens_to_ids("<loc0000>") == base
    assert tokenizer.convert_tokens_to_ids("<seg000>") == base + 1024
    assert tokenizer.convert_tokens_to_ids("<image>") == base + 1152 == model.config.image_token_id
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == model.config.text_config.vocab_size
    settings = model.config.radgrounder
    assert settings["variant"] == variant and settings["normalization"] == "reference"
    if variant == "segmentation":
        assert model.seg_token_id == tokenizer.convert_tokens_to_ids("</seg>") == base + 1154
        assert settings["head"]["num_layers"] == 2

    again = load_model(save_model(model, tokenizer, tmp_path / "copy"))
    _same_weights(model, again.model)
    assert again.variant == variant
    assert again.model.config.radgrounder == settings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp folders left


def test_init_model_is_seeded(tmp_path):
    a = load_model(init_model("tiny", "detection", tmp_path / "a", seed=3)).model
    b = load_model(init_model("tiny", "detection", tmp_path / "b", seed=3)).model
    c = load_model(init_model("tiny", "detection", tmp_path / "c", seed=4)).model
    _same_weights(a, b)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    with pytest.raises(RadGrounderError, match="checkpoint exists"):
        init_model("tiny", "detection", tmp_path / "a")


def test_saved_files_use_the_released_layout_and_a_full_config(tiny_dirs):
    folder = tiny_dirs["segmentation"]
    keys = set(read_state_dict(folder))
    assert "language_model.lm_head.weight" not in keys  # tied to the embeddings
    assert {k.split(".")[0] for k in keys} == {
        "language_model",
        "vision_tower",
        "multi_modal_projector",
        "segmentation_head",
    }
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in keys)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GroundedGemmaForConditionalGeneration"]
    assert config["radgrounder"]["seg_token_id"] == 2178
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (1, 0)


@pytest.mark.parametrize("include_tied", [True, False])
def test_legacy_bin_checkpoint_loads_strictly(tiny_dirs, tmp_path, include_tied):
    src = load_model(tiny_dirs["segmentation"]).model
    legacy = legacy_state_dict(src, include_tied=include_tied)
    assert "language_model.model.embed_tokens.weight" in legacy
    assert ("language_model.lm_head.weight" in legacy) == include_tied
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.0.") for k in legacy)
    assert "multi_modal_projector.linear.weight" in legacy
    assert not any(k.startswith("model.") for k in legacy)
    folder = _reference_like(tiny_dirs["segmentation"], tmp_path / "ref")
    torch.save(legacy, folder / "pytorch_model.bin")
    loaded = load_model(folder)
    assert loaded.variant == "segmentation"
    assert loaded.model.seg_token_id == loaded.tokenizer.convert_tokens_to_ids("</seg>")
    _same_weights(src, loaded.model)


def test_sharded_legacy_bin_with_index_loads(tiny_dirs, tmp_path):
    src = load_model(tiny_dirs["segmentation"]).model
    legacy = legacy_state_dict(src)
    folder = _reference_like(tiny_dirs["segmentation"], tmp_path / "ref")
    names = sorted(legacy)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2]}
    shards["pytorch_model-00002-of-00002.bin"] = names[1::2]
    weight_map = {}
    for file, keys in shards.items():
        torch.save({k: legacy[k].clone() for k in keys}, folder / file)
        weight_map.update(dict.fromkeys(keys, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _same_weights(src, load_model(folder).model)


def test_sharded_safetensors_load(tiny_dirs, tmp_path):
    model, tokenizer = load_model(tiny_dirs["detection"])
    out = save_model(model, tokenizer, tmp_path / "sharded", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    loaded = load_model(out)
    assert loaded.variant == "detection"
    _same_weights(model, loaded.model)


def test_transformers_4x_in_memory_layout_loads(tiny_dirs, tmp_path):
    """``model.vision_tower.vision_model.*``: what transformers 4.52-4.57 held in memory."""
    src = load_model(tiny_dirs["detection"]).model
    state = {
        k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v
        for k, v in current_state_dict(src).items()
    }
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"].clone()
    folder = _copy_tokenizer_and_config(tiny_dirs["detection"], tmp_path / "hf4")
    save_file(state, str(folder / "model.safetensors"))
    _same_weights(src, load_model(folder).model)


def test_architectures_without_auto_map_select_the_segmentation_class(tiny_dirs, tmp_path):
    folder = _reference_like(tiny_dirs["segmentation"], tmp_path / "ref")
    shutil.copy(tiny_dirs["segmentation"] / "model.safetensors", folder / "model.safetensors")
    loaded = load_model(folder)
    assert type(loaded.model) is GroundedGemmaForConditionalGeneration
    assert "auto_map" not in json.loads((folder / "config.json").read_text())


def test_head_keys_alone_select_the_segmentation_class(tiny_dirs, tmp_path):
    folder = _copy_tokenizer_and_config(
        tiny_dirs["segmentation"],
        tmp_path / "plain-arch",
        architectures=["PaliGemmaForConditionalGeneration"],
        radgrounder=None,
    )
    shutil.copy(tiny_dirs["segmentation"] / "model.safetensors", folder / "model.safetensors")
    assert load_model(folder).variant == "segmentation"


def test_dtype_and_mask_threshold_options(tiny_dirs):
    loaded = load_model(tiny_dirs["segmentation"], dtype="bfloat16", mask_threshold="logit")
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.segmentation_head.output_proj.weight.dtype == torch.bfloat16
    assert loaded.config.radgrounder["mask_threshold"] == "logit"
    with pytest.raises(RadGrounderError, match="mask_threshold"):
        load_model(tiny_dirs["segmentation"], mask_threshold="sigmoid")
    with pytest.raises(RadGrounderError, match="dtype"):
        load_model(tiny_dirs["segmentation"], dtype="int8")


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    folder = _copy_tokenizer_and_config(src, dst)
    state = read_state_dict(src)
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_missing_and_unexpected_keys_are_listed(tiny_dirs, tmp_path):
    src = tiny_dirs["segmentation"]
    missing = _broken_copy(
        src, tmp_path / "missing", lambda s: s.pop("segmentation_head.output_proj.bias")
    )
    with pytest.raises(RadGrounderError, match=r"missing segmentation_head\.output_proj\.bias"):
        load_model(missing)
    extra = _broken_copy(
        src, tmp_path / "extra", lambda s: s.update({"decoder.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(RadGrounderError, match=r"unexpected decoder\.extra\.weight") as err:
        load_model(extra)
    assert str(extra) in str(err.value)


def test_wrong_shape_and_untied_head_are_errors(tiny_dirs, tmp_path):
    src = tiny_dirs["detection"]
    key = "multi_modal_projector.linear.bias"
    shaped = _broken_copy(src, tmp_path / "shape", lambda s: s.update({key: torch.zeros(3)}))
    with pytest.raises(RadGrounderError, match="has shape"):
        load_model(shaped)

    def untie(state):
        state["language_model.lm_head.weight"] = torch.randn_like(
            state["language_model.model.embed_tokens.weight"]
        )

    with pytest.raises(RadGrounderError, match=r"lm_head\.weight differs"):
        load_model(_broken_copy(src, tmp_path / "untied", untie))


def test_missing_grounding_token_is_named(tiny_dirs, tmp_path):
    # A detection tokenizer in a segmentation checkpoint: same length, wrong grounding tokens.
    folder = _copy_tokenizer_and_config(tiny_dirs["segmentation"], tmp_path / "tok")
    shutil.copy(tiny_dirs["segmentation"] / "model.safetensors", folder / "model.safetensors")
    tok = build_tokenizer("detection")
    tok.add_tokens(["<filler>"])  # detection adds 3 tokens, segmentation 2; keep lengths apart
    tok.save_pretrained(str(folder))
    with pytest.raises(RadGrounderError, match="tokenizer"):
        load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] = len(tok)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RadGrounderError, match="'<seg>' is missing"):
        load_model(folder)


def test_vocab_mismatch_is_an_error(tiny_dirs, tmp_path):
    folder = _copy_tokenizer_and_config(tiny_dirs["detection"], tmp_path / "vocab")
    shutil.copy(tiny_dirs["detection"] / "model.safetensors", folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] += 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RadGrounderError, match="vocab_size") as err:
        load_model(folder)
    assert "config.json" in str(err.value)


def test_unusable_folders_are_clear_errors(tiny_dirs, tmp_path):
    with pytest.raises(RadGrounderError, match="no such checkpoint folder"):
        load_model(tmp_path / "absent")
    empty = _copy_tokenizer_and_config(tiny_dirs["detection"], tmp_path / "noweights")
    with pytest.raises(RadGrounderError, match="no weights found"):
        load_model(empty)
    (empty / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RadGrounderError, match="unreadable weights"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RadGrounderError, match="model_type"):
        load_model(empty)
    (empty / "config.json").write_text("{")
    with pytest.raises(RadGrounderError, match=r"config\.json"):
        load_model(empty)


def test_save_refuses_a_folder_that_is_not_a_checkpoint(tiny_dirs, tmp_path):
    model, tokenizer = load_model(tiny_dirs["detection"])
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(RadGrounderError, match="holds no checkpoint"):
        save_model(model, tokenizer, target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_interop_with_stock_transformers(tiny_dirs, tmp_path):
    # Stock from_pretrained reads our folders (the head included, not re-initialised) ...
    ours = load_model(tiny_dirs["segmentation"]).model
    stock = GroundedGemmaForConditionalGeneration.from_pretrained(tiny_dirs["segmentation"])
    _same_weights(ours, stock)
    det = PaliGemmaForConditionalGeneration.from_pretrained(tiny_dirs["detection"])
    # ... and stock save_pretrained output loads with load_model.
    det.save_pretrained(tmp_path / "stock")
    folder = _copy_tokenizer_and_config(tiny_dirs["detection"], tmp_path / "stock")
    loaded = load_model(folder)
    assert loaded.variant == "detection"
    _same_weights(det, loaded.model)


def test_public_names_resolve():
    import radgrounder.modeling as modeling

    assert sorted(modeling.__all__) == sorted(modeling._EXPORTS)
    for name in modeling.__all__:
        assert getattr(modeling, name) is not None
    with pytest.raises(AttributeError):
        modeling.no_such_name  # noqa: B018


def test_save_refuses_a_tokenizer_that_does_not_fit(tiny_dirs, tmp_path):
    model, _ = load_model(tiny_dirs["segmentation"])
    with pytest.raises(RadGrounderError, match="vocab_size"):
        save_model(model, build_tokenizer("detection"), tmp_path / "mismatch")
    assert not any(tmp_path.iterdir())
