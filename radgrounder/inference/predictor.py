"""``Predictor``: RadGrounder checkpoints on CT/MR slices and images, batched.

The same preprocessing and prompt layout as training (spec §1, §4); greedy decoding with a
KV cache over left-padded batches; boxes and masks mapped back to each input slice's own
pixel grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.datasets import Example
from radgrounder.errors import RadGrounderError
from radgrounder.grounding import GroundedText, Span, codec
from radgrounder.imaging import (
    Slice,
    Volume,
    load_scan,
    preprocess_rgb_image,
    preprocess_slice,
    resize_nearest,
)
from radgrounder.prompts import build_prompt

LANGUAGES = ("en", "de")
TASKS = {
    "detection": ("report", "grounded-report", "vqa", "detect"),
    "segmentation": ("report", "grounded-report", "vqa", "segment"),
}
_QUESTION = {  # the first affirmative grounding-VQA template of each language
    "en": "Is the {} present in the image?",
    "de": "Ist die {} im Bild vorhanden?",
}
ImageInput = str | Path | Slice | np.ndarray
# Text tokens a prompt may hold (the image tokens not counted). The reference budgets 200
# tokens for prompt plus answer (``max_length``); its templates take 16-23.
DEFAULT_MAX_PROMPT_TOKENS = 256
# Text longer than this many characters per allowed token is refused before tokenising.
_CHARS_PER_TOKEN_LIMIT = 64


class PromptTooLong(RadGrounderError):
    """The question and clinical fields make a prompt longer than ``max_prompt_tokens``."""

    def __init__(self, message: str, n_tokens: int | None, limit: int) -> None:
        super().__init__(message)
        self.n_tokens = n_tokens
        self.limit = limit


@dataclass
class Prediction:
    """One answer for one image or slice.

    ``grounded`` holds the decoded text; span boxes are normalised to the input image
    ([0, 1], x first) and span masks (segmentation model) are bool arrays of the input's own
    ``(height, width)``. ``timings`` has ``preprocess_s``, ``generate_s`` (this sample's share
    of its batch) and ``total_s``.
    """

    task: str
    language: str
    prompt: str
    raw_text: str
    grounded: GroundedText
    width: int
    height: int
    source: str | None = None
    slice_index: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: one ``predictions.jsonl`` line (masks are written by the caller)."""
        from radgrounder.anatomy import load_schema

        names = load_schema().display_names(self.language)
        spans = []
        for s in self.grounded.spans:
            spans.append(
                {
                    "label": s.label,
                    "start": s.start,
                    "end": s.end,
                    "class_id": s.class_id,
                    "class_name": s.class_name,
                    "display_name": names.get(s.class_id, s.label) if s.class_id else s.label,
                    "boxes": [[round(v, 6) for v in b.as_tuple()] for b in s.boxes],
                    "boxes_px": [
                        [round(v, 3) for v in b.to_pixels(self.width, self.height)] for b in s.boxes
                    ],
                    "mask": None,
                }
            )
        return {
            "input": self.source,
            "slice_index": self.slice_index,
            "task": self.task,
            "language": self.language,
            "prompt": self.prompt,
            "raw_text": self.raw_text,
            "text": self.grounded.text,
            "spans": spans,
            "problems": list(self.grounded.problems),
            "width": self.width,
            "height": self.height,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }


@dataclass
class Prepared:
    """A preprocessed, prompted model input. The per-structure questions of one image
    (tasks ``detect``/``segment``) share ``example.image`` and ``group`` and are joined
    back into one :class:`Prediction` by :meth:`Predictor.run`."""

    example: Example
    width: int
    height: int
    source: str | None
    slice_index: int | None
    group: int
    preprocess_s: float


def _ids(structures: Sequence[str | int], language: str) -> list[int]:
    from radgrounder.anatomy import load_schema
    from radgrounder.anatomy.synonyms import lookup

    schema = load_schema()
    ids = []
    for s in structures:
        if isinstance(s, int | np.integer) and not isinstance(s, bool):
            found = [int(s)] if int(s) in schema.ids else []
        else:
            text = str(s).strip()
            found = [schema.get(text).id] if text in schema else []
            found = found or [schema.by_name(n).id for n in lookup(text, language)]
        if not found:
            raise RadGrounderError(
                f"structures: {s!r} is not a class of the 121-class schema "
                "(use a class name such as 'liver' or an English/German term)"
            )
        ids.extend(c for c in found if c not in ids)
    return ids


