"""State-dict key layouts and the strict loader (spec §3.6).

Layouts seen in the wild, and what they become (the installed transformers 5.x model names):

==========================================  ======================================
legacy (reference, transformers ≤ 4.5x)     current (``model.state_dict()``)
==========================================  ======================================
``language_model.model.*``                  ``model.language_model.*``
``language_model.lm_head.weight``           ``lm_head.weight`` (tied to embed_tokens)
``vision_tower.vision_model.*``             ``model.vision_tower.*``
``multi_modal_projector.*``                 ``model.multi_modal_projector.*``
``segmentation_head.*``                     ``segmentation_head.*``
==========================================  ======================================

transformers 4.52-4.57 held ``model.vision_tower.vision_model.*`` in memory; that is accepted too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from radgrounder.errors import RadGrounderError

HEAD_PREFIX = "segmentation_head."
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"

# First matching prefix wins, so the longer legacy prefixes come before their shorter cousins.
_TO_CURRENT = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("model.language_model.model.", "model.language_model."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    # A bare PaliGemmaModel's own state dict (no ``model.`` wrapper).
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
)
_TO_LEGACY = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
# Non-persistent buffers that old pickles sometimes carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids", "embed_scale")


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def to_current(state: dict[str, torch.Tensor], *, path: Path | None = None) -> dict[str, Any]:
    """Rename any supported layout to the model's own names."""
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        new = _rename(key, _TO_CURRENT)
        if new in out:
            raise RadGrounderError(
                f"weights: {sources[new]!r} and {key!r} are the same parameter (mixed key layouts)",
                path=path,
            )
        out[new], sources[new] = tensor, key
    return out


def _is_tied(model: Any) -> bool:
    return model.lm_head.weight is model.get_input_embeddings().weight


def current_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights in the current layout, tied ``lm_head.weight`` left out (it is the
    embedding matrix; safetensors refuses shared tensors)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if _is_tied(model):
        state.pop(LM_HEAD_KEY, None)
    return state


def legacy_state_dict(model: Any, *, include_tied: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights in the reference's legacy layout (``language_model.model.*``, …).

    ``include_tied`` keeps ``language_model.lm_head.weight`` as an alias of the embeddings,
    as the reference's ``.bin`` pickles may have it.
    """
    state = current_state_dict(model)
    if include_tied and LM_HEAD_KEY not in state:
        state[LM_HEAD_KEY] = state[EMBED_KEY]
    return {_rename(k, _TO_LEGACY): v for k, v in state.items()}


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def load_strict(model: Any, state: dict[str, torch.Tensor], path: Path | None = None) -> None:
    """Copy ``state`` (any supported layout) into ``model``; every key must match exactly."""
    weights = to_current(state, path=path)
    expected = model.state_dict()
    if _is_tied(model) and EMBED_KEY in weights:
        embed = weights[EMBED_KEY]
        head = weights.get(LM_HEAD_KEY)
        if head is not None and (head.shape != embed.shape or not torch.equal(head, embed)):
            raise RadGrounderError(
                "weights: lm_head.weight differs from the input embeddings, but the config ties "
                "them (tie_word_embeddings)",
                path=path,
            )
        weights[LM_HEAD_KEY] = embed
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        raise RadGrounderError("weights do not match the model: " + "; ".join(parts), path=path)
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise RadGrounderError(
                f"weights: {key} has shape {tuple(weights[key].shape)}, the config expects "
                f"{tuple(tensor.shape)}",
                path=path,
            )
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
