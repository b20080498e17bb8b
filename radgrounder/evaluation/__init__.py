"""Evaluation: text and grounding metrics and bootstrap confidence intervals."""

from radgrounder.evaluation.metrics import (
    bleu,
    bootstrap_ci,
    box_iou,
    cider,
    exact_match,
    generalized_iou,
    grounding_iou,
    map50,
    mask_dice,
    mask_iou,
    meteor,
    recall,
    rouge_l,
    token_f1,
)

__all__ = [
    "bleu",
    "bootstrap_ci",
    "box_iou",
    "cider",
    "exact_match",
    "generalized_iou",
    "grounding_iou",
    "map50",
    "mask_dice",
    "mask_iou",
    "meteor",
    "recall",
    "rouge_l",
    "token_f1",
]
