"""A PaliGemma-2-shaped tokenizer built offline, for tests and randomly initialised models.

Ids are laid out like the real one (spec §2.1): ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
``<unk>`` 3, then the text vocabulary (byte fallback + BPE merges learned from a small
built-in corpus, padded with ``<unusedN>`` to ``base_vocab_size``), then ``<loc0000>`` …
``<loc1023>``, ``<seg000>`` … ``<seg127>``, ``<image>``, then the variant's grounding tokens.
With ``base_vocab_size=256000`` every special id equals the released checkpoints' ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from radgrounder.errors import RadGrounderError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

GROUNDING_TOKENS = {
    "detection": ("<p bbox=", "</p>", "id="),
    "segmentation": ("<seg>", "</seg>"),
    "base": (),
}
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(1024))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(128))
_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")
_BYTES = tuple(f"<0x{i:02X}>" for i in range(256))


def _corpus() -> list[str]:
    from radgrounder.resources import load_json

    lines = [
        "Caption this image: Beschreibe dieses Bild:",
        "Caption this image and detect keywords: segment keywords:",
        "Beschreibe dieses Bild und detektiere Schlüsselwörter: segmentiere die Schlüsselwörter:",
        "Clinical information: Question: Klinische angaben: Fragestellung: Answer: Antwort:",
        "No focal lesion in the liver. The spleen is normal in size. Keine fokale Läsion.",
        "Multiple hypodense lesions in the liver, largest 2. 2 cm. Yes No Ja Nein",
        "What modality is used to take this image? Which organ is abnormal? CT MRI X-Ray",
    ]
    for lang in ("english", "german"):
        names = load_json(f"label_map/class_2_organ_name_{lang}.json")
        lines.extend(names.values())
        for item in load_json(f"detect_vqa/vqa_templates_{lang}.json"):
            lines.extend(str(v) for v in item.values())
    return lines


def build_tokenizer(
    variant: str = "detection", *, base_vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """A fast tokenizer with PaliGemma-2's id layout plus the ``variant``'s grounding tokens.

    ``variant`` is ``detection`` (adds ``<p bbox=``, ``</p>``, ``id=``), ``segmentation``
    (adds ``<seg>``, ``</seg>``) or ``base``. Padding is on the left, and no BOS/EOS is added
    automatically: prompts place them themselves (spec §1.2).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    if variant not in GROUNDING_TOKENS:
        raise RadGrounderError(
            f"variant: unknown value {variant!r} (expected one of {', '.join(GROUNDING_TOKENS)})"
        )
    floor = len(_SPECIAL) + len(_BYTES) + 64
    if base_vocab_size < floor:
        raise RadGrounderError(f"base_vocab_size: must be at least {floor}, got {base_vocab_size}")

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=min(base_vocab_size, 2000),
        special_tokens=[*_SPECIAL, *_BYTES],
        show_progress=False,
        limit_alphabet=200,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    size = tok.get_vocab_size()
    if size < base_vocab_size:
        tok.add_tokens(
            [AddedToken(f"<unused{i}>", special=True) for i in range(base_vocab_size - size)]
        )
    tok.add_tokens([AddedToken(t, normalized=False) for t in (*LOC_TOKENS, *SEG_TOKENS)])
    grounding = GROUNDING_TOKENS[variant]
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )
    wrapped.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if grounding:
        # Added as special tokens, as the reference does, so decoding must keep specials.
        wrapped.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in grounding],
            special_tokens=True,
        )
    return wrapped
