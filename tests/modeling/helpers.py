"""Batches, a scripted LM head and the released key layout for the modeling tests."""

from __future__ import annotations

import torch
from torch import nn

from radgrounder.prompts import build_prompt, collate_examples, encode_example

PROMPTS = [
    build_prompt("grounded-report-segment", "en", clinical_info="Suspected metastases."),
    build_prompt("vqa", "en", question="What modality is used to take this image?"),
]


def make_batch(tokenizer, prompts: list[str], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded generation batch with one random image per prompt."""
    examples = [encode_example(tokenizer, p) for p in prompts]
    batch = collate_examples(
        examples, pad_token_id=tokenizer.pad_token_id, padding_side="left", return_tensors="pt"
    )
    gen = torch.Generator().manual_seed(seed)
    batch["pixel_values"] = torch.rand(len(prompts), 3, 224, 224, generator=gen) * 2 - 1
    return batch


class ScriptedHead(nn.Module):
    """Stands in for ``lm_head`` so greedy decoding emits a fixed token script per row: the
    n-th call (prefill = 0) puts the only large logit on ``scripts[row][n]``. Everything else
    in the model stays real, so the hidden states the mask decoder reads are genuine."""

    def __init__(self, scripts: list[list[int]], vocab: int, filler: int) -> None:
        super().__init__()
        self.scripts, self.vocab, self.filler, self.calls = scripts, vocab, filler, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.new_zeros(*hidden.shape[:2], self.vocab)
        for row, script in enumerate(self.scripts):
            token = script[self.calls] if self.calls < len(script) else self.filler
            logits[row, :, token] = 10.0
        self.calls += 1
        return logits


def reference_keys(config, variant: str) -> set[str]:
    """The state-dict keys of a released checkpoint as transformers 4.54's ``save_pretrained``
    writes them (spec §3.2, §3.6), spelled out rather than derived from a model."""
    text, vision = config.text_config, config.vision_config
    keys = {
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "multi_modal_projector.linear.weight",
        "multi_modal_projector.linear.bias",
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.embeddings.patch_embedding.bias",
        "vision_tower.vision_model.embeddings.position_embedding.weight",
        "vision_tower.vision_model.post_layernorm.weight",
        "vision_tower.vision_model.post_layernorm.bias",
    }
    for i in range(text.num_hidden_layers):
        layer = f"language_model.model.layers.{i}."
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            keys.add(f"{layer}{norm}_layernorm.weight")
        keys |= {f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    for i in range(vision.num_hidden_layers):
        layer = f"vision_tower.vision_model.encoder.layers.{i}."
        for module in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{layer}{module}.weight", f"{layer}{module}.bias"}
        for proj in ("q", "k", "v", "out"):
            keys |= {f"{layer}self_attn.{proj}_proj.weight", f"{layer}self_attn.{proj}_proj.bias"}
    if variant == "segmentation":
        keys |= _head_keys(config.radgrounder["head"]["num_layers"])
    return keys


def _head_keys(num_layers: int) -> set[str]:
    head = "segmentation_head."
    pairs = {"img_projection", "output_proj", "transformer.norm_final_attn"}
    pairs |= {f"transformer.final_attn_token_to_image.{p}_proj" for p in ("q", "k", "v", "out")}
    for i in range(num_layers):
        layer = f"transformer.layers.{i}."
        for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            pairs |= {f"{layer}{attn}.{p}_proj" for p in ("q", "k", "v", "out")}
        pairs |= {f"{layer}norm{n}" for n in range(1, 5)}
        pairs |= {f"{layer}mlp.0", f"{layer}mlp.2"}
    return {f"{head}{p}.{w}" for p in pairs for w in ("weight", "bias")}
