"""Greedy generation with masks for ``</seg>`` tokens (spec §1.9, §3.5, §9.2).

Text comes from the standard HF ``generate`` (greedy, KV cache). Masks come from one explicit
teacher-forced forward over prompt + generated tokens afterwards, which reads the final hidden
state at every ``</seg>`` that was *fed* to the model during generation: a ``</seg>`` followed by
another token (``<eos>`` included) gets a mask, one emitted as the very last token does not,
exactly as in the reference's patched sampler.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from radgrounder.errors import RadGrounderError
from radgrounder.modeling.configs import MASK_THRESHOLDS, settings_of
from radgrounder.modeling.grounded_gemma import GroundedGemmaForConditionalGeneration

_STRIP = re.compile(r"<pad>|<eos>")


@dataclass
class Generated:
    """One generated answer.

    ``token_ids`` are the new tokens up to and including ``<eos>`` (padding dropped);
    ``text`` is their decoding with special tokens kept and ``<pad>``/``<eos>`` removed.
    ``mask_logits`` ``(k, 224, 224)`` (float32, CPU) and ``masks`` pair with the first ``k``
    ``</seg>`` tokens in text order; ``None``/empty for the detection model.
    """

    text: str
    token_ids: list[int]
    mask_logits: torch.Tensor | None = None
    masks: list[np.ndarray] = field(default_factory=list)


def binarize(mask_logits: torch.Tensor, mode: str = "probability") -> list[np.ndarray]:
    """``probability``: sigmoid > 0.5 (logit > 0). ``logit``: logit > 0.5, the reference
    evaluation's threshold (probability > ~0.622), kept for metric parity (spec §3.5)."""
    if mode not in MASK_THRESHOLDS:
        raise RadGrounderError(
            f"mask_threshold: unknown value {mode!r} (expected one of {', '.join(MASK_THRESHOLDS)})"
        )
    cut = 0.0 if mode == "probability" else 0.5
    return [m.numpy() for m in (mask_logits.float().cpu() > cut)]


def _tensor(batch: Mapping[str, Any], name: str, *, required: bool = True) -> torch.Tensor | None:
    value = batch.get(name)
    if value is None:
        if required:
            raise RadGrounderError(f"batch: missing {name!r}")
        return None
    return torch.as_tensor(value)


def seg_positions(new_tokens: torch.Tensor, seg_token_id: int, prompt_len: int) -> torch.Tensor:
    """``(N, 2)`` rows ``[batch_row, token_index]`` of generated ``</seg>`` tokens that were
    fed back to the model, i.e. all but one in the last generated column; row-major, so each
    row's masks come out in text order."""
    fed = new_tokens[:, :-1] == seg_token_id
    rows, cols = torch.nonzero(fed, as_tuple=True)
    return torch.stack([rows, cols + prompt_len], dim=1)


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The 1-indexed, padding-aware position ids ``generate`` gives PaliGemma."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0) + 1


def _mask_pass(
    model: GroundedGemmaForConditionalGeneration,
    sequences: torch.Tensor,
    inputs: dict[str, Any],
    positions: torch.Tensor,
) -> torch.Tensor:
    prompt_len = inputs["input_ids"].shape[1]
    grown = sequences.shape[1] - prompt_len
    ones = inputs["attention_mask"].new_ones(sequences.shape[0], grown)
    attention_mask = torch.cat([inputs["attention_mask"], ones], dim=1)
    token_type_ids = torch.cat([inputs["token_type_ids"], ones], dim=1)
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        position_ids=generation_positions(attention_mask),
        mm_encoder_outputs={"image": inputs["image_outputs"]},
        seg_token_pos=positions,
        use_cache=False,
        logits_to_keep=1,
    )
    return out.mask_logits


