"""GroundedText and the codecs between it and model markup."""

from radgrounder.grounding.codecs import (
    CODEC_NAMES,
    BracketCodec,
    Codec,
    DetectionCodec,
    PaliGemmaCodec,
    SegmentationCodec,
    codec,
)
from radgrounder.grounding.geometry import box_iou, boxes_from_label_slice, union_box
from radgrounder.grounding.types import Box, GroundedText, Span

__all__ = [
    "CODEC_NAMES",
    "Box",
    "BracketCodec",
    "Codec",
    "DetectionCodec",
    "GroundedText",
    "PaliGemmaCodec",
    "SegmentationCodec",
    "Span",
    "box_iou",
    "boxes_from_label_slice",
    "codec",
    "union_box",
]
