"""Segment Anything (SAM): promptable segmentation, and automatic mask generation ("segment everything")."""

from refiners.foundationals.segment_anything.image_encoder import SAMViT
from refiners.foundationals.segment_anything.mask_decoder import MASK_DECODER_CONTEXT, MaskDecoder
from refiners.foundationals.segment_anything.mask_generation import AutomaticMaskGenerator, GeneratedMask, box_nms
from refiners.foundationals.segment_anything.model import (
    PIXEL_MEAN,
    PIXEL_STD,
    Points,
    SegmentAnything,
    SegmentAnythingB,
    SegmentAnythingH,
    SegmentAnythingL,
)
from refiners.foundationals.segment_anything.prompt_encoder import (
    MaskEncoder,
    NoMaskEmbedding,
    PointEncoder,
    PointType,
)

__all__ = [
    "SegmentAnything",
    "SegmentAnythingB",
    "SegmentAnythingL",
    "SegmentAnythingH",
    "SAMViT",
    "PointEncoder",
    "PointType",
    "MaskEncoder",
    "NoMaskEmbedding",
    "MaskDecoder",
    "MASK_DECODER_CONTEXT",
    "AutomaticMaskGenerator",
    "GeneratedMask",
    "box_nms",
    "Points",
    "PIXEL_MEAN",
    "PIXEL_STD",
]
