"""Stable Diffusion XL: its UNets (base and refiner), text encoders and pipeline."""

from refiners.foundationals.latent_diffusion.stable_diffusion_xl.model import (
    SDXL_LIGHTNING_SOLVER_PARAMS,
    SDXL_SOLVER_PARAMS,
    SDXLAutoencoder,
    StableDiffusion_XL,
    StableDiffusion_XL_Inpainting,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.text_encoder import (
    ConcatenateEmbeddings,
    DoubleTextEncoder,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import (
    POOLED_TEXT_EMBEDDING_KEY,
    TEXT_TIME_CONTEXT,
    TIME_IDS_KEY,
    SDXLRefinerUNet,
    SDXLUNet,
    TextTimeEmbedding,
    TimeIdsEmbedding,
)

__all__ = [
    "SDXL_LIGHTNING_SOLVER_PARAMS",
    "SDXL_SOLVER_PARAMS",
    "StableDiffusion_XL",
    "StableDiffusion_XL_Inpainting",
    "SDXLAutoencoder",
    "DoubleTextEncoder",
    "ConcatenateEmbeddings",
    "SDXLUNet",
    "SDXLRefinerUNet",
    "TextTimeEmbedding",
    "TimeIdsEmbedding",
    "TEXT_TIME_CONTEXT",
    "POOLED_TEXT_EMBEDDING_KEY",
    "TIME_IDS_KEY",
]
