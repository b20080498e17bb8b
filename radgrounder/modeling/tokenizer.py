"""A PaliGemma-2-shaped tokenizer built offline, for tests and randomly initialised models.

Ids are laid out like the real one (spec §2.1): Gemma's ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
``<unk>`` 3, ``<mask>`` 4, then the text vocabulary (byte fallback + BPE merges learned from a
small built-in corpus, padded with ``<unusedN>`` to ``base_vocab_size``), then ``<loc0000>`` …
``<loc1023>``, ``<seg000>`` … ``<seg127>``, ``<image>``, then the variant's grounding tokens.
With ``base_vocab_size=256000`` every special id equals the released checkpoints' ids.

``<mask>`` matters beyond fidelity: transformers 5.x's Gemma tokenizer appends it when a
vocabulary lacks it, so a tokenizer without it loads there with one token more than the model's
embeddings. :func:`save_tokenizer` writes files that transformers 4.5x and 5.x both read as a
``GemmaTokenizerFast`` with exactly the saved tokens; :func:`load_tokenizer` repairs folders
written without ``<mask>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
MASK_TOKEN = "<mask>"
# Gemma's special ids 0-4 (spec §2.1); everything else is placed after them.
_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", MASK_TOKEN)
# A class name transformers 4.5x and 5.x both resolve; PaliGemmaProcessor insists on it in 4.5x.
PORTABLE_TOKENIZER_CLASS = "GemmaTokenizerFast"
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

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
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
        mask_token=MASK_TOKEN,
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


def _token_id(tokenizer: Any, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def portable_tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """``tokenizer_config.json`` that transformers 4.5x and 5.x both load as the same tokens.

    5.x writes ``TokenizersBackend`` (unknown to 4.x) and ``extra_special_tokens`` as a list
    (4.x expects a dict there and fails), so the fields are written here in the spelling both
    read. ``mask_token`` is ``null`` for a vocabulary without ``<mask>``: otherwise 5.x's
    Gemma tokenizer would append one.
    """
    config: dict[str, Any] = {"tokenizer_class": PORTABLE_TOKENIZER_CLASS}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            config[name] = str(value)
    mask = getattr(tokenizer, "mask_token", None) or MASK_TOKEN
    config["mask_token"] = str(mask) if _token_id(tokenizer, str(mask)) is not None else None
    extra = getattr(tokenizer, "extra_special_tokens", None)
    if extra is None:
        extra = getattr(tokenizer, "additional_special_tokens", None) or []
    if isinstance(extra, dict):
        config["extra_special_tokens"] = {k: str(v) for k, v in extra.items()}
    else:
        config["additional_special_tokens"] = [str(t) for t in extra]
    config.update(
        add_bos_token=bool(getattr(tokenizer, "add_bos_token", False)),
        add_eos_token=bool(getattr(tokenizer, "add_eos_token", False)),
        padding_side=tokenizer.padding_side,
        clean_up_tokenization_spaces=bool(tokenizer.clean_up_tokenization_spaces),
        model_max_length=tokenizer.model_max_length,
        processor_class="PaliGemmaProcessor",
    )
    return config


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """Write ``tokenizer.json``, a portable ``tokenizer_config.json`` and
    ``special_tokens_map.json`` to ``folder`` (see :func:`portable_tokenizer_config`)."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    config = portable_tokenizer_config(tokenizer)
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
    special = {k: config[k] for k in names if config.get(k) is not None}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if key in config:
            special[key] = config[key]
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")


_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template")


def _load_without_mask(folder: Path) -> Any:
    """The folder's tokenizer with ``mask_token`` unset. The files are patched in a temporary
    copy: transformers 5.x lets ``special_tokens_map.json`` override a ``mask_token=None``
    argument."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="radgrounder-tokenizer-") as tmp:
        for file in folder.iterdir():
            if file.is_file() and file.name.startswith(_TOKENIZER_FILES):
                (Path(tmp) / file.name).write_bytes(file.read_bytes())
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = Path(tmp) / name
            if path.exists():
                data = json.loads(path.read_text(encoding="utf-8"))
                data["mask_token"] = None
                path.write_text(json.dumps(data), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp, mask_token=None)


def load_tokenizer(folder: str | Path, *, vocab_size: int | None = None) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``, repaired where transformers appended a
    ``<mask>`` the saved vocabulary lacks (Gemma's tokenizer class does that in 5.x), which
    would leave it one token longer than ``vocab_size``."""
    import logging

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        appended = vocab_size is not None and len(tokenizer) == vocab_size + 1
        if appended and _token_id(tokenizer, MASK_TOKEN) == vocab_size:
            logging.getLogger(__name__).warning(
                "%s: the tokenizer has no %s token and transformers appended one; loading "
                "it without (re-save with radgrounder to make the folder portable)",
                folder,
                MASK_TOKEN,
            )
            tokenizer = _load_without_mask(Path(folder))
    except Exception as exc:  # missing/corrupt tokenizer files raise assorted types
        raise RadGrounderError(f"cannot load the tokenizer: {exc}", path=folder) from exc
    return tokenizer
