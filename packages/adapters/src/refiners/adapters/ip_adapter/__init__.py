"""IP-Adapter: an image prompt (or, FaceID, a face prompt) for Stable Diffusion 1.5 and SDXL, from the original (h94)
files or refiners' (`refiners-convert ip-adapter`)."""

from refiners.adapters.ip_adapter.image_projection import FaceIDImageProjection, ImageProjection, PerceiverResampler
from refiners.adapters.ip_adapter.ip_adapter import (
    IP_ADAPTER_CONTEXT,
    DecoupledCrossAttention,
    ImageCrossAttention,
    ImageTokens,
    IPAdapter,
    SD1IPAdapter,
    SDXLIPAdapter,
)
from refiners.adapters.ip_adapter.weights import (
    PROJECTION_CLASSES,
    IPAdapterKind,
    IPAdapterWeights,
    convert_h94_ip_adapter,
    load_ip_adapter_weights,
    read_ip_adapter_weights,
)

__all__ = [
    "IPAdapter",
    "SD1IPAdapter",
    "SDXLIPAdapter",
    "ImageProjection",
    "PerceiverResampler",
    "FaceIDImageProjection",
    "ImageCrossAttention",
    "ImageTokens",
    "DecoupledCrossAttention",
    "IP_ADAPTER_CONTEXT",
    "IPAdapterKind",
    "PROJECTION_CLASSES",
    "IPAdapterWeights",
    "read_ip_adapter_weights",
    "convert_h94_ip_adapter",
    "load_ip_adapter_weights",
]
