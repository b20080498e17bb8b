"""Tests for radgrounder.evaluation.embedding on a tiny random BERT saved to disk (plain
Hugging Face layout and sentence-transformers layouts); no network is touched."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.embedding import (
    SentenceEncoder,
    embedding_similarity,
    keyword_matcher,
)
from radgrounder.evaluation.metrics import grounding_iou
from radgrounder.grounding import Box

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_VOCAB = """
left right upper lower lobe lung kidney liver spleen cyst mass nodule small large pleural
effusion no evidence of the a with and in is are normal size enlarged ##s ##ed ##ing
"""
WORDS = _VOCAB.split()
LONG_TEXT = " ".join(["the left lung is normal and the right kidney is enlarged with a cyst"] * 4)


def _write_st_layout(folder: Path, src: Path, modules: list[dict], pooling: dict) -> None:
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 64, "do_lower_case": False})
    )


ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {
        "idx": 2,
        "name": "2",
        "path": "2_Normalize",
        "type": "sentence_transformers.models.Normalize",
    },
]
CLS_POOLING = {
    "word_embedding_dimension": 32,
    "pooling_mode_cls_token": True,
    "pooling_mode_mean_tokens": False,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
    "include_prompt": True,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("encoders")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    plain = root / "plain"
    BertModel(config).save_pretrained(plain)
    tokenizer.save_pretrained(plain)

    st_cls = root / "st_cls"
    _write_st_layout(st_cls, plain, ST_MODULES, CLS_POOLING)
    st_dense = root / "st_dense"
    dense_modules = [
        *ST_MODULES[:2],
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {**ST_MODULES[2], "idx": 3, "name": "3"},
    ]
    _write_st_layout(st_dense, plain, dense_modules, CLS_POOLING)
    (st_dense / "2_Dense").mkdir()
    (st_dense / "2_Dense" / "config.json").write_text(
        json.dumps({"in_features": 32, "out_features": 16, "bias": True})
    )
    st_max = root / "st_max"
    max_pooling = {**CLS_POOLING, "pooling_mode_cls_token": False, "pooling_mode_max_tokens": True}
    _write_st_layout(st_max, plain, ST_MODULES, max_pooling)
    return {"plain": plain, "st_cls": st_cls, "st_dense": st_dense, "st_max": st_max}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and every socket connection recorded (and refused)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield
    assert attempts == [], f"network access attempted: {attempts}"


def count_forward_rows(encoder: SentenceEncoder) -> list[int]:
    """Batch sizes of every forward call of the encoder's model."""
    rows: list[int] = []
    encoder.model.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(int(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    return rows


# ------------------------------------------------------------------------------ encoder


def test_encode_shape_dtype_and_unit_norm(models):
    enc = SentenceEncoder(models["plain"], device="cpu")
    assert enc.pooling == "mean" and enc.max_length == 256 and enc.dim == 32
    emb = enc.encode(["left lung nodule", "small pleural effusion", ""])
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert enc.encode([]).shape == (0, 32)


def test_identical_texts_have_cosine_one(models):
    enc = SentenceEncoder(models["plain"], device="cpu")
    assert enc.similarity("left kidney cyst", "left kidney cyst") == pytest.approx(1.0, abs=1e-5)
    assert enc.similarity("left kidney cyst", "normal liver") < 1.0 - 1e-4


def test_embedding_independent_of_batch_padding(models):
    text = "small cyst"
    alone = SentenceEncoder(models["plain"], device="cpu").encode([text])[0]
    enc = SentenceEncoder(models["plain"], device="cpu", batch_size=8)
    batch = enc.encode([LONG_TEXT, text])
    tokens = enc.tokenizer([LONG_TEXT, text], padding=True)["attention_mask"]
    assert sum(tokens[1]) < len(tokens[1]) // 4  # really padded
    np.testing.assert_allclose(batch[1], alone, atol=1e-5)


@pytest.mark.parametrize("folder", ["st_cls", "plain"])
def test_cls_pooling_is_first_hidden_state_normalised(models, folder):
    from transformers import AutoModel, AutoTokenizer

    kwargs = {"pooling": "cls"} if folder == "plain" else {}
    enc = SentenceEncoder(models[folder], device="cpu", **kwargs)
    assert enc.pooling == "cls"
    texts = ["left lung nodule", LONG_TEXT]
    got = enc.encode(texts)

    tok = AutoTokenizer.from_pretrained(models["plain"], local_files_only=True)
    model = AutoModel.from_pretrained(models["plain"], local_files_only=True).eval()
    for text, vec in zip(texts, got, strict=True):
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0, 0]
        expected = (hidden / hidden.norm()).numpy()
        np.testing.assert_allclose(vec, expected, atol=1e-5)

    mean = SentenceEncoder(models["plain"], device="cpu").encode(texts)
    assert np.abs(mean - got).max() > 1e-3


def test_mean_pooling_matches_independent_computation(models):
    from transformers import AutoModel, AutoTokenizer

    enc = SentenceEncoder(models["plain"], device="cpu")
    tok = AutoTokenizer.from_pretrained(models["plain"], local_files_only=True)
    model = AutoModel.from_pretrained(models["plain"], local_files_only=True).eval()
    with torch.no_grad():
        hidden = model(**tok("no pleural effusion", return_tensors="pt")).last_hidden_state[0]
    expected = hidden.mean(0) / hidden.mean(0).norm()
    np.testing.assert_allclose(enc.encode(["no pleural effusion"])[0], expected, atol=1e-5)


def test_lasttoken_pooling_is_padding_invariant(models):
    enc = SentenceEncoder(models["plain"], device="cpu", pooling="lasttoken")
    together = enc.encode([LONG_TEXT, "liver cyst"])
    enc.clear_cache()
    np.testing.assert_allclose(enc.encode(["liver cyst"])[0], together[1], atol=1e-5)


def test_sentence_transformers_config_is_read(models):
    enc = SentenceEncoder(models["st_cls"], device="cpu")
    assert enc.max_length == 64  # sentence_bert_config.json
    assert SentenceEncoder(models["st_cls"], device="cpu", max_length=8).max_length == 8
    with pytest.raises(RadGrounderError, match="contradicts"):
        SentenceEncoder(models["st_cls"], device="cpu", pooling="mean")


def test_dense_module_is_refused(models):
    with pytest.raises(RadGrounderError, match="Dense module") as err:
        SentenceEncoder(models["st_dense"], device="cpu")
    assert "st_dense" in str(err.value)


def test_unsupported_pooling_is_refused(models):
    with pytest.raises(RadGrounderError, match="unsupported pooling pooling_mode_max_tokens"):
        SentenceEncoder(models["st_max"], device="cpu")
    with pytest.raises(RadGrounderError, match="pooling must be one of mean, cls, lasttoken"):
        SentenceEncoder(models["plain"], device="cpu", pooling="max")


def test_missing_folder_raises(tmp_path):
    missing = tmp_path / "no_encoder_here"
    with pytest.raises(RadGrounderError, match="sentence encoder folder not found") as err:
        SentenceEncoder(missing)
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RadGrounderError, match="cannot load a model") as err:
        SentenceEncoder(empty)
    assert str(empty) in str(err.value)


