"""Load a Stable Diffusion 1.x model in one call, converting in memory: diffusers' `from_pretrained` and
`from_single_file`, with the pipeline class first.

    import torch
    from refiners.converters import from_pretrained, from_single_file
    from refiners.foundationals.latent_diffusion import StableDiffusion_1, StableDiffusion_1_Inpainting

    sd15 = from_pretrained(StableDiffusion_1, "runwayml/stable-diffusion-v1-5", device="cuda", dtype=torch.float16)
    inpainting = from_single_file(
        StableDiffusion_1_Inpainting, "sd-v1-5-inpainting.ckpt", tokenizer="openai/clip-vit-large-patch14"
    )

The loaders live here rather than on `StableDiffusion_1`: the conversion is refiners-converters', which depends on
refiners-foundationals, not the reverse. They run the conversion of `refiners-convert sd1` without writing its files
(`convert_stable_diffusion_1_weights`) and build the model at the sizes the conversion records, as
`StableDiffusion_1.from_folder` does from the files: converting once with `refiners-convert`, then loading the folder,
skips the conversion on every later load.
"""

import warnings
from pathlib import Path
from typing import TypeVar

import torch

from refiners.converters.sources import DiffusersFolder, SingleFile, SourceError, open_source
from refiners.converters.stable_diffusion import convert_stable_diffusion_1_weights
from refiners.foundationals.latent_diffusion.solvers.solver import Solver
from refiners.foundationals.latent_diffusion.stable_diffusion_1.model import StableDiffusion_1

__all__ = ["from_pretrained", "from_single_file"]

StableDiffusionT = TypeVar("StableDiffusionT", bound=StableDiffusion_1)
Device = torch.device | str | None

_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")


def from_pretrained(
    pipeline: type[StableDiffusionT],
    source: str | Path,
    *,
    solver: Solver | None = None,
    device: Device = None,
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
) -> StableDiffusionT:
    """Load a diffusers Stable Diffusion 1.x folder or Hugging Face Hub id into `pipeline`, at its sizes.

    Args:
        pipeline: `StableDiffusion_1`, or `StableDiffusion_1_Inpainting` for an inpainting model.
        source: A diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`), or a Hub id
            such as `runwayml/stable-diffusion-v1-5` (only the files the conversion reads are downloaded).
        solver: The solver (default: `DPMSolver(num_inference_steps=30)`).
        device: Where the model goes once loaded (default: CPU).
        dtype: The weights' dtype (default: float32, whatever the source's), as diffusers' `torch_dtype`.
        tokenizer: Where to read the tokenizer if the source has none: a folder or a Hub id.

    Raises:
        SourceError: The source cannot be found or read, lacks a component, or is a single file (use
            `from_single_file`).
        ConversionError: The source is not a Stable Diffusion 1.x model, or a component does not fit.
        ValueError: The model does not fit `pipeline` (e.g. an inpainting UNet for `StableDiffusion_1`).
    """
    opened = open_source(source, components=_COMPONENTS)
    if isinstance(opened, SingleFile):
        raise SourceError(
            f"{source} is a single checkpoint file, not a diffusers folder: load it with "
            f"from_single_file({pipeline.__name__}, {str(source)!r})"
        )
    return _load(pipeline, opened, solver, device, dtype, tokenizer)


def from_single_file(
    pipeline: type[StableDiffusionT],
    path: str | Path,
    *,
    solver: Solver | None = None,
    device: Device = None,
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
) -> StableDiffusionT:
    """Load an original Stable Diffusion 1.x checkpoint (`.safetensors`, `.ckpt`) into `pipeline`, at SD1.5's sizes.

    A single file has no configs (the models are SD1.5's; an inpainting file's UNet takes 9 channels) and no
    tokenizer: pass `tokenizer` (e.g. `openai/clip-vit-large-patch14`) for the text encoder to read text; without
    it, it takes token ids and a warning says so.

    Args:
        pipeline: `StableDiffusion_1`, or `StableDiffusion_1_Inpainting` for an inpainting checkpoint.
        path: The checkpoint (e.g. `v1-5-pruned-emaonly.safetensors`).
        solver: The solver (default: `DPMSolver(num_inference_steps=30)`).
        device: Where the model goes once loaded (default: CPU).
        dtype: The weights' dtype (default: float32, whatever the file's).
        tokenizer: Where to read the tokenizer: a folder (`vocab.json` and `merges.txt`, or `tokenizer.json`) or a
            Hub id.

    Raises:
        SourceError: The file cannot be found or read, lacks a component, or is a folder (use `from_pretrained`).
        ConversionError: The file is not a Stable Diffusion 1.x checkpoint, or a component does not fit.
        ValueError: The model does not fit `pipeline` (e.g. an inpainting UNet for `StableDiffusion_1`).
    """
    local = Path(path).expanduser()
    if local.is_dir():
        raise SourceError(
            f"{path} is a folder, not a single checkpoint file: load a diffusers folder with "
            f"from_pretrained({pipeline.__name__}, {str(path)!r})"
        )
    if not local.is_file():
        raise SourceError(f"no such file: {path} (a Hub id is loaded with from_pretrained)")
    opened = open_source(local, components=_COMPONENTS)
    model = _load(pipeline, opened, solver, device, dtype, tokenizer)
    if model.clip_text_encoder.tokenizer is None:
        warnings.warn(
            f"{path} has no tokenizer, so the text encoder takes token ids, not text: pass tokenizer= (e.g. "
            "'openai/clip-vit-large-patch14', the tokenizer of Stable Diffusion 1.x) to encode prompts",
            stacklevel=2,
        )
    return model


def _load(
    pipeline: type[StableDiffusionT],
    source: DiffusersFolder | SingleFile,
    solver: Solver | None,
    device: Device,
    dtype: torch.dtype | None,
    tokenizer: str | Path | None,
) -> StableDiffusionT:
    weights = convert_stable_diffusion_1_weights(source, tokenizer=tokenizer)
    return pipeline.from_converted(
        unet=weights["unet"],
        lda=weights["autoencoder"],
        clip_text_encoder=weights["clip_text"],
        solver=solver,
        device=device,
        dtype=dtype,
    )
