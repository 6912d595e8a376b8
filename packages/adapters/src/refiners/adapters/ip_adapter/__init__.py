"""IP-Adapter: an image prompt for Stable Diffusion 1.5 and SDXL, from the original (h94) files."""

from refiners.adapters.ip_adapter.image_projection import ImageProjection, PerceiverResampler
from refiners.adapters.ip_adapter.ip_adapter import (
    IP_ADAPTER_CONTEXT,
    DecoupledCrossAttention,
    ImageCrossAttention,
    ImageTokens,
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
    "ImageTokens",
    "DecoupledCrossAttention",
    "IP_ADAPTER_CONTEXT",
    "read_ip_adapter_weights",
]
