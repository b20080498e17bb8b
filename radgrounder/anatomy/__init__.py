"""The unified anatomy schema, display names, synonyms and TotalSegmentator id maps."""

from radgrounder.anatomy.schema import (
    LANGUAGES,
    TOTALSEG_TASKS,
    AnatomyClass,
    AnatomySchema,
    bundled_totalseg_names,
    check_language,
    load_schema,
    totalseg_label_names,
    totalseg_to_unified,
    unified_name,
)

__all__ = [
    "LANGUAGES",
    "TOTALSEG_TASKS",
    "AnatomyClass",
    "AnatomySchema",
    "bundled_totalseg_names",
    "check_language",
    "load_schema",
    "totalseg_label_names",
    "totalseg_to_unified",
    "unified_name",
]
