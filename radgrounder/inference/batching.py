"""Batched greedy generation over prepared examples (left padding, KV cache)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from radgrounder.datasets import Example
from radgrounder.modeling.generation import Generated, generate
from radgrounder.training.collate import image_seq_length, make_batch


def generate_examples(
    loaded: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 200,
    mask_threshold: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Generated]:
    """Generate answers for ``examples`` (their ``prompt`` and ``image``) in one left-padded
    batch with the model and tokenizer of ``loaded`` (a :class:`~radgrounder.modeling.LoadedModel`).
    Results are in the order of ``examples``; ``target`` and ``masks`` are ignored."""
    batch = make_batch(
        list(examples),
        loaded.tokenizer,
        n_image_tokens=image_seq_length(loaded.config),
        training=False,
    )
    return generate(
        loaded.model,
        loaded.tokenizer,
        batch,
        max_new_tokens=max_new_tokens,
        mask_threshold=mask_threshold,
        should_stop=should_stop,
    )
