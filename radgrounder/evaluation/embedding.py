"""Embedding similarity with a user-supplied local sentence encoder.

:class:`SentenceEncoder` loads a Hugging Face model folder (plain ``save_pretrained`` layout
or a sentence-transformers folder) from disk only, never from the network, and turns texts
into L2-normalised float32 vectors. :func:`embedding_similarity` scores prediction/reference
pairs by cosine similarity; :func:`keyword_matcher` makes a keyword similarity callable for
:func:`radgrounder.evaluation.metrics.grounding_iou`.

torch and transformers are imported when an encoder is built, not with this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError

__all__ = ["POOLING_MODES", "SentenceEncoder", "embedding_similarity", "keyword_matcher"]

#: Pooling modes :class:`SentenceEncoder` implements.
POOLING_MODES = ("mean", "cls", "lasttoken")
_DEFAULT_MAX_LENGTH = 256

# sentence-transformers Pooling config flags -> our mode name (None: not implemented here)
_ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": None,
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RadGrounderError(f"sentence encoder: cannot read JSON ({exc})", path=path) from exc


def _pooling_from_config(path: Path) -> str:
    """Our pooling mode for a sentence-transformers ``Pooling`` ``config.json``."""
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise RadGrounderError("sentence encoder: Pooling config is not a JSON object", path=path)
    if isinstance(cfg.get("pooling_mode"), str):
        modes = [cfg["pooling_mode"].lower()]
    else:
        modes = [flag for flag in _ST_POOLING_FLAGS if cfg.get(flag)]
        modes = [_ST_POOLING_FLAGS[flag] or flag for flag in modes]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise RadGrounderError(
            f"sentence encoder: unsupported pooling {'+'.join(modes) or 'none'}; "
            f"SentenceEncoder implements exactly one of {', '.join(POOLING_MODES)}",
            path=path,
        )
    return modes[0]


def _read_sentence_transformers_layout(folder: Path) -> tuple[Path, str | None, dict[str, Any]]:
    """(transformer folder, pooling from the folder or None, sentence_bert_config)."""
    model_dir, pooling_cfg = folder, None
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise RadGrounderError(
                "sentence encoder: modules.json is not a list of modules", path=modules_file
            )
        kinds = []
        for m in sorted(modules, key=lambda m: int(m.get("idx", 0))):
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            sub = folder / str(m.get("path", ""))
            kinds.append(kind)
            if kind == "Transformer":
                model_dir = sub
            elif kind == "Pooling":
                pooling_cfg = sub / "config.json"
            elif kind == "Normalize":
                pass  # encode() L2-normalises anyway
            elif kind == "Dense":
                raise RadGrounderError(
                    f"sentence encoder: the model has a Dense module ({m.get('path')}) that "
                    "projects the pooled vector; SentenceEncoder does not apply it, so its "
                    "similarities would differ from the model's. Use sentence-transformers "
                    "for this model, or a folder without a Dense module",
                    path=folder,
                )
            else:
                raise RadGrounderError(
                    f"sentence encoder: modules.json lists a {m.get('type')!r} module, which "
                    "SentenceEncoder does not implement (supported: Transformer, Pooling, "
                    "Normalize)",
                    path=folder,
                )
        if kinds[:2] != ["Transformer", "Pooling"] or len(set(kinds)) != len(kinds):
            raise RadGrounderError(
                f"sentence encoder: modules.json has modules {kinds}; SentenceEncoder needs "
                "Transformer, Pooling and optionally Normalize, in that order",
                path=modules_file,
            )
    else:
        dense = sorted(p.name for p in folder.glob("*_Dense") if p.is_dir())
        if dense:
            raise RadGrounderError(
                f"sentence encoder: the folder has a Dense module ({dense[0]}) that "
                "SentenceEncoder cannot apply; use sentence-transformers for this model",
                path=folder,
            )
        if (folder / "1_Pooling" / "config.json").is_file():
            pooling_cfg = folder / "1_Pooling" / "config.json"
    pooling = None if pooling_cfg is None else _pooling_from_config(pooling_cfg)
    st_config_file = model_dir / "sentence_bert_config.json"
    st_config = _read_json(st_config_file) if st_config_file.is_file() else {}
    return model_dir, pooling, st_config if isinstance(st_config, dict) else {}


def _blank(text: str) -> bool:
    return not text.strip()


class SentenceEncoder:
    """A local sentence encoder: transformer, pooling, L2 normalisation.

    ``path`` is a folder on disk with a Hugging Face model and its tokenizer
    (``save_pretrained`` layout), loaded with ``AutoTokenizer``/``AutoModel`` and
    ``local_files_only=True``, so nothing is ever downloaded; a missing folder or one that
    cannot be loaded raises :class:`RadGrounderError`. The model runs in float32 in eval mode
    on ``device`` (default: ``"cuda"`` if available, else ``"cpu"``).

    sentence-transformers folders are read as follows: ``modules.json`` must list
    ``Transformer`` (its ``path`` is the model folder), ``Pooling`` (its ``config.json``
    fixes the pooling) and optionally ``Normalize`` (a no-op here, vectors are always
    normalised). Any other module, in particular ``Dense``, is refused with an error rather
    than skipped, since skipping it would change the numbers. Without ``modules.json`` a
    ``1_Pooling/config.json`` is still honoured. ``sentence_bert_config.json`` supplies
    ``max_seq_length`` (used when ``max_length`` is None) and ``do_lower_case`` (texts are
    lower-cased before tokenising). Prompts and ``similarity_fn_name`` are ignored: this
    class always scores by cosine.

    Pooling of the last hidden states over the tokens the attention mask marks as real:
    ``"mean"`` (their average; the default when the folder fixes none), ``"cls"`` (the first
    real token, i.e. position 0 with right padding) or ``"lasttoken"`` (the last real
    token). ``pooling`` must agree with the folder's Pooling config when both are given.
    Texts are truncated to ``max_length`` tokens (None: the folder's ``max_seq_length``,
    else 256). Because pooling honours the mask, a text's vector does not depend on what it
    is batched with (up to float rounding).

    Embeddings are cached in memory per text (after lower-casing, if any) for the encoder's
    lifetime, so repeated texts run through the model once; :meth:`clear_cache` empties it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | None = None,
        batch_size: int = 32,
        pooling: str | None = None,
        max_length: int | None = None,
    ) -> None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise RadGrounderError(
                "sentence encoder folder not found; pass a local folder holding the model "
                "and tokenizer (nothing is downloaded)",
                path=folder,
            )
        if batch_size < 1:
            raise RadGrounderError(f"sentence encoder: batch_size must be >= 1, got {batch_size}")
        if pooling is not None and pooling not in POOLING_MODES:
            raise RadGrounderError(
                f"sentence encoder: pooling must be one of {', '.join(POOLING_MODES)}, "
                f"got {pooling!r}"
            )
        model_dir, folder_pooling, st_config = _read_sentence_transformers_layout(folder)
        if folder_pooling is not None and pooling is not None and pooling != folder_pooling:
            raise RadGrounderError(
                f"sentence encoder: pooling={pooling!r} contradicts the folder's Pooling "
                f"config ({folder_pooling!r}); leave pooling unset to use the folder's",
                path=folder,
            )
        self.path = folder
        self.pooling: str = folder_pooling or pooling or "mean"
        if max_length is None:
            max_length = int(st_config.get("max_seq_length") or _DEFAULT_MAX_LENGTH)
        if max_length < 1:
            raise RadGrounderError(f"sentence encoder: max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.batch_size = batch_size
        self.lowercase = bool(st_config.get("do_lower_case", False))

        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise RadGrounderError(
                f"sentence encoder: cannot load a model and tokenizer from this folder "
                f"({type(exc).__name__}: {exc})",
                path=model_dir,
            ) from exc
        self.model = model.to(device=self.device, dtype=torch.float32).eval()
        self._cache: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        """Length of the embedding vectors (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def clear_cache(self) -> None:
        """Forget all cached embeddings."""
        self._cache.clear()

    def _key(self, text: str) -> str:
        return text.lower() if self.lowercase else text

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        inputs = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].to(hidden.dtype)
            if self.pooling == "mean":
                pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(
                    min=1e-9
                )
            else:
                if self.pooling == "cls":
                    index = mask.argmax(1)  # first real token
                else:  # lasttoken
                    index = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # last real token
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy().astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as a float32 array of shape (len(texts), dim) with
        L2-normalised rows (an all-zero pooled vector stays zero). Texts not yet cached are
        run through the model in batches of ``batch_size`` (sorted by length to limit
        padding) under ``torch.inference_mode``."""
        if isinstance(texts, str):
            raise RadGrounderError("sentence encoder: encode() takes a sequence of texts")
        keys = []
        for t in texts:
            if not isinstance(t, str):
                raise RadGrounderError(
                    f"sentence encoder: texts must be strings, got {type(t).__name__}"
                )
            keys.append(self._key(t))
        todo = sorted({k for k in keys if k not in self._cache}, key=len)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for key, vec in zip(batch, self._encode_batch(batch), strict=True):
                self._cache[key] = vec
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[k] for k in keys]).astype(np.float32, copy=False)

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the embeddings of ``a`` and ``b``, clipped to [-1, 1]
        against rounding. Blank texts (empty or whitespace only) are not encoded: two blank
        texts give 1.0, one blank text gives 0.0."""
        if _blank(a) or _blank(b):
            return float(_blank(a) and _blank(b))
        va, vb = self.encode([a, b])
        return float(np.clip(np.dot(va, vb), -1.0, 1.0))


def embedding_similarity(
    preds: Sequence[str], refs: Sequence[str], encoder: SentenceEncoder
) -> list[float]:
    """Per-pair cosine similarity of prediction and reference embeddings.

    Same definition as :meth:`SentenceEncoder.similarity` (cosine clipped to [-1, 1]; both
    blank -> 1.0, one blank -> 0.0); all non-blank texts are encoded together in batches.
    """
    if len(preds) != len(refs):
        raise RadGrounderError(
            f"embedding_similarity: {len(preds)} predictions but {len(refs)} references; "
            "need one each"
        )
    encoder.encode([t for t in (*preds, *refs) if not _blank(t)])  # fills the cache
    return [encoder.similarity(p, r) for p, r in zip(preds, refs, strict=True)]


def keyword_matcher(
    encoder: SentenceEncoder, *, clamp: bool = False
) -> Callable[[str, str], float]:
    """A keyword similarity for ``grounding_iou(pred_pairs, ref_pairs, matcher=...)``.

    ``matcher(pred_kw, ref_kw)`` is :meth:`SentenceEncoder.similarity` of the keywords with
    ``_`` read as a space, in [-1, 1]; with ``clamp=True`` it is clipped to [0, 1] (the
    reference's segmentation evaluator clamps, its detection evaluator does not). Note that
    with ``denominator="matched"`` pairs of similarity <= 0 do not count as matched.
    Each distinct keyword is encoded once (the encoder's cache); to batch the work, call
    ``encoder.encode`` on all keywords (underscores replaced) beforehand.
    """

    def matcher(pred_kw: str, ref_kw: str) -> float:
        sim = encoder.similarity(pred_kw.replace("_", " "), ref_kw.replace("_", " "))
        return min(1.0, max(0.0, sim)) if clamp else sim

    return matcher
