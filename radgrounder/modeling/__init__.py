"""Models, tokenizers and checkpoints: the RadGrounder PaliGemma-2 detection and segmentation
variants (spec §3).

Names are imported lazily, so ``from radgrounder.modeling import build_tokenizer`` does not pull
in torch and the model code.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GROUNDING_TOKENS": "tokenizer",
    "build_tokenizer": "tokenizer",
    "model_config": "configs",
    "GroundedGemmaForConditionalGeneration": "grounded_gemma",
    "SegmentationDecoder": "grounded_gemma",
    "lm_loss_sum": "grounded_gemma",
    "mask_loss": "grounded_gemma",
    "LoadedModel": "checkpoint",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "legacy_state_dict": "keys",
    "init_model": "initialize",
    "Generated": "generation",
    "generate": "generation",
}

__all__ = [
    "GROUNDING_TOKENS",
    "Generated",
    "GroundedGemmaForConditionalGeneration",
    "LoadedModel",
    "SegmentationDecoder",
    "build_tokenizer",
    "generate",
    "init_model",
    "legacy_state_dict",
    "lm_loss_sum",
    "load_model",
    "mask_loss",
    "model_config",
    "save_model",
]

if TYPE_CHECKING:
    from radgrounder.modeling.checkpoint import LoadedModel, load_model, save_model
    from radgrounder.modeling.configs import model_config
    from radgrounder.modeling.generation import Generated, generate
    from radgrounder.modeling.grounded_gemma import (
        GroundedGemmaForConditionalGeneration,
        SegmentationDecoder,
        lm_loss_sum,
        mask_loss,
    )
    from radgrounder.modeling.initialize import init_model
    from radgrounder.modeling.keys import legacy_state_dict
    from radgrounder.modeling.tokenizer import GROUNDING_TOKENS, build_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radgrounder.modeling' has no attribute {name!r}")
    value = getattr(import_module(f"radgrounder.modeling.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
