"""Stable Diffusion 1.x pipelines: text-to-image and image-to-image, and inpainting."""

from refiners.foundationals.latent_diffusion.stable_diffusion_1.model import (
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
)

__all__ = ["StableDiffusion_1", "StableDiffusion_1_Inpainting"]
