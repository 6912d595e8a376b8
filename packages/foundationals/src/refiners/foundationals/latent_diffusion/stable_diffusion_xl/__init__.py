"""Stable Diffusion XL: its UNets (base and refiner), text encoders and pipeline."""

from refiners.foundationals.latent_diffusion.stable_diffusion_xl.model import (
    SDXL_LIGHTNING_SOLVER_PARAMS,
    SDXL_SOLVER_PARAMS,
    SDXLAutoencoder,
    StableDiffusion_XL,
    StableDiffusion_XL_Inpainting,
    StableDiffusion_XL_Refiner,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.text_encoder import (
    ConcatenateEmbeddings,
    DoubleTextEncoder,
    RefinerTextEncoder,
    SDXLTextEncoder,
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
    "StableDiffusion_XL_Refiner",
    "SDXLAutoencoder",
    "SDXLTextEncoder",
    "DoubleTextEncoder",
    "RefinerTextEncoder",
    "ConcatenateEmbeddings",
    "SDXLUNet",
    "SDXLRefinerUNet",
    "TextTimeEmbedding",
    "TimeIdsEmbedding",
    "TEXT_TIME_CONTEXT",
    "POOLED_TEXT_EMBEDDING_KEY",
    "TIME_IDS_KEY",
]
