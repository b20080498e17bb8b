"""The generation pass of an evaluation run: examples in batches through the model, each
sample's record (texts, grounding scores, spans) appended to ``generations.jsonl`` at once."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.datasets import EvalDataset, EvalItem
from radgrounder.evaluation.parsing import clean_generated, grounded
from radgrounder.evaluation.question_types import question_kind, reference_is_closed
from radgrounder.evaluation.scoring import score_grounding
from radgrounder.fileio import atomic_write_bytes
from radgrounder.labels.checkpoint import CheckpointWriter

GROUNDED_TASKS = ("grounded-report", "grounded-vqa")


def make_matcher(spec: str) -> str | Callable[[str, str], float]:
    if spec in ("exact", "lexical"):
        return spec
    from radgrounder.evaluation.embedding import SentenceEncoder, keyword_matcher

    return keyword_matcher(SentenceEncoder(spec))


def _question_type(example: Any, compat: str) -> str:
    raw = str(example.meta.get("question_type") or "")
    if (
        compat == "reference"
        and example.task in ("vqa", "grounded-vqa")
        and example.source == "built"
    ):
        return "closed" if reference_is_closed(example.target) else "open"
    try:
        return question_kind(raw) if raw else ""
    except RadGrounderError:
        return ""


def _display(image: np.ndarray) -> np.ndarray:
    grey = np.asarray(image, np.float32).mean(axis=0)
    lo, hi = float(grey.min()), float(grey.max())
    return (
        ((grey - lo) / (hi - lo) * 255).astype(np.uint8)
        if hi > lo
        else np.zeros_like(grey, np.uint8)
    )


def _save_example(out: Path, n: int, example: Any, ref: Any, pred: Any) -> str:
    from PIL import Image

    from radgrounder.visualize import render_overlay

    image = _display(example.image)
    left = render_overlay(image, ref, title="reference")
    right = render_overlay(image, pred, title="prediction")
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    rel = f"examples/{n:04d}.png"
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(out / rel, buf.getvalue())
    return rel


def sample_record(
    item: EvalItem,
    example: Any,
    gen: Any,
    variant: str,
    opts: Any,
    matcher: str | Callable[[str, str], float],
) -> tuple[dict[str, Any], Any, Any]:
    raw_pred = clean_generated(gen.text, variant, compat=opts.compat)
    rec: dict[str, Any] = {
        "id": item.id,
        "task": example.task,
        "language": example.language,
        "question_type": _question_type(example, opts.compat),
        "prompt": example.prompt,
        "raw_prediction": raw_pred,
        "raw_reference": example.target,
        "image_ref": item.image_ref,
        "n_new_tokens": len(gen.token_ids),
    }
    pred_gt, ref_gt = None, None
    if example.task in GROUNDED_TASKS:
        pred_gt, pred_pairs = grounded(raw_pred, variant, gen.masks)
        ref_gt, ref_pairs = grounded(example.target, variant, example.masks)
        rec["grounding"] = score_grounding(pred_pairs, ref_pairs, matcher)
        rec["class_ious"] = rec["grounding"].pop("class_ious")
        rec["pred_spans"] = [info for _, _, info in pred_pairs]
        rec["ref_spans"] = [info for _, _, info in ref_pairs]
    return rec, pred_gt, ref_gt


def generate_records(
    loaded: Any, dataset: EvalDataset, todo: list[EvalItem], out: Path, opts: Any,
    n_examples_done: int,
) -> None:  # fmt: skip
    from rich.progress import Progress

    from radgrounder.inference import generate_examples

    matcher = make_matcher(opts.matcher)
    writer = CheckpointWriter(out / "generations.jsonl")
    shown = n_examples_done
    try:
        with Progress(disable=not opts.progress) as bar:
            task = bar.add_task(f"eval {dataset.name}/{dataset.split}", total=len(todo))
            for start in range(0, len(todo), opts.batch_size):
                chunk, examples = [], []
                for item in todo[start : start + opts.batch_size]:
                    try:
                        examples.append(dataset.example(item))
                        chunk.append(item)
                    except (RadGrounderError, OSError, ValueError, KeyError) as exc:
                        writer.write(
                            {"id": item.id, "image_ref": item.image_ref, "error": str(exc)}
                        )
                        bar.advance(task)
                if not chunk:
                    continue
                t0 = time.perf_counter()
                generate = getattr(loaded, "generate_examples", None)  # e.g. a baseline
                gens = (
                    generate(examples)
                    if generate
                    else generate_examples(
                        loaded,
                        examples,
                        max_new_tokens=opts.max_new_tokens,
                        mask_threshold=opts.mask_threshold,
                    )
                )
                seconds = (time.perf_counter() - t0) / len(chunk)
                for item, example, gen in zip(chunk, examples, gens, strict=True):
                    rec, pred_gt, ref_gt = sample_record(
                        item, example, gen, loaded.variant, opts, matcher
                    )
                    rec["seconds"] = seconds
                    if shown < opts.n_examples and pred_gt is not None:
                        rec["example"] = _save_example(out, shown, example, ref_gt, pred_gt)
                        shown += 1
                    writer.write(rec)
                    bar.advance(task)
    finally:
        writer.close()
