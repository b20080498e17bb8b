"""Prompt strings and token layout of the released RadGrounder checkpoints."""

from radgrounder.prompts.builder import (
    FIELD_LABELS,
    IMAGE_TOKEN,
    LANGUAGES,
    PREFIX_STYLES,
    TASK_PROMPTS,
    TASKS,
    build_prefix,
    build_prompt,
)
from radgrounder.prompts.text import clean_punctuation
from radgrounder.prompts.tokens import (
    IGNORE_INDEX,
    collate_examples,
    encode_example,
    expand_prompt,
)

__all__ = [
    "FIELD_LABELS",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "LANGUAGES",
    "PREFIX_STYLES",
    "TASKS",
    "TASK_PROMPTS",
    "build_prefix",
    "build_prompt",
    "clean_punctuation",
    "collate_examples",
    "encode_example",
    "expand_prompt",
]
