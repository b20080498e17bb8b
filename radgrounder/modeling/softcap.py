"""Gemma-2's two soft-caps, as switches.

- The **final-logit soft-cap** (``30 * tanh(logits / 30)``): transformers 5.x's PaliGemma
  applies it when the text config sets ``final_logit_softcapping``; transformers 4.54, which
  trained the released checkpoints, never did. Off by default, so logits, probabilities,
  scores and fine-tuning losses are those of training.
- The **attention-logit soft-cap** (``50 * tanh(scores / 50)``): eager attention applies it;
  the released models were trained with eager attention, so it is on by default. The
  reference's *evaluation* ran with sdpa attention, which skipped it; ``compat="reference"``
  in evaluation turns it off to reproduce those numbers.

Both are recorded in ``config.radgrounder`` (``final_logit_softcap``, ``attention_softcap``)
and in an evaluation's ``summary.json``.
"""

from __future__ import annotations

from typing import Any

FINAL_LOGIT_SOFTCAP = 30.0
ATTENTION_SOFTCAP = 50.0
DEFAULTS = {"final_logit_softcap": False, "attention_softcap": True}


def softcap_settings(
    config: Any, *, final_logit_softcap: bool | None = None, attention_softcap: bool | None = None
) -> dict[str, bool]:
    """The switches to use: the arguments, else what ``config.radgrounder`` records, else the
    training defaults."""
    stored = getattr(config, "radgrounder", None) or {}
    final = stored.get("final_logit_softcap", DEFAULTS["final_logit_softcap"])
    attention = stored.get("attention_softcap", DEFAULTS["attention_softcap"])
    return {
        "final_logit_softcap": bool(final if final_logit_softcap is None else final_logit_softcap),
        "attention_softcap": bool(attention if attention_softcap is None else attention_softcap),
    }


def apply_softcaps(
    config: Any, *, final_logit_softcap: bool | None = None, attention_softcap: bool | None = None
) -> dict[str, bool]:
    """Set both soft-caps in ``config`` (before the model is built from it) and record them in
    ``config.radgrounder``; returns the settings."""
    settings = softcap_settings(
        config, final_logit_softcap=final_logit_softcap, attention_softcap=attention_softcap
    )
    text = config.get_text_config()
    text.final_logit_softcapping = FINAL_LOGIT_SOFTCAP if settings["final_logit_softcap"] else None
    text.attn_logit_softcapping = ATTENTION_SOFTCAP if settings["attention_softcap"] else None
    config.radgrounder = {**(getattr(config, "radgrounder", None) or {}), **settings}
    return settings


def set_softcaps(
    model: Any, *, final_logit_softcap: bool | None = None, attention_softcap: bool | None = None
) -> dict[str, bool]:
    """:func:`apply_softcaps` on a built model: its config and every attention layer (Gemma-2
    copies the attention cap into each layer when it is built)."""
    settings = apply_softcaps(
        model.config, final_logit_softcap=final_logit_softcap, attention_softcap=attention_softcap
    )
    cap = ATTENTION_SOFTCAP if settings["attention_softcap"] else None
    for module in model.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = cap
    return settings
