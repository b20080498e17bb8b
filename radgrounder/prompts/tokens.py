"""The token layout of a prompt and its target (spec §1.2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.prompts.builder import IMAGE_TOKEN

IGNORE_INDEX = -100


def expand_prompt(prompt: str, *, image_seq_length: int = 256, bos_token: str = "<bos>") -> str:
    """The A-string the tokenizer sees: each ``<image>`` repeated ``image_seq_length`` times,
    ``<bos>`` right after the last image token (or first when there is none), and a final
    newline. This mirrors the text branch of ``PaliGemmaProcessor``."""
    expanded = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_seq_length)
    cut = expanded.rfind(IMAGE_TOKEN)
    cut = 0 if cut < 0 else cut + len(IMAGE_TOKEN)
    return expanded[:cut] + bos_token + expanded[cut:] + "\n"


def encode_example(
    tokenizer: Any,
    prompt: str,
    target: str | None = None,
    *,
    image_seq_length: int = 256,
) -> dict[str, list[int]]:
    """Token ids for one example, unpadded.

    Returns ``input_ids``, ``token_type_ids`` (0 on the prompt, 1 on the target),
    ``attention_mask`` and, when ``target`` is given, ``labels``: the ids with
    ``-100`` on every prompt position, so only the target and its ``<eos>`` carry loss.
    """
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    if bos is None or eos is None:
        raise RadGrounderError("tokenizer: needs bos_token and eos_token set")
    a_ids = tokenizer(
        expand_prompt(prompt, image_seq_length=image_seq_length, bos_token=bos),
        add_special_tokens=False,
    )["input_ids"]
    out = {"input_ids": list(a_ids), "token_type_ids": [0] * len(a_ids)}
    if target is not None:
        b_ids = tokenizer(target + eos, add_special_tokens=False)["input_ids"]
        out["input_ids"] += b_ids
        out["token_type_ids"] += [1] * len(b_ids)
        out["labels"] = [IGNORE_INDEX] * len(a_ids) + list(b_ids)
    out["attention_mask"] = [1] * len(out["input_ids"])
    return out


def collate_examples(
    examples: Sequence[dict[str, list[int]]],
    *,
    pad_token_id: int,
    padding_side: str = "left",
    return_tensors: str | None = "np",
) -> dict[str, Any]:
    """Pad encoded examples to the longest; padding gets attention 0, type 0 and label -100.

    Generation needs ``padding_side="left"``.
    """
    if padding_side not in ("left", "right"):
        raise RadGrounderError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise RadGrounderError("examples: nothing to collate")
    width = max(len(e["input_ids"]) for e in examples)
    fill = {
        "input_ids": pad_token_id,
        "token_type_ids": 0,
        "attention_mask": 0,
        "labels": IGNORE_INDEX,
    }
    keys = [k for k in fill if all(k in e for e in examples)]
    batch: dict[str, Any] = {}
    for key in keys:
        rows = []
        for e in examples:
            pad = [fill[key]] * (width - len(e[key]))
            rows.append(pad + list(e[key]) if padding_side == "left" else list(e[key]) + pad)
        batch[key] = np.asarray(rows, dtype=np.int64)
    if return_tensors == "pt":
        import torch

        return {k: torch.from_numpy(v) for k, v in batch.items()}
    return batch
