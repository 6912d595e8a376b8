"""CLIP: the tokenizer and text encoders that condition Stable Diffusion, and the image encoders of IP-Adapter."""

from refiners.foundationals.clip.image_encoder import (
    CLIP_IMAGE_ENCODER_CLASSES,
    CLIPImageEncoder,
    CLIPImageEncoderG,
    CLIPImageEncoderH,
)
from refiners.foundationals.clip.image_encoder import preprocess as preprocess_image
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
    "CLIPImageEncoder",
    "CLIPImageEncoderH",
    "CLIPImageEncoderG",
    "CLIP_IMAGE_ENCODER_CLASSES",
    "preprocess_image",
]
