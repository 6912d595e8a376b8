"""Latent diffusion: the models, solvers and pipelines of Stable Diffusion."""

from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder
from refiners.foundationals.latent_diffusion.model import LatentDiffusionModel
from refiners.foundationals.latent_diffusion.solvers import (
    DDIM,
    DDPM,
    DPMSolver,
    Euler,
    EulerAncestral,
    LCMSolver,
    ModelPredictionType,
    NoiseSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import StableDiffusion_1, StableDiffusion_1_Inpainting
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet

__all__ = [
    "LatentDiffusionModel",
    "StableDiffusion_1",
    "StableDiffusion_1_Inpainting",
    "SD1UNet",
    "LatentDiffusionAutoencoder",
    "SD1Autoencoder",
    "Solver",
    "SolverParams",
    "TimestepSpacing",
    "NoiseSchedule",
    "ModelPredictionType",
    "DDPM",
    "DDIM",
    "DPMSolver",
    "Euler",
    "EulerAncestral",
    "LCMSolver",
]
