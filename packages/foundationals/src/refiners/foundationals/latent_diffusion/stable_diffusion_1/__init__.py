"""Stable Diffusion 1.x pipelines: text-to-image and image-to-image, and inpainting; their converted weights."""

from refiners.foundationals.latent_diffusion.stable_diffusion_1.model import (
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1_CHANNELS, SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.weights import (
    ConvertedWeights,
    SD1Weights,
    WeightsFile,
)

__all__ = [
    "SD1UNet",
    "SD1_CHANNELS",
    "StableDiffusion_1",
    "StableDiffusion_1_Inpainting",
    "ConvertedWeights",
    "SD1Weights",
    "WeightsFile",
]