def test_cache_encodes_each_text_once(models):
    enc = SentenceEncoder(models["plain"], device="cpu", batch_size=2)
    rows = count_forward_rows(enc)
    first = enc.encode(["liver", "spleen", "liver", "liver", "kidney cyst"])
    assert sum(rows) == 3 and len(rows) == 2  # 3 distinct texts in batches of 2
    again = enc.encode(["kidney cyst", "liver"])
    assert sum(rows) == 3  # all cached
    np.testing.assert_array_equal(again, first[[4, 0]])
    assert enc.similarity("liver", "spleen") == pytest.approx(float(first[0] @ first[1]))
    assert sum(rows) == 3
    enc.clear_cache()
    enc.encode(["liver"])
    assert sum(rows) == 4


# ------------------------------------------------------------------ pairwise similarity


def test_embedding_similarity_pairs_and_empty_strings(models):
    enc = SentenceEncoder(models["plain"], device="cpu")
    rows = count_forward_rows(enc)
    preds = ["left lung nodule", "", "", "normal liver", "normal liver"]
    refs = ["left lung nodule", "", "small cyst", "   ", "enlarged spleen"]
    sims = embedding_similarity(preds, refs, enc)
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1:4] == [1.0, 0.0, 0.0]
    emb = enc.encode(["normal liver", "enlarged spleen"])
    assert sims[4] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-6)
    assert len(rows) == 1  # all non-blank texts in one batch
    with pytest.raises(RadGrounderError, match="2 predictions but 1 references"):
        embedding_similarity(["a", "b"], ["a"], enc)


def test_keyword_matcher_clamp_and_underscores(models):
    enc = SentenceEncoder(models["plain"], device="cpu")
    raw = keyword_matcher(enc)
    clamped = keyword_matcher(enc, clamp=True)
    assert raw("left_kidney", "left kidney") == pytest.approx(1.0, abs=1e-5)
    words = ["left_kidney", "liver", "pleural_effusion", "the", "spleen cyst", "nodule"]
    for a in words:
        for b in words:
            c = clamped(a, b)
            assert 0.0 <= c <= 1.0
            assert c == pytest.approx(min(1.0, max(0.0, raw(a, b))))


def test_keyword_matcher_inside_grounding_iou(models):
    enc = SentenceEncoder(models["plain"], device="cpu")
    matcher = keyword_matcher(enc, clamp=True)
    assert matcher("liver", "left kidney") < 0.999  # off-diagonal below the diagonal's 1.0
    assert matcher("left kidney", "liver") < 0.999
    a, b = Box(0.1, 0.1, 0.3, 0.3), Box(0.5, 0.5, 0.9, 0.9)
    b_shift = Box(0.5, 0.5, 0.9, 0.7)  # half of b: IoU 0.5
    pred = [("liver", b_shift), ("left_kidney", a)]
    ref = [("left kidney", a), ("liver", b)]
    out = grounding_iou(pred, ref, matcher=matcher)
    # greedy matching pairs the identical keywords (similarity 1): (1.0 * 1 + 0.5 * 1) / 2
    assert out["n_matched"] == 2
    assert out["grounding_iou"] == pytest.approx(0.75, abs=1e-5)
    assert out["mean_similarity"] == pytest.approx(1.0, abs=1e-5)