class _AskToStop(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = bool(self.should_stop())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _stop_criteria(should_stop: Callable[[], bool] | None) -> StoppingCriteriaList | None:
    return None if should_stop is None else StoppingCriteriaList([_AskToStop(should_stop)])


def generate(
    model: Any,
    tokenizer: Any,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int = 200,
    mask_threshold: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Generated]:
    """Greedy answers (and masks, for the segmentation model) for a left-padded batch.

    ``should_stop`` is asked after every generated token; when it returns True generation
    ends early (a server whose clients all left), leaving the answers cut short.

    ``batch`` is ``collate_examples(..., padding_side="left", return_tensors="pt")`` plus
    ``pixel_values`` ``(B, 3, 224, 224)``. ``mask_threshold`` defaults to the checkpoint's
    setting (``probability`` unless ``load_model(mask_threshold=...)`` said otherwise).
    """
    if max_new_tokens < 1:
        raise RadGrounderError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    mode = mask_threshold or settings_of(model.config).get("mask_threshold", "probability")
    if mode not in MASK_THRESHOLDS:
        raise RadGrounderError(
            f"mask_threshold: unknown value {mode!r} (expected one of {', '.join(MASK_THRESHOLDS)})"
        )
    device = model.device
    input_ids = _tensor(batch, "input_ids").to(device)
    attention_mask = _tensor(batch, "attention_mask").to(device)
    pixel_values = _tensor(batch, "pixel_values").to(device, model.dtype)
    token_type_ids = _tensor(batch, "token_type_ids", required=False)
    # The whole prompt is prefix (type 0): it attends bidirectionally, as in the reference.
    token_type_ids = (
        torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.to(device)
    )
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise RadGrounderError("batch: input_ids and attention_mask must be (B, L) and equal")
    if token_type_ids.shape != input_ids.shape:
        raise RadGrounderError("batch: token_type_ids must have the shape of input_ids")
    if pixel_values.ndim != 4 or pixel_values.shape[0] != input_ids.shape[0]:
        raise RadGrounderError("batch: pixel_values must be (B, 3, H, W), one image per row")
    if (attention_mask[:, -1] == 0).any():
        raise RadGrounderError("batch: generation needs left padding (padding_side='left')")

    segmenting = isinstance(model, GroundedGemmaForConditionalGeneration)
    seg_id = model.seg_token_id if segmenting else None
    if segmenting and seg_id is None:
        raise RadGrounderError("model: seg_token_id is not set (load it with load_model)")

    with torch.inference_mode():
        # One SigLIP pass serves both generate's prefill and the mask pass below.
        image_outputs = model.model.get_image_features(pixel_values)
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            mm_encoder_outputs={"image": image_outputs},
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            stopping_criteria=_stop_criteria(should_stop),
        )
        prompt_len = input_ids.shape[1]
        new_tokens = sequences[:, prompt_len:]
        mask_logits = None
        positions = None
        if segmenting and new_tokens.shape[1] > 1:
            positions = seg_positions(new_tokens, seg_id, prompt_len)
            if len(positions):
                inputs = {
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "token_type_ids": token_type_ids,
                    "image_outputs": image_outputs,
                }
                mask_logits = _mask_pass(model, sequences, inputs, positions)
                mask_logits = mask_logits[:, 0].float().cpu()

    results = []
    eos = tokenizer.eos_token_id
    for row in range(sequences.shape[0]):
        ids = new_tokens[row].tolist()
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        ids = [t for t in ids if t != tokenizer.pad_token_id]
        text = _STRIP.sub("", tokenizer.decode(ids, skip_special_tokens=False))
        item = Generated(text=text, token_ids=ids)
        if segmenting:
            mine = (
                mask_logits[(positions[:, 0] == row).cpu()]
                if mask_logits is not None
                else torch.zeros(
                    0, model.segmentation_head.mask_size, model.segmentation_head.mask_size
                )
            )
            item.mask_logits = mine
            item.masks = binarize(mine, mode) if len(mine) else []
        results.append(item)
    return results


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero inside the block, and restore IEEE behaviour after it.

    Small or random weights produce denormal floats, which are ~100x slower on x86 CPUs. The
    setting is process-wide CPU state (numpy sees it too), so it must not outlive the job.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
