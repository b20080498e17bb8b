"""Mask decoder layout and the training losses (spec §3.2-3.3)."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from radgrounder.errors import RadGrounderError
from radgrounder.modeling import (
    GroundedGemmaForConditionalGeneration,
    SegmentationDecoder,
    lm_loss_sum,
    load_model,
    mask_loss,
    model_config,
)

ATTN = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


def expected_head_keys(layers: int = 2) -> list[str]:
    names = ["img_projection", "output_proj", "transformer.norm_final_attn"]
    names += [f"transformer.final_attn_token_to_image.{p}" for p in PROJ]
    for i in range(layers):
        base = f"transformer.layers.{i}."
        names += [f"{base}{a}.{p}" for a in ATTN for p in PROJ]
        names += [f"{base}norm{n}" for n in (1, 2, 3, 4)]
        names += [f"{base}mlp.0", f"{base}mlp.2"]
    return sorted(f"segmentation_head.{n}.{w}" for n in names for w in ("weight", "bias"))


def test_head_keys_are_exactly_the_reference_names(tiny_dirs):
    model = load_model(tiny_dirs["segmentation"]).model
    keys = sorted(k for k in model.state_dict() if k.startswith("segmentation_head."))
    assert keys == expected_head_keys()
    assert len(keys) == 2 * (1 + 1 + 1 + 4 + 2 * (3 * 4 + 4 + 2))


def test_3b_head_has_the_reference_parameter_count():
    with torch.device("meta"):
        head = SegmentationDecoder(1152, 2304)
    count = sum(p.numel() for p in head.parameters())
    assert abs(count - 236.36e6) < 0.05e6
    assert count == 236_358_145  # from the layer shapes in spec §3.2


def test_3b_config_has_paligemma2_shapes():
    cfg = model_config("3b", "segmentation", 257155)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (
        1152,
        4304,
        27,
        16,
    )
    assert (v.patch_size, v.image_size, t.num_image_tokens) == (14, 224, 256)
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (2304, 9216, 26)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (8, 4, 256)
    # No final-logit cap: transformers 4.54 never applied it when the checkpoints were trained.
    assert (t.attn_logit_softcapping, t.final_logit_softcapping) == (50.0, None)
    assert (t.query_pre_attn_scalar, t.sliding_window, t.rms_norm_eps) == (256, 4096, 1e-6)
    assert t.hidden_activation == "gelu_pytorch_tanh"
    assert cfg.projection_dim == v.projection_dim == 2304
    assert cfg.image_token_index == 257152 and t.vocab_size == 257155
    assert cfg.architectures == ["GroundedGemmaForConditionalGeneration"]
    assert cfg.radgrounder["head"]["num_heads"] == 8
    det = model_config("3b", "detection", 257156)
    assert det.image_token_index == 257152 and det.architectures == [
        "PaliGemmaForConditionalGeneration"
    ]


@pytest.mark.parametrize(
    ("args", "field"),
    [(("huge", "detection", 2000), "size"), (("tiny", "boxes", 2000), "variant")],
)
def test_config_rejects_unknown_values(args, field):
    with pytest.raises(RadGrounderError, match=field):
        model_config(*args)


def test_decoder_init_is_xavier_after_the_base_init():
    torch.manual_seed(0)
    model = GroundedGemmaForConditionalGeneration(model_config("tiny", "segmentation", 2179))
    head = model.segmentation_head
    mlp0 = head.transformer.layers[0].mlp[0]
    bound = math.sqrt(6 / (mlp0.in_features + mlp0.out_features))
    # normal(0, 0.02) would give std 0.02; xavier-uniform gives bound / sqrt(3)
    assert mlp0.weight.abs().max() <= bound
    assert mlp0.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert all(
        float(m.bias.detach().abs().max()) == 0 for m in head.modules() if hasattr(m, "bias")
    )
    norm = head.transformer.layers[1].norm4
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def _train_batch(cfg, batch=2, text=30):
    gen = torch.Generator().manual_seed(1)
    n_img = cfg.text_config.num_image_tokens
    ids = torch.randint(4, 1000, (batch, n_img + text), generator=gen)
    ids[:, :n_img] = cfg.image_token_index
    types = torch.zeros_like(ids)
    types[:, n_img + 10 :] = 1
    labels = ids.masked_fill(types == 0, -100)
    pixels = torch.rand(batch, 3, 224, 224, generator=gen) * 2 - 1
    return {
        "input_ids": ids,
        "pixel_values": pixels,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": types,
        "labels": labels,
    }


def test_forward_gives_mask_logits_and_runs_siglip_once(tiny_dirs):
    model = load_model(tiny_dirs["segmentation"]).model
    batch = _train_batch(model.config)
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    pos = torch.tensor([[0, 270], [1, 280], [1, 275]])
    with torch.no_grad():
        out = model(**batch, seg_token_pos=pos)
    hook.remove()
    assert len(calls) == 1
    assert out.mask_logits.shape == (3, 1, 224, 224)
    # The same SigLIP tokens (before the projector) and the LM's final hidden states.
    with torch.no_grad():
        siglip = model.model.vision_tower(batch["pixel_values"]).last_hidden_state
        hidden = model.model(**{k: v for k, v in batch.items() if k != "labels"})[0]
        expected = model.segmentation_head(siglip[pos[:, 0]], hidden[pos[:, 0], pos[:, 1]])
    torch.testing.assert_close(out.mask_logits, expected)
    assert out.loss is not None and torch.isfinite(out.loss)
    with pytest.raises(RadGrounderError, match="seg_token_pos"):
        model(**batch, seg_token_pos=torch.tensor([[2, 0]]))


def test_forward_backward_is_fast_and_grads_skip_the_frozen_tower(tiny_dirs):
    model = load_model(tiny_dirs["segmentation"]).model.train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad = False
    batch = _train_batch(model.config)
    pos = torch.tensor([[0, 280], [1, 285]])
    gt = torch.zeros(2, 224, 224)
    gt[:, 50:120, 60:150] = 1
    timings = []
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(**batch, seg_token_pos=pos)
        total, count = lm_loss_sum(out.logits, batch["labels"])
        bce, dice = mask_loss(out.mask_logits, gt)
        (total / count + 0.1 * (bce + dice)).backward()
        timings.append(time.perf_counter() - start)
    # ~0.05 s on 2 idle cores; the bound leaves room for a busy CI machine.
    assert min(timings) < 1.0
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    for module in (
        model.segmentation_head.img_projection,
        # (self-attention over a single query is softmax over one key, so its q/k get no
        # gradient by construction; v does)
        model.segmentation_head.transformer.layers[0].self_attn.v_proj,
        model.segmentation_head.transformer.layers[1].cross_attn_token_to_image.q_proj,
        model.model.multi_modal_projector.linear,
        model.model.language_model.layers[0].self_attn.q_proj,
        model.model.language_model.embed_tokens,
    ):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_lm_loss_sum_matches_cross_entropy_on_a_hand_example():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[-100, 1, -100, 2]])
    total, count = lm_loss_sum(logits, labels)
    # position t predicts labels[t + 1]: logits[0] -> 1, logits[2] -> 2
    expected = F.cross_entropy(logits[0, [0, 2]], torch.tensor([1, 2]), reduction="sum")
    manual = -(torch.log_softmax(logits[0, 0], -1)[1] + torch.log_softmax(logits[0, 2], -1)[2])
    assert int(count) == 2
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(total, manual)
    with pytest.raises(RadGrounderError, match="labels"):
        lm_loss_sum(logits, labels[:, :3])


def test_lm_loss_sum_matches_the_models_own_mean_loss(tiny_dirs):
    model = load_model(tiny_dirs["detection"]).model
    batch = _train_batch(model.config)
    with torch.no_grad():
        out = model(**batch)
    total, count = lm_loss_sum(out.logits, batch["labels"])
    torch.testing.assert_close(total / count, out.loss, rtol=1e-5, atol=1e-5)


def test_mask_loss_on_a_hand_example():
    logits = torch.tensor([[[0.0, 2.0], [-2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]).unsqueeze(1)
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    bce, dice = mask_loss(logits, gt)
    sig = torch.sigmoid
    per_pixel = [
        -math.log(0.5),
        -math.log(sig(torch.tensor(2.0)).item()),
        -math.log(1 - sig(torch.tensor(-2.0)).item()),
        -math.log(0.5),
    ] + [-math.log(1 - sig(torch.tensor(1.0)).item())] * 4
    assert bce.item() == pytest.approx(sum(per_pixel) / 8, rel=1e-6)
    p = sig(logits[:, 0]).reshape(2, -1)
    g = gt.reshape(2, -1)
    d0 = 1 - 2 * (p[0] * g[0]).sum() / (p[0].sum() + g[0].sum() + 1e-6)
    d1 = 1 - 0 / (p[1].sum() + 1e-6)
    assert dice.item() == pytest.approx(((d0 + d1) / 2).item(), rel=1e-6)
    # (N, H, W) logits are accepted as well, and no masks give zero loss
    torch.testing.assert_close(mask_loss(logits[:, 0], gt)[0], bce)
    zero_bce, zero_dice = mask_loss(torch.zeros(0, 1, 4, 4), torch.zeros(0, 4, 4))
    assert zero_bce.item() == 0 and zero_dice.item() == 0
    with pytest.raises(RadGrounderError, match="segment_gt"):
        mask_loss(logits, gt[:1])


def test_3b_model_has_paligemma2_parameter_counts():
    with torch.device("meta"):
        model = GroundedGemmaForConditionalGeneration(model_config("3b", "segmentation", 257155))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.model.vision_tower) == 412_442_352  # SigLIP-So400m/14 without its head
    # Gemma-2 2B with its 256000-token vocabulary, grown to the 257155 tokens of the tokenizer
    assert count(model.model.language_model) == 2_614_341_888 + 1155 * 2304
    assert count(model.segmentation_head) == 236_358_145
