"""One reader per dataset, used by training and evaluation alike, so a fix lands once.

- :mod:`~radgrounder.datasets.built`: folders written by ``radgrounder labels build``
- :mod:`~radgrounder.datasets.refrad2d`: folders in the reference's RefRad2D layout
- :mod:`~radgrounder.datasets.slake`: SLAKE 1.0
- :mod:`~radgrounder.datasets.vqa_rad`: VQA-RAD (Wu et al. split, or the official one)

Each source has ``len()`` and ``example(i, rng, prefix_style) -> Example``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from radgrounder.datasets.example import TASK_PROMPT, Example, resize_mask

if TYPE_CHECKING:
    from radgrounder.training.config import SourceConfig

__all__ = ["TASK_PROMPT", "Example", "make_source", "resize_mask"]


def make_source(
    cfg: SourceConfig, variant: str, *, preset: str, size: int, augment: bool = False
) -> Any:
    """The reader for one configured source (``cfg.kind``: built, refrad2d, slake, vqa_rad)."""
    if cfg.kind == "built":
        from radgrounder.datasets.built import BuiltSource

        return BuiltSource(cfg, variant, preset=preset, size=size, augment=augment)
    if cfg.kind == "refrad2d":
        from radgrounder.datasets.refrad2d import RefRad2DSource

        return RefRad2DSource(cfg, variant, preset=preset, size=size)
    if cfg.kind == "slake":
        from radgrounder.datasets.slake import SlakeSource

        return SlakeSource(cfg, preset=preset, size=size)
    from radgrounder.datasets.vqa_rad import VqaRadSource

    return VqaRadSource(cfg, preset=preset, size=size)