def _join(parts: Sequence[GroundedText], sep: str = "\n") -> GroundedText:
    text, spans, problems = "", [], []
    for i, g in enumerate(parts):
        if i:
            text += sep
        spans += [replace(s, start=s.start + len(text), end=s.end + len(text)) for s in g.spans]
        problems += g.problems
        text += g.text
    return GroundedText(text, spans, problems)


class Predictor:
    """Load a checkpoint once and answer many requests.

    ``Predictor("models/detection").predict(["slice.dcm"], "grounded-report")``
    """

    def __init__(
        self,
        model: str | Path | Any,
        device: str | None = None,
        dtype: str | None = None,
        *,
        preset: str | None = None,
        mask_threshold: str | None = None,
        batch_size: int = 8,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    ) -> None:
        from radgrounder.modeling import load_model

        if batch_size < 1:
            raise RadGrounderError(f"batch_size: must be at least 1, got {batch_size}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise RadGrounderError(
                f"max_prompt_tokens: must be at least 1 (or None), got {max_prompt_tokens}"
            )
        self.loaded = (
            model
            if hasattr(model, "tokenizer")
            else load_model(model, device=device, dtype=dtype, mask_threshold=mask_threshold)
        )
        self.variant: str = self.loaded.variant
        self.tasks: tuple[str, ...] = TASKS[self.variant]
        self.languages = LANGUAGES
        self.preset = preset or self.loaded.config.radgrounder.get("normalization", "reference")
        self.mask_threshold = mask_threshold
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.size = int(self.loaded.config.vision_config.image_size)

    # -- inputs ------------------------------------------------------------------------------

    def _image(self, item: ImageInput) -> tuple[np.ndarray, int, int, str | None, int | None]:
        """(model input, width, height, source, slice index) of one input."""
        if isinstance(item, Slice):
            h, w = item.pixels.shape[:2]
            x = preprocess_slice(item, preset=self.preset, size=self.size)
            return x, w, h, item.source, item.index
        if isinstance(item, np.ndarray):
            if item.ndim != 2:
                raise RadGrounderError(f"image array: expected (rows, cols), got {item.shape}")
            h, w = item.shape
            return (
                preprocess_slice(item, None, preset=self.preset, size=self.size),
                w,
                h,
                None,
                None,
            )
        if not isinstance(item, str | Path):
            raise RadGrounderError(
                f"images: expected a path, Slice or 2-D array, got {type(item).__name__}"
            )
        vol = load_scan(item)
        k = vol.n_slices // 2
        if vol.kind == "image" and vol.modality is None:
            h, w = vol.data.shape[1:3]
            return (
                preprocess_rgb_image(item, preset=self.preset, size=self.size),
                w,
                h,
                str(item),
                0,
            )
        return self._image(replace(vol.slice(k), source=str(item)))

    def _prompts(self, task: str, language: str, **kw: Any) -> list[str]:
        question = kw.get("question")
        if task in ("report", "grounded-report"):
            name = "report"
            if task == "grounded-report":
                name = f"grounded-report-{'detect' if self.variant == 'detection' else 'segment'}"
            return [
                build_prompt(
                    name,
                    language,
                    clinical_info=kw.get("clinical_info"),
                    clinical_question=kw.get("clinical_question"),
                )
            ]
        if task == "vqa":
            return [build_prompt("vqa", language, question=question, choices=kw.get("choices"))]
        from radgrounder.anatomy import load_schema

        if not kw.get("structures"):
            raise RadGrounderError(f"structures: task {task!r} needs at least one structure")
        names = load_schema().display_names(language)
        return [
            build_prompt("grounded-vqa", language, question=_QUESTION[language].format(names[c]))
            for c in _ids(kw["structures"], language)
        ]

    def check_prompt(self, prompt: str, fields: Sequence[str] = ()) -> int:
        """The number of text tokens in ``prompt``; :class:`PromptTooLong` past
        ``max_prompt_tokens`` (``fields`` name what the user typed, for the message)."""
        limit = self.max_prompt_tokens
        what = " and ".join(fields) or "the prompt"
        if limit is None:
            return len(self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        max_chars = limit * _CHARS_PER_TOKEN_LIMIT
        if len(prompt) > max_chars:
            raise PromptTooLong(
                f"{what}: too long ({len(prompt)} characters; the prompt may hold at most "
                f"{limit} tokens, max_prompt_tokens)",
                None,
                limit,
            )
        n = len(self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise PromptTooLong(
                f"{what}: too long (the prompt would be {n} tokens; at most {limit}, "
                "max_prompt_tokens)",
                n,
                limit,
            )
        return n

    def prompts(
        self,
        task: str,
        language: str = "en",
        *,
        question: str | None = None,
        choices: Sequence[str] | None = None,
        clinical_info: str | None = None,
        clinical_question: str | None = None,
        structures: Sequence[str | int] | None = None,
    ) -> list[str]:
        """The prompts a request makes (one per structure for ``detect``/``segment``),
        validated and within ``max_prompt_tokens``; no image is touched, so a server can
        refuse a request before decoding its upload."""
        if task not in self.tasks:
            raise RadGrounderError(
                f"task: {task!r} is not available for the {self.variant} model "
                f"(expected one of {', '.join(self.tasks)})"
            )
        if language not in LANGUAGES:
            raise RadGrounderError(f"language: expected en or de, got {language!r}")
        prompts = self._prompts(
            task,
            language,
            question=question,
            choices=choices,
            clinical_info=clinical_info,
            clinical_question=clinical_question,
            structures=structures,
        )
        typed = [
            name
            for name, value in (
                ("question", question),
                ("choices", choices),
                ("clinical_info", clinical_info),
                ("clinical_question", clinical_question),
            )
            if value
        ]
        for prompt in dict.fromkeys(prompts):
            self.check_prompt(prompt, typed)
        return prompts

    def prepare(
        self,
        images: Sequence[ImageInput],
        task: str,
        language: str = "en",
        *,
        question: str | None = None,
        choices: Sequence[str] | None = None,
        clinical_info: str | None = None,
        clinical_question: str | None = None,
        structures: Sequence[str | int] | None = None,
    ) -> list[Prepared]:
        """Validate and preprocess; the result can be :meth:`run` alone or batched with
        items of other calls."""
        if isinstance(images, str | Path | Slice | np.ndarray):
            images = [images]
        prompts = self.prompts(
            task,
            language,
            question=question,
            choices=choices,
            clinical_info=clinical_info,
            clinical_question=clinical_question,
            structures=structures,
        )
        out = []
        for group, item in enumerate(images):
            t0 = time.perf_counter()
            x, w, h, source, index = self._image(item)
            dt = time.perf_counter() - t0
            for prompt in prompts:
                ex = Example(f"{group}", "predict", task, language, x, prompt, "", [], {})
                out.append(Prepared(ex, w, h, source, index, group, dt / len(prompts)))
        return out

    # -- generation --------------------------------------------------------------------------

    def _decode(self, text: str, masks: list[np.ndarray], p: Prepared) -> GroundedText:
        from radgrounder.anatomy import load_schema
        from radgrounder.evaluation.parsing import clean_generated

        schema = load_schema()
        text = clean_generated(text, self.variant)
        if self.variant == "detection":
            return codec("radgrounder-detect", class_names=schema.names_by_id()).decode(text)
        from radgrounder.anatomy.synonyms import lookup

        g = codec("radgrounder-segment").decode(text, masks)
        spans: list[Span] = []
        for s in g.spans:
            mask = (
                None
                if s.mask is None
                else resize_nearest(np.asarray(s.mask, bool), p.height, p.width)
            )
            names = lookup(s.label, p.example.language)
            cls = schema.by_name(names[0]) if len(names) == 1 else None
            spans.append(
                replace(
                    s,
                    mask=mask,
                    class_id=cls.id if cls else None,
                    class_name=cls.name if cls else None,
                )
            )
        return GroundedText(g.text, spans, g.problems)

    def run(
        self,
        items: Sequence[Prepared],
        max_new_tokens: int = 200,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Prediction]:
        """Generate for prepared items in batches of ``batch_size``; one :class:`Prediction`
        per image (per-structure answers of ``detect``/``segment`` are joined).
        ``should_stop`` (asked after every token) ends generation early; the answers are then
        cut short (a server uses it when every client of a batch has gone)."""
        from radgrounder.inference.batching import generate_examples
        from radgrounder.modeling.generation import flush_denormals

        results: list[tuple[Prepared, Any, float]] = []
        with flush_denormals():
            for start in range(0, len(items), self.batch_size):
                chunk = list(items[start : start + self.batch_size])
                t0 = time.perf_counter()
                gens = generate_examples(
                    self.loaded,
                    [p.example for p in chunk],
                    max_new_tokens=max_new_tokens,
                    mask_threshold=self.mask_threshold,
                    should_stop=should_stop,
                )
                share = (time.perf_counter() - t0) / len(chunk)
                results += [(p, g, share) for p, g in zip(chunk, gens, strict=True)]
        preds: list[Prediction] = []
        i = 0
        while i < len(results):
            j = i
            # The questions about one image share its preprocessed array.
            while (
                j + 1 < len(results)
                and results[j + 1][0].example.image is results[i][0].example.image
            ):
                j += 1
            part = results[i : j + 1]
            p0 = part[0][0]
            grounded = _join([self._decode(g.text, g.masks, p) for p, g, _ in part])
            pre = sum(p.preprocess_s for p, _, _ in part)
            gen = sum(s for _, _, s in part)
            preds.append(
                Prediction(
                    p0.example.task,
                    p0.example.language,
                    "\n".join(p.example.prompt for p, _, _ in part),
                    "\n".join(g.text for _, g, _ in part),
                    grounded,
                    p0.width,
                    p0.height,
                    p0.source,
                    p0.slice_index,
                    {"preprocess_s": pre, "generate_s": gen, "total_s": pre + gen},
                )
            )
            i = j + 1
        return preds

    def predict(
        self,
        images: Sequence[ImageInput] | ImageInput,
        task: str,
        language: str = "en",
        *,
        question: str | None = None,
        choices: Sequence[str] | None = None,
        clinical_info: str | None = None,
        clinical_question: str | None = None,
        structures: Sequence[str | int] | None = None,
        max_new_tokens: int = 200,
    ) -> list[Prediction]:
        """Answer ``task`` for each image (a DICOM file, PNG/JPG, the middle slice of a
        series or NIfTI, a :class:`Slice` or a 2-D array), in input order."""
        items = self.prepare(
            images,  # type: ignore[arg-type]
            task,
            language,
            question=question,
            choices=choices,
            clinical_info=clinical_info,
            clinical_question=clinical_question,
            structures=structures,
        )
        return self.run(items, max_new_tokens=max_new_tokens)

    def chat(
        self,
        image: ImageInput,
        history: Sequence[tuple[str, str]],
        message: str,
        language: str = "en",
        *,
        max_new_tokens: int = 200,
    ) -> Prediction:
        """One more turn of a conversation about ``image``: earlier (question, answer)
        turns are folded into the question, one per line. The released checkpoints were
        trained on single questions, so treat multi-turn answers with care."""
        if not isinstance(message, str) or not message.strip():
            raise RadGrounderError("message: expected a non-empty question")
        lines = []
        for n, turn in enumerate(history):
            if not (isinstance(turn, tuple | list) and len(turn) == 2):
                raise RadGrounderError(f"history[{n}]: expected a (question, answer) pair")
            lines += [str(turn[0]).strip(), str(turn[1]).strip()]
        question = "\n".join([*lines, message.strip()])
        return self.predict([image], "vqa", language, question=question,
                            max_new_tokens=max_new_tokens)[0]  # fmt: skip

    def predict_series(
        self,
        scan: str | Path | Volume,
        task: str,
        language: str = "en",
        *,
        slices: Sequence[int] | None = None,
        max_new_tokens: int = 200,
        max_gap: int = 1,
        **kw: Any,
    ):
        """Run ``task`` on every slice (or ``slices``) of a DICOM series or NIfTI volume and
        aggregate each grounded structure over consecutive slices into a 3-D box in patient
        coordinates (see :func:`radgrounder.inference.series.aggregate_structures`)."""
        from radgrounder.inference.series import SeriesPrediction, aggregate_structures

        volume = scan if isinstance(scan, Volume) else load_scan(scan)
        if volume.is_rgb:
            raise RadGrounderError("series mode needs a CT/MR volume, not an RGB image")
        indices = list(range(volume.n_slices)) if slices is None else [int(k) for k in slices]
        images = [replace(volume.slice(k), source=volume.source) for k in indices]
        preds = self.predict(images, task, language, max_new_tokens=max_new_tokens, **kw)
        return SeriesPrediction(
            volume, preds, aggregate_structures(preds, volume.affine, max_gap=max_gap)
        )
