"""Greedy generation, left padding, and masks paired with ``</seg>`` (spec §1.9, §3.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radgrounder.errors import RadGrounderError
from radgrounder.grounding import codec
from radgrounder.modeling import Generated, generate, load_model
from radgrounder.modeling.generation import binarize, generation_positions

from .helpers import PROMPTS, ScriptedHead, make_batch


@pytest.fixture
def seg(tiny_dirs):
    return load_model(tiny_dirs["segmentation"])


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_greedy_generation_is_deterministic_and_decodes(tiny_dirs, variant):
    model, tokenizer = load_model(tiny_dirs[variant])
    batch = make_batch(tokenizer, PROMPTS)
    first = generate(model, tokenizer, batch, max_new_tokens=12)
    second = generate(model, tokenizer, batch, max_new_tokens=12)
    assert [g.text for g in first] == [g.text for g in second]
    assert all(isinstance(g, Generated) and 0 < len(g.token_ids) <= 12 for g in first)
    for g in first:
        assert "<pad>" not in g.text and "<eos>" not in g.text
        assert tokenizer.pad_token_id not in g.token_ids
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=False).replace(
            "<eos>", ""
        )
    # The standard HF path with raw pixels gives the same tokens.
    with torch.no_grad():
        plain = model.generate(
            **{k: v for k, v in batch.items()}, max_new_tokens=12, do_sample=False
        )
    new = plain[:, batch["input_ids"].shape[1] :]
    for row, g in enumerate(first):
        assert new[row, : len(g.token_ids)].tolist() == g.token_ids


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_left_padding_does_not_change_the_answer(tiny_dirs, variant):
    model, tokenizer = load_model(tiny_dirs[variant])
    batch = make_batch(tokenizer, PROMPTS)
    mask = batch["attention_mask"]
    assert mask[0].sum() != mask[1].sum()  # the rows really differ in length
    together = generate(model, tokenizer, batch, max_new_tokens=10)
    for row, prompt in enumerate(PROMPTS):
        alone = make_batch(tokenizer, [prompt])
        alone["pixel_values"] = batch["pixel_values"][row : row + 1]
        assert generate(model, tokenizer, alone, max_new_tokens=10)[0].text == together[row].text
        # Stronger than equal argmaxes: the first-step logits agree numerically.
        with torch.no_grad():
            kwargs = {"max_new_tokens": 1, "do_sample": False, "return_dict_in_generate": True}
            single = model.generate(**alone, output_logits=True, **kwargs).logits[0]
            both = model.generate(**batch, output_logits=True, **kwargs).logits[0][row]
        torch.testing.assert_close(single[0], both, rtol=1e-4, atol=1e-4)


def test_right_padding_and_bad_batches_are_refused(seg):
    model, tokenizer = seg
    batch = make_batch(tokenizer, PROMPTS)
    flipped = {k: v.flip(-1) if v.ndim == 2 else v for k, v in batch.items()}
    with pytest.raises(RadGrounderError, match="left padding"):
        generate(model, tokenizer, flipped, max_new_tokens=2)
    with pytest.raises(RadGrounderError, match="pixel_values"):
        generate(model, tokenizer, {k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(RadGrounderError, match="mask_threshold"):
        generate(model, tokenizer, batch, max_new_tokens=2, mask_threshold="half")


def _script(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_masks_pair_with_fed_seg_tokens_in_text_order(seg):
    model, tokenizer = seg
    close, eos = tokenizer.convert_tokens_to_ids("</seg>"), tokenizer.eos_token_id
    row0 = [*_script(tokenizer, "The <seg>liver</seg> and <seg>spleen</seg>"), eos]
    row1 = _script(tokenizer, "Both <seg>kidney</seg> normal, <seg>liver</seg>")
    assert row0[-2] == close and row1[-1] == close and len(row1) > len(row0)
    steps = len(row1)
    model.lm_head = ScriptedHead([row0, row1], len(tokenizer), tokenizer.pad_token_id)
    # Record the final-norm output of every decoding step (prefill, then one per fed token):
    # what the reference's patched sampler handed to the mask decoder.
    steps_seen: list[torch.Tensor] = []
    hook = model.model.language_model.norm.register_forward_hook(
        lambda _m, _i, out: steps_seen.append(out.detach().clone())
    )
    batch = make_batch(tokenizer, PROMPTS)
    out = generate(model, tokenizer, batch, max_new_tokens=steps)
    hook.remove()

    assert out[0].token_ids == row0 and out[1].token_ids == row1
    # row 0: both </seg> were fed (the second one before <eos>): two masks.
    # row 1: the last </seg> is the final token, never fed: one mask for two </seg>.
    assert out[0].mask_logits.shape == (2, 224, 224)
    assert out[1].mask_logits.shape == (1, 224, 224)
    with torch.no_grad():
        siglip = model.model.vision_tower(batch["pixel_values"]).last_hidden_state
    for row, script in enumerate((row0, row1)):
        fed = [j for j, t in enumerate(script[:-1]) if t == close]
        for k, j in enumerate(fed):
            # the hidden state while </seg> (generated index j) was the input: step j + 1
            hidden = steps_seen[j + 1][row, -1]
            with torch.no_grad():
                expected = model.segmentation_head(siglip[row : row + 1], hidden[None])[0, 0]
            torch.testing.assert_close(out[row].mask_logits[k], expected, rtol=1e-4, atol=1e-4)
        assert len(out[row].masks) == len(fed)
    # Different </seg> positions give different masks, so the order check above has teeth.
    assert not torch.allclose(out[0].mask_logits[0], out[0].mask_logits[1])

    decoded = codec("radgrounder-segment").decode(out[0].text, out[0].masks)
    assert [s.label for s in decoded.spans] == ["liver", "spleen"]
    assert decoded.spans[0].mask is out[0].masks[0]
    assert decoded.spans[1].mask is out[0].masks[1]
    tail = codec("radgrounder-segment").decode(out[1].text, out[1].masks)
    assert [s.label for s in tail.spans] == ["kidney", "liver"]
    assert tail.spans[1].mask is None and tail.problems


def test_threshold_modes(seg):
    logits = torch.tensor([[[-1.0, 0.2], [0.5, 0.7]]])
    assert binarize(logits, "probability")[0].tolist() == [[False, True], [True, True]]
    assert binarize(logits, "logit")[0].tolist() == [[False, False], [False, True]]
    assert binarize(logits)[0].dtype == np.bool_
    with pytest.raises(RadGrounderError, match="mask_threshold"):
        binarize(logits, "p")

    model, tokenizer = seg
    close = tokenizer.convert_tokens_to_ids("</seg>")
    script = [*_script(tokenizer, "<seg>liver</seg>"), tokenizer.eos_token_id]
    model.lm_head = ScriptedHead([script], len(tokenizer), tokenizer.pad_token_id)
    batch = make_batch(tokenizer, PROMPTS[:1])
    prob = generate(model, tokenizer, batch, max_new_tokens=8)[0]
    model.lm_head.calls = 0
    logit = generate(model, tokenizer, batch, max_new_tokens=8, mask_threshold="logit")[0]
    assert close in prob.token_ids
    torch.testing.assert_close(prob.mask_logits, logit.mask_logits)
    np.testing.assert_array_equal(prob.masks[0], (prob.mask_logits[0] > 0).numpy())
    np.testing.assert_array_equal(logit.masks[0], (logit.mask_logits[0] > 0.5).numpy())
    # The checkpoint's default threshold comes from load_model(mask_threshold=...).
    model.config.radgrounder["mask_threshold"] = "logit"
    model.lm_head.calls = 0
    default = generate(model, tokenizer, batch, max_new_tokens=8)[0]
    np.testing.assert_array_equal(default.masks[0], logit.masks[0])


def test_generation_positions_match_hf():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert generation_positions(mask).tolist() == [[1, 1, 1, 2, 3], [1, 2, 3, 4, 5]]


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_codec_decodes_random_output(tiny_dirs, variant):
    model, tokenizer = load_model(tiny_dirs[variant])
    batch = make_batch(tokenizer, PROMPTS, seed=5)
    name = "radgrounder-segment" if variant == "segmentation" else "radgrounder-detect"
    for g in generate(model, tokenizer, batch, max_new_tokens=16):
        masks = g.masks if variant == "segmentation" else None
        grounded = (
            codec(name).decode(g.text, masks) if masks is not None else codec(name).decode(g.text)
        )
        assert isinstance(grounded.text, str)
