"""Randomly initialised RadGrounder models with offline tokenizers (tests, smoke runs)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from radgrounder.errors import RadGrounderError
from radgrounder.modeling.checkpoint import MODEL_CLASSES, save_model
from radgrounder.modeling.configs import (
    DETECTION_ARCH,
    IMAGE_TOKEN,
    SEG_TOKEN,
    SEGMENTATION_ARCH,
    SIZES,
    VARIANTS,
    model_config,
)
from radgrounder.modeling.tokenizer import build_tokenizer


def random_model(size: str, variant: str, *, seed: int = 0) -> tuple[object, object]:
    """``(model, tokenizer)``: the real classes with random weights (fp32, eval mode)."""
    if size not in SIZES:
        raise RadGrounderError(f"size: unknown value {size!r} (expected one of {', '.join(SIZES)})")
    if variant not in VARIANTS:
        raise RadGrounderError(
            f"variant: unknown value {variant!r} (expected one of {', '.join(VARIANTS)})"
        )
    # 256000 reproduces the released id layout (spec §2.1); the tiny text vocabulary keeps
    # the embedding matrix small while every special token keeps its relative place.
    tokenizer = build_tokenizer(variant, base_vocab_size=256000 if size == "3b" else 1024)
    config = model_config(
        size,
        variant,
        len(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    cls = MODEL_CLASSES[SEGMENTATION_ARCH if variant == "segmentation" else DETECTION_ARCH]
    # A private RNG stream: the caller's global seed state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    if variant == "segmentation":
        model.set_seg_token_id(tokenizer.convert_tokens_to_ids(SEG_TOKEN))
    return model.eval(), tokenizer


def init_model(
    size: str,
    variant: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a random ``size``/``variant`` model to ``out_dir`` (loadable with ``load_model``).

    ``3b`` writes about 12 GB in float32; pass ``dtype="bfloat16"`` for half that. Weights
    are built in float32 and cast, so the host needs that much memory for a moment.
    """
    model, tokenizer = random_model(size, variant, seed=seed)
    if dtype is not None:
        target = getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(target, torch.dtype) or not target.is_floating_point:
            raise RadGrounderError(f"dtype: not a floating torch dtype: {dtype!r}")
        model = model.to(target)
    return save_model(model, tokenizer, out_dir, overwrite=overwrite)
