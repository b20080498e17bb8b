"""Inference: batched prediction with RadGrounder checkpoints, series aggregation, export."""

from radgrounder.inference.archive import (
    ArchiveReport,
    ArchiveSettings,
    ArchiveWorker,
    discover,
    predict_archive,
)
from radgrounder.inference.batching import generate_examples
from radgrounder.inference.predictor import (
    LANGUAGES,
    TASKS,
    Prediction,
    Predictor,
    Prepared,
    PromptTooLong,
)
from radgrounder.inference.series import SeriesPrediction, Structure3D, aggregate_structures

__all__ = [
    "LANGUAGES",
    "TASKS",
    "ArchiveReport",
    "ArchiveSettings",
    "ArchiveWorker",
    "Prediction",
    "Predictor",
    "Prepared",
    "PromptTooLong",
    "SeriesPrediction",
    "Structure3D",
    "aggregate_structures",
    "discover",
    "generate_examples",
    "predict_archive",
]
