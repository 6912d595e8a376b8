"""IP-Adapter: an image prompt for Stable Diffusion 1.5 and SDXL, from the original (h94) files."""

from refiners.adapters.ip_adapter.image_projection import ImageProjection, PerceiverResampler
from refiners.adapters.ip_adapter.ip_adapter import (
    IMAGE_TOKENS_KEY,
    IP_ADAPTER_CONTEXT,
    DecoupledCrossAttention,
    ImageCrossAttention,
    IPAdapter,
    SD1IPAdapter,
    SDXLIPAdapter,
    read_ip_adapter_weights,
)

__all__ = [
    "IPAdapter",
    "SD1IPAdapter",
    "SDXLIPAdapter",
    "ImageProjection",
    "PerceiverResampler",
    "ImageCrossAttention",
    "DecoupledCrossAttention",
    "IP_ADAPTER_CONTEXT",
    "IMAGE_TOKENS_KEY",
    "read_ip_adapter_weights",
]
