"""Examples → model batches: token layout of spec §1.2, pixel values, masks at ``</seg>``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from radgrounder.datasets import Example
from radgrounder.prompts import collate_examples, encode_example


def image_seq_length(config: Any) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def make_batch(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    n_image_tokens: int,
    training: bool = True,
    seg_token_id: int | None = None,
    max_target_tokens: int | None = None,
) -> dict[str, Any]:
    """Tensors for a forward pass. Training batches carry targets and labels (right padding);
    generation batches carry prompts only (left padding).

    For the segmentation variant, ``seg_token_pos`` lists (row, position) of every ``</seg>``
    in the targets in text order and ``segment_gt`` the matching masks.
    """
    encoded = []
    for ex in examples:
        e = encode_example(
            tokenizer, ex.prompt, ex.target if training else None, image_seq_length=n_image_tokens
        )
        if training and max_target_tokens is not None:
            keep = len(e["input_ids"]) - sum(e["token_type_ids"]) + max_target_tokens
            e = {k: v[:keep] for k, v in e.items()}
        encoded.append(e)
    batch = collate_examples(
        encoded,
        pad_token_id=tokenizer.pad_token_id,
        padding_side="right" if training else "left",
        return_tensors="pt",
    )
    batch["pixel_values"] = torch.from_numpy(np.stack([ex.image for ex in examples]))
    if training and seg_token_id is not None:
        ids = batch["input_ids"]
        positions, masks = [], []
        for row, ex in enumerate(examples):
            where = ((ids[row] == seg_token_id) & (batch["token_type_ids"][row] == 1)).nonzero()
            where = where.flatten().tolist()
            # A truncated target may have lost some </seg>: pair the ones that remain, in order.
            for k, pos in enumerate(where[: len(ex.masks)]):
                positions.append((row, pos))
                masks.append(ex.masks[k])
        if positions:
            batch["seg_token_pos"] = torch.tensor(positions, dtype=torch.long)
            batch["segment_gt"] = torch.from_numpy(np.stack(masks).astype(np.float32))
    batch["tasks"] = [ex.task for ex in examples]
    return batch
