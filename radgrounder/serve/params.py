"""Form fields of the API requests: parsing and validation with messages naming the field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from radgrounder.imaging import WINDOWS
from radgrounder.imaging.normalize import VIEWING_PRESETS
from radgrounder.serve.uploads import UploadError

KNOWN_TASKS = ("report", "grounded-report", "vqa", "detect", "segment")
DEFAULT_WINDOW = "soft_tissue"
# The windows a viewer offers (the reference's model-input windows are not for reading).
VIEWING_WINDOWS = VIEWING_PRESETS
DEFAULT_MAX_NEW_TOKENS = 100
MAX_NEW_TOKENS = 512
# ``slice=all`` runs every slice; a longer series must be sent in parts.
MAX_SLICES_PER_REQUEST = 256


def _invalid(message: str) -> UploadError:
    return UploadError(422, message)


def _text(fields: Mapping[str, str], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def window(fields: Mapping[str, str]) -> str:
    """The display window (``window``), default ``soft_tissue``."""
    value = _text(fields, "window") or DEFAULT_WINDOW
    if value not in WINDOWS:
        raise _invalid(f"window: unknown window {value!r}; expected one of {', '.join(WINDOWS)}")
    return value


@dataclass
class PredictParams:
    """The validated fields of ``POST /v1/predict``."""

    task: str
    language: str
    question: str | None
    clinical_info: str | None
    clinical_question: str | None
    structures: list[str] | None
    slice: str | int | None
    max_new_tokens: int


def predict_params(
    fields: Mapping[str, str],
    tasks: Sequence[str],
    languages: Sequence[str],
    variant: str,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> PredictParams:
    """Validate the form fields of a prediction request against the model's abilities
    (``max_new_tokens``: the server's cap on the field of that name)."""
    default_task = "grounded-report" if "grounded-report" in tasks else tasks[0]
    task = _text(fields, "task") or default_task
    if task not in tasks:
        if task not in KNOWN_TASKS:
            raise _invalid(f"task: unknown task {task!r}; this model supports {', '.join(tasks)}")
        raise _invalid(
            f"task: {task!r} is not available for the {variant} model; "
            f"it supports {', '.join(tasks)}"
        )
    language = _text(fields, "language") or "en"
    if language not in languages:
        raise _invalid(f"language: expected one of {', '.join(languages)}, got {language!r}")
    question = _text(fields, "question")
    if task == "vqa" and question is None:
        raise _invalid("question: task 'vqa' needs a question")
    structures = None
    raw = _text(fields, "structures")
    if raw is not None:
        structures = [s.strip() for s in raw.split(",") if s.strip()] or None
    if task in ("detect", "segment") and not structures:
        raise _invalid(f"structures: task {task!r} needs at least one structure, e.g. 'liver'")
    return PredictParams(
        task=task,
        language=language,
        question=question,
        clinical_info=_text(fields, "clinical_info"),
        clinical_question=_text(fields, "clinical_question"),
        structures=structures,
        slice=_slice_field(_text(fields, "slice")),
        max_new_tokens=_max_new_tokens(_text(fields, "max_new_tokens"), max_new_tokens),
    )


def _slice_field(value: str | None) -> str | int | None:
    if value is None:
        return None
    if value.lower() == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise _invalid(f"slice: expected a slice number or 'all', got {value[:40]!r}") from None


def _max_new_tokens(value: str | None, cap: int = MAX_NEW_TOKENS) -> int:
    if value is None:
        return min(DEFAULT_MAX_NEW_TOKENS, cap)
    try:
        number = int(value)
    except ValueError:
        raise _invalid(f"max_new_tokens: expected an integer, got {value[:40]!r}") from None
    if not 1 <= number <= cap:
        raise _invalid(f"max_new_tokens: must be between 1 and {cap}, got {number}")
    return number


def slice_indices(value: str | int | None, n_slices: int) -> list[int]:
    """The slice numbers a ``slice`` field selects in a scan of ``n_slices`` slices:
    the middle one by default, one number, or all of them."""
    if value is None:
        return [n_slices // 2]
    if value == "all":
        if n_slices > MAX_SLICES_PER_REQUEST:
            raise _invalid(
                f"slice: 'all' would run {n_slices} slices; at most {MAX_SLICES_PER_REQUEST} "
                "per request, choose one slice"
            )
        return list(range(n_slices))
    assert isinstance(value, int)
    if not 0 <= value < n_slices:
        raise _invalid(
            f"slice: {value} is out of range; the scan has {n_slices} slice(s), 0-{n_slices - 1}"
        )
    return [value]
