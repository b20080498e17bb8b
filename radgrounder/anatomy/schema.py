"""The unified 121-class anatomy schema and its TotalSegmentator id maps.

The ids are frozen: the released checkpoints emit them as ``<segNNN>`` tokens
(spec §2.2, §5.6), so they are read from the bundled maps and never renumbered.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache

from radgrounder.errors import RadGrounderError
from radgrounder.resources import load_json

LANGUAGES = ("en", "de")
TOTALSEG_TASKS = ("total", "total_mr")

# TotalSegmentator renamed a few classes between releases; the unified schema keeps the
# names of the release the checkpoints were trained with.
_TOTALSEG_RENAMES = {
    "iliac_vein_left": "iliac_vena_left",
    "iliac_vein_right": "iliac_vena_right",
    "clavicle_left": "clavicula_left",
    "clavicle_right": "clavicula_right",
    "lung_upper_lobe_left_lung": "lung_upper_lobe_left",
}


@dataclass(frozen=True)
class AnatomyClass:
    """One class of the unified schema."""

    id: int
    name: str
    name_en: str
    name_de: str

    def display_name(self, language: str = "en") -> str:
        """The display name in ``language`` ("en" or "de")."""
        check_language(language)
        return self.name_en if language == "en" else self.name_de

    @property
    def token(self) -> str:
        """The PaliGemma segmentation-codebook token carrying this class id."""
        return f"<seg{self.id:03d}>"


def check_language(language: str) -> str:
    if language not in LANGUAGES:
        raise RadGrounderError(
            f"language: unknown value {language!r} (expected one of {', '.join(LANGUAGES)})"
        )
    return language


class AnatomySchema:
    """Lookup by id and by name over the unified classes."""

    def __init__(self, classes: list[AnatomyClass]) -> None:
        self._by_id = {c.id: c for c in classes}
        self._by_name = {c.name: c for c in classes}
        if len(self._by_id) != len(classes) or len(self._by_name) != len(classes):
            raise RadGrounderError("anatomy schema: duplicate class ids or names")

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[AnatomyClass]:
        return iter(sorted(self._by_id.values(), key=lambda c: c.id))

    def __contains__(self, key: object) -> bool:
        return key in self._by_id or key in self._by_name

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._by_id))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self)

    def by_id(self, class_id: int) -> AnatomyClass:
        try:
            return self._by_id[int(class_id)]
        except (KeyError, ValueError, TypeError):
            raise RadGrounderError(
                f"class id: {class_id!r} is not in the unified schema (valid ids 1-{len(self)})"
            ) from None

    def by_name(self, name: str) -> AnatomyClass:
        try:
            return self._by_name[name]
        except KeyError:
            raise RadGrounderError(f"class name: {name!r} is not in the unified schema") from None

    def get(self, key: int | str) -> AnatomyClass:
        """A class by id (int) or by name (str)."""
        return self.by_name(key) if isinstance(key, str) else self.by_id(key)

    def names_by_id(self) -> dict[int, str]:
        return {c.id: c.name for c in self}

    def display_names(self, language: str = "en") -> dict[int, str]:
        return {c.id: c.display_name(language) for c in self}


@cache
def load_schema() -> AnatomySchema:
    """The unified schema as shipped with the released checkpoints."""
    ids = load_json("label_map/merged_label_map.json")
    en = load_json("label_map/class_2_organ_name_english.json")
    de = load_json("label_map/class_2_organ_name_german.json")
    return AnatomySchema(
        [AnatomyClass(int(i), name, en[name], de[name]) for name, i in ids.items()]
    )


def bundled_totalseg_names(task: str) -> dict[int, str]:
    """TotalSegmentator label names of the release era the checkpoints were built with."""
    if task not in TOTALSEG_TASKS:
        raise RadGrounderError(
            f"label task: unknown value {task!r} (expected one of {', '.join(TOTALSEG_TASKS)})"
        )
    rel = "label_map/ct_label_map.json" if task == "total" else "label_map/mr_label_map.json"
    return {int(k): v for k, v in load_json(rel).items()}


def totalseg_label_names(task: str) -> dict[int, str]:
    """Label names for a TotalSegmentator task.

    Taken from an installed TotalSegmentator when there is one (its id set is what its
    output files use), else from the bundled maps.
    """
    bundled = bundled_totalseg_names(task)
    try:
        from totalsegmentator.map_to_binary import class_map  # type: ignore[import-not-found]
    except Exception:  # not installed, or an incompatible release
        return bundled
    names = class_map.get(task)
    return {int(k): str(v) for k, v in names.items()} if names else bundled


def unified_name(totalseg_name: str) -> str | None:
    """The unified class name for a TotalSegmentator class name, or None if not in the schema."""
    schema = load_schema()
    name = _TOTALSEG_RENAMES.get(totalseg_name, totalseg_name)
    return name if name in schema else None


def totalseg_to_unified(
    task: str | None = None, label_names: Mapping[int, str] | None = None
) -> dict[int, int]:
    """Map TotalSegmentator label ids to unified ids, matching by class name.

    ``label_names`` (e.g. read from a label map's NIfTI extension) wins over ``task``.
    Ids whose names are not in the schema are left out (treat them as background).
    """
    if label_names is None:
        if task is None:
            raise RadGrounderError("label task: give a TotalSegmentator task or label names")
        label_names = totalseg_label_names(task)
    schema = load_schema()
    mapping: dict[int, int] = {}
    for ts_id, ts_name in label_names.items():
        name = unified_name(ts_name)
        if name is not None and int(ts_id) != 0:
            mapping[int(ts_id)] = schema.by_name(name).id
    return mapping
