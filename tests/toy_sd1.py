"""The toy Stable Diffusion 1.x of `refiners.converters.toy` on both sides: diffusers' folder and our converted twin.

Importable from any test as `toy_sd1`, for adapters compared with a diffusers pipeline over a whole generation
(FreeU, self-attention guidance, panoramas): `save_toy_sd1` writes the folder and its `refiners-convert sd1`
conversion, `reference` loads a diffusers pipeline class from the folder with DDIM (SD1.5's scheduler config), `ours`
loads `StableDiffusion_1` with `DDIM`.
"""

from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler

from refiners.converters.cli import main
from refiners.converters.toy import TOY_SCHEDULER_CONFIG, save_toy_stable_diffusion_1
from refiners.foundationals.latent_diffusion import DDIM, StableDiffusion_1

PipelineT = TypeVar("PipelineT", bound=DiffusionPipeline)


def save_toy_sd1(folder: Path) -> tuple[Path, Path]:
    """The toy's diffusers folder and its conversion, under `folder`: `(diffusers, converted)`."""
    diffusers_folder = save_toy_stable_diffusion_1(folder / "toy-sd1")
    converted = folder / "toy-sd1-refiners"
    assert main(["sd1", "--from", str(diffusers_folder), "--to", str(converted)]) == 0
    return diffusers_folder, converted


def reference(pipeline_class: type[PipelineT], diffusers_folder: Path) -> PipelineT:
    """`pipeline_class` on the toy's components, with DDIM (SD1.5's scheduler: no sample clipping)."""
    pipeline: Any = pipeline_class.from_pretrained(diffusers_folder, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config({**TOY_SCHEDULER_CONFIG, "clip_sample": False})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def ours(converted: Path) -> StableDiffusion_1:
    return StableDiffusion_1.from_folder(converted, solver=DDIM(num_inference_steps=30))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within 1e-4 of the reference's largest magnitude."""
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
