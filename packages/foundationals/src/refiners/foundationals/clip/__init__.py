"""CLIP: the tokenizer and text encoders that condition Stable Diffusion."""

from refiners.foundationals.clip.text_encoder import (
    CLIP_TEXT_POOLING_CONTEXT,
    CLIPTextEncoder,
    CLIPTextEncoderG,
    CLIPTextEncoderH,
    CLIPTextEncoderL,
    TextEncoderWithPooling,
)
from refiners.foundationals.clip.tokenizer import CLIPTokenizer

__all__ = [
    "CLIPTokenizer",
    "CLIPTextEncoder",
    "CLIPTextEncoderL",
    "CLIPTextEncoderH",
    "CLIPTextEncoderG",
    "TextEncoderWithPooling",
    "CLIP_TEXT_POOLING_CONTEXT",
]
