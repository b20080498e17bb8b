"""Data files shipped with the package (label maps, templates)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load_json(relpath: str) -> Any:
    """Read a bundled JSON resource, e.g. ``label_map/merged_label_map.json``."""
    ref = resources.files("radgrounder.resources").joinpath(relpath)
    with ref.open("r", encoding="utf-8") as fh:
        return json.load(fh)
