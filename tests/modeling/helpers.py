"""Batches and a scripted LM head for the modeling tests."""

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
