"""PaliGemma-2 configurations for the RadGrounder checkpoints (spec §3.1-3.2, §9.7).

``3b`` has the released checkpoints' shapes (PaliGemma-2 3B/224: SigLIP-So400m/14 + Gemma-2 2B).
``tiny`` keeps the same classes, image size and patch size (so 256 image tokens, as in the
real model, and the 16x16 mask grid) but with very small widths, for tests on a CPU.
"""

from __future__ import annotations

from typing import Any

from radgrounder.errors import RadGrounderError

SIZES = ("tiny", "small", "3b")
VARIANTS = ("detection", "segmentation")
MASK_THRESHOLDS = ("probability", "logit")
DETECTION_ARCH = "PaliGemmaForConditionalGeneration"
SEGMENTATION_ARCH = "GroundedGemmaForConditionalGeneration"
SEG_TOKEN = "</seg>"
IMAGE_TOKEN = "<image>"

# The reference hard-codes these in its model constructor (spec §3.2); storing them in the
# config means a checkpoint describes its own head (spec §9.7).
HEAD_DEFAULTS: dict[str, Any] = {
    "num_layers": 2,
    "num_heads": 8,
    "mlp_ratio": 4,
    "num_classes": 1,
    "mask_size": 224,
    "layer_norm_eps": 1e-5,
}

_VISION = {
    "3b": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
    },
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "small": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
}
_TEXT = {
    "3b": {
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
    },
    # hidden 64 keeps the head's 8 attention heads at an integer width (64 / 8).
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
    },
    # CPU demos that should learn the grounding grammar in minutes; still far below 3b.
    "small": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
    },
}


def _check(value: str, valid: tuple[str, ...], field: str) -> str:
    if value not in valid:
        raise RadGrounderError(
            f"{field}: unknown value {value!r} (expected one of {', '.join(valid)})"
        )
    return value


def attn_implementation(kind: str = "sdpa") -> dict[str, str]:
    """Per-sub-model attention backends: Gemma-2 has no SDPA path (its attention logits are
    soft-capped), so the text model always runs ``eager`` unless ``eager`` is asked for
    everywhere anyway."""
    _check(kind, ("sdpa", "eager"), "attn_implementation")
    return {"": kind, "vision_config": kind, "text_config": "eager"}


def radgrounder_settings(
    variant: str,
    *,
    seg_token_id: int | None = None,
    mask_threshold: str = "probability",
    head: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``radgrounder`` block stored in ``config.json`` so loading needs no manual step."""
    _check(variant, VARIANTS, "variant")
    _check(mask_threshold, MASK_THRESHOLDS, "mask_threshold")
    settings: dict[str, Any] = {
        "format_version": 1,
        "variant": variant,
        "normalization": "reference",
        "mask_threshold": mask_threshold,
    }
    if variant == "segmentation":
        settings["seg_token"] = SEG_TOKEN
        settings["seg_token_id"] = seg_token_id
        settings["head"] = {**HEAD_DEFAULTS, **(head or {})}
    return settings


def model_config(
    size: str,
    variant: str,
    vocab_size: int,
    *,
    image_token_index: int | None = None,
    attn: str = "sdpa",
) -> Any:
    """A ``PaliGemmaConfig`` for ``size`` (``tiny``/``3b``) and ``variant``.

    ``vocab_size`` must equal the tokenizer length. ``image_token_index`` defaults to where the
    PaliGemma layout puts ``<image>``: right before the variant's grounding tokens, i.e.
    ``vocab_size - len(grounding tokens) - 1`` (257152 for the released checkpoints); pass
    the tokenizer's id when in doubt.
    """
    from transformers import PaliGemmaConfig

    from radgrounder.modeling.tokenizer import GROUNDING_TOKENS

    _check(size, SIZES, "size")
    _check(variant, VARIANTS, "variant")
    if image_token_index is None:
        image_token_index = vocab_size - len(GROUNDING_TOKENS[variant]) - 1
    if not 0 <= image_token_index < vocab_size:
        raise RadGrounderError(
            f"image_token_index: {image_token_index} is outside the vocabulary "
            f"(0..{vocab_size - 1})"
        )
    text = _TEXT[size]
    vision_config = {
        "model_type": "siglip_vision_model",
        **_VISION[size],
        "patch_size": 14,
        "image_size": 224,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,
    }
    text_config = {
        "model_type": "gemma2",
        **text,
        "vocab_size": vocab_size,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        # transformers 4.54's PaliGemma never applied Gemma-2's final-logit cap; the released
        # checkpoints were trained without it (radgrounder.modeling.softcap).
        "final_logit_softcapping": None,
        "max_position_embeddings": 8192,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
    }
    arch = SEGMENTATION_ARCH if variant == "segmentation" else DETECTION_ARCH
    return PaliGemmaConfig(
        vision_config=vision_config,
        text_config=text_config,
        # The projector writes straight into the LM's embedding space.
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        vocab_size=vocab_size,
        image_token_index=image_token_index,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        architectures=[arch],
        radgrounder=radgrounder_settings(variant),
        attn_implementation=attn_implementation(attn),
    )


def settings_of(config: Any) -> dict[str, Any]:
    """The ``radgrounder`` block of a config object or raw ``config.json`` dict (empty for a
    stock PaliGemma config)."""
    if isinstance(config, dict):
        value = config.get("radgrounder")
    else:
        value = getattr(config, "radgrounder", None)
    return dict(value) if isinstance(value, dict) else {}


def head_settings(config: Any) -> dict[str, Any]:
    return {**HEAD_DEFAULTS, **settings_of(config).get("head", {})}
