"""DINOv2: self-supervised image features from a Vision Transformer (arXiv:2304.07193), with or without registers."""

from refiners.foundationals.dinov2.dinov2 import (
    DINOV2_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY,
    DINOv2_base,
    DINOv2_base_reg,
    DINOv2_giant,
    DINOv2_giant_reg,
    DINOv2_large,
    DINOv2_large_reg,
    DINOv2_small,
    DINOv2_small_reg,
    preprocess,
)
from refiners.foundationals.dinov2.linear_probe import LinearProbe
from refiners.foundationals.dinov2.vit import ViT

__all__ = [
    "ViT",
    "DINOv2_small",
    "DINOv2_base",
    "DINOv2_large",
    "DINOv2_giant",
    "DINOv2_small_reg",
    "DINOv2_base_reg",
    "DINOv2_large_reg",
    "DINOv2_giant_reg",
    "DINOV2_CLASSES",
    "TINY",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "preprocess",
    "LinearProbe",
]
