"""Diffusion solvers: how a latent is walked from noise to image, one model prediction per step.

Each matches a diffusers scheduler (tested for parity): `DDPM`, `DDIM`, `DPMSolver`, `Euler`, `EulerAncestral`,
`LCMSolver`. They are configured by a frozen `SolverParams` and are independent of the denoising model.
"""

from refiners.foundationals.latent_diffusion.solvers.ddim import DDIM
from refiners.foundationals.latent_diffusion.solvers.ddpm import DDPM
from refiners.foundationals.latent_diffusion.solvers.dpm_solver import DPMSolver
from refiners.foundationals.latent_diffusion.solvers.euler import Euler, EulerAncestral
from refiners.foundationals.latent_diffusion.solvers.lcm import LCMSolver
from refiners.foundationals.latent_diffusion.solvers.solver import (
    FinalSigma,
    ModelPredictionType,
    NoiseSchedule,
    Solver,
    SolverParams,
    Steps,
    TimestepSpacing,
)

__all__ = [
    "Solver",
    "SolverParams",
    "Steps",
    "TimestepSpacing",
    "NoiseSchedule",
    "ModelPredictionType",
    "FinalSigma",
    "DDPM",
    "DDIM",
    "DPMSolver",
    "Euler",
    "EulerAncestral",
    "LCMSolver",
]
