"""What a LoRA fine-tuning needs from a model family, asked of the family: Stable Diffusion 1.x and Stable Diffusion XL.

A `TrainingFamily` builds its components (the family's presets: full size, or `TINY` with random weights; or a
folder `refiners-convert` wrote), wraps them in the family's pipeline (`StableDiffusion_1`, `StableDiffusion_XL`),
whose `set_unet_context` gives the UNet its side inputs and whose `diffusers_modules` names the layers for LoRA
files, and turns a batch into that conditioning: captions into text embeddings (SDXL: both encoders' hidden states
side by side and the pooled embedding), and for SDXL each image's original size and crop into its time ids. A third
family is one more subclass and its two base names in `FAMILIES`.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.lora import KohyaBaseModel
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder
from refiners.foundationals.clip.tokenizer import CLIPTokenizer, bytes_to_unicode
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.model import LatentDiffusionModel
from refiners.foundationals.latent_diffusion.solvers import Solver, SolverParams
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import presets as sd1_presets
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
    SDXL_SOLVER_PARAMS,
    DoubleTextEncoder,
    SDXLUNet,
    StableDiffusion_XL,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import presets as sdxl_presets
from refiners.foundationals.latent_diffusion.unet import UNet
from refiners.training.data import TrainingBatch
from refiners.training.errors import Setting, TrainingSetupError

__all__ = [
    "UNET_FILE",
    "AUTOENCODER_FILE",
    "CLIP_TEXT_FILE",
    "TrainingFamily",
    "StableDiffusion1Training",
    "StableDiffusionXLTraining",
    "FAMILIES",
    "family_of",
    "sdxl_time_ids",
]

# The files `refiners-convert sd1` and `refiners-convert sdxl` write into their output folder.
UNET_FILE = "unet.safetensors"
AUTOENCODER_FILE = "autoencoder.safetensors"
CLIP_TEXT_FILE = "clip_text.safetensors"

Device = torch.device | str | None


def _byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer without merges: one token per byte (a toy vocabulary of 514 ids, no file needed)."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer.from_vocabulary({token: index for index, token in enumerate(tokens)}, merges=[])


class TrainingFamily(ABC):
    """A model family as a fine-tuning sees it (see the module's documentation).

    Attributes:
        label: The family's name in messages.
        text_conditioning: What `encode_texts` makes, by the names `set_unet_context` takes.
        full_base: The `base` of the full-size model (weights required).
        tiny_base: The `base` of the family's `TINY` preset (random weights without a folder, a byte-level
            tokenizer).
        presets: The family's presets by `base` (`random_bases` among them build with random weights without a
            folder: the tiny one, and models trained from scratch such as SD1's `digits`).
        convert_command: How to make a weights folder for this family.
        kohya_base_model: kohya's `ss_base_model_version` of the family's LoRA files.
        default_size: The side, in pixels, of the images the full-size model is trained at and generates.
    """

    label: ClassVar[str]
    text_conditioning: ClassVar[frozenset[str]]
    full_base: ClassVar[str]
    tiny_base: ClassVar[str]
    presets: ClassVar[Mapping[str, Any]]
    random_bases: ClassVar[frozenset[str]]
    convert_command: ClassVar[str]
    kohya_base_model: ClassVar[KohyaBaseModel]
    default_size: ClassVar[int]

    def build(self, base: str, device: Device, tokenizer: CLIPTokenizer | None = None) -> dict[str, Any]:
        """The UNet, autoencoder and text encoder (as the pipeline's keyword arguments) at the sizes of the preset
        `base`, random weights ("meta": to load into), with `tokenizer` (the tiny preset: a byte-level one)."""
        components = self.presets[base].build(device=device)
        if base == self.tiny_base and tokenizer is None:
            tokenizer = _byte_level_tokenizer()
        if tokenizer is not None:
            components["clip_text_encoder"].set_tokenizer(tokenizer)
        return components

    @abstractmethod
    def load(self, folder: Path, base: str) -> dict[str, Any]:
        """The components of a folder `convert_command` wrote (the files checked to be there), at the sizes the
        files record (files that record none: at the sizes of the preset `base`)."""

    @abstractmethod
    def pipeline(
        self, unet: UNet, lda: LatentDiffusionAutoencoder, clip_text_encoder: fl.Chain, solver: Solver
    ) -> LatentDiffusionModel[Any, Any]:
        """The family's pipeline over the components (they are not copied)."""

    @abstractmethod
    def solver_params(self, params: SolverParams) -> SolverParams:
        """The family's schedule for sampling, with `params`' prediction type."""

    @abstractmethod
    def text_encoders(self, clip_text_encoder: fl.Chain) -> dict[str, CLIPTextEncoder]:
        """The text encoders that get LoRAs, by their component name in diffusers' pipeline (and LoRA files)."""

    @abstractmethod
    def encode_texts(self, clip_text_encoder: fl.Chain, captions: list[str]) -> dict[str, Tensor]:
        """The conditioning made from captions, by the names `set_unet_context` takes (`clip_text_embedding`, ...)."""

    def image_conditioning(self, batch: TrainingBatch, size: tuple[int, int]) -> dict[str, Tensor]:
        """The conditioning made per image, by the names `set_unet_context` takes; none by default.

        Args:
            batch: The batch (its images' original sizes and crops).
            size: `(height, width)` of the training images, in pixels.
        """
        return {}

    def check_components(self, folder: Path) -> None:
        """Fail with the command that makes the folder when a file is missing."""
        files = (UNET_FILE, AUTOENCODER_FILE, CLIP_TEXT_FILE)
        if missing := [name for name in files if not (folder / name).is_file()]:
            found = sorted(path.name for path in folder.glob("*.safetensors")) if folder.is_dir() else []
            where = (
                f"{folder} holds {found or 'no .safetensors file'}" if folder.is_dir() else f"{folder} is not a folder"
            )
            raise TrainingSetupError(
                f"the weights folder lacks {', '.join(missing)} ({where}): convert the model with "
                f"`{self.convert_command}` and pass that folder as ",
                Setting("weights", "<folder>"),
            )

    def missing_tokenizer(self, folder: Path) -> TrainingSetupError:
        return TrainingSetupError(
            f"{folder / CLIP_TEXT_FILE} carries no tokenizer in its metadata: convert it again with "
            f"`{self.convert_command}`, which stores the vocabulary with the weights"
        )


class StableDiffusion1Training(TrainingFamily):
    """Stable Diffusion 1.x: `sd15` (SD1.5's sizes), `tiny` (the family's `TINY`) and `digits` (`DIGITS`, trained
    from scratch on handwritten digits: random weights with CLIP's tokenizer, given apart)."""

    label = "Stable Diffusion 1.x"
    text_conditioning = frozenset({"clip_text_embedding"})
    full_base = "sd15"
    tiny_base = "tiny"
    convert_command = "refiners-convert sd1 --from <source> --to <folder>"
    kohya_base_model = "sd_v1"
    default_size = 512

    presets: ClassVar[Mapping[str, Any]] = {
        "sd15": sd1_presets.SD15,
        "tiny": sd1_presets.TINY,
        "digits": sd1_presets.DIGITS,
    }
    random_bases: ClassVar[frozenset[str]] = frozenset({"tiny", "digits"})

    def load(self, folder: Path, base: str) -> dict[str, Any]:
        if ModelConfig.from_metadata(load_metadata_from_safetensors(folder / UNET_FILE)) is not None:
            # The folder's files record the sizes of what they hold: the family's `from_folder` builds them.
            model = StableDiffusion_1.from_folder(folder)
            components = {"unet": model.unet, "lda": model.lda, "clip_text_encoder": model.clip_text_encoder}
        else:
            components = self.presets[base].build(device="meta")
            components["unet"].load_from_safetensors(folder / UNET_FILE)
            components["lda"].load_from_safetensors(folder / AUTOENCODER_FILE)
            components["clip_text_encoder"].load_from_safetensors(folder / CLIP_TEXT_FILE)
        if components["clip_text_encoder"].tokenizer is None:
            raise self.missing_tokenizer(folder)
        return components

    def pipeline(
        self, unet: UNet, lda: LatentDiffusionAutoencoder, clip_text_encoder: fl.Chain, solver: Solver
    ) -> StableDiffusion_1:
        assert isinstance(unet, SD1UNet) and isinstance(clip_text_encoder, CLIPTextEncoder)
        return StableDiffusion_1(unet=unet, lda=lda, clip_text_encoder=clip_text_encoder, solver=solver)

    def solver_params(self, params: SolverParams) -> SolverParams:
        return params

    def text_encoders(self, clip_text_encoder: fl.Chain) -> dict[str, CLIPTextEncoder]:
        assert isinstance(clip_text_encoder, CLIPTextEncoder)
        return {"text_encoder": clip_text_encoder}

    def encode_texts(self, clip_text_encoder: fl.Chain, captions: list[str]) -> dict[str, Tensor]:
        return {"clip_text_embedding": clip_text_encoder(captions)}


def sdxl_time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, size: tuple[int, int]) -> Tensor:
    """SDXL's time ids of a batch, `(batch, 6)` float32: `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.

    As diffusers' `train_text_to_image_lora_sdxl.py` makes them (its `compute_time_ids`): each image's original size
    and crop corner as the data recorded them, and the training size as the target.

    Args:
        original_sizes: `(batch, 2)`, `(height, width)` before the resize.
        crop_top_lefts: `(batch, 2)`, `(top, left)` of the crop (see `Crop.crop_top_left`).
        size: `(height, width)` of the training images.

    Example:
        ```py
        import torch
        from refiners.training.families import sdxl_time_ids

        time_ids = sdxl_time_ids(torch.tensor([[600, 800]]), torch.tensor([[0, 85]]), (512, 512))
        assert time_ids.tolist() == [[600.0, 800.0, 0.0, 85.0, 512.0, 512.0]]
        ```
    """
    target = torch.tensor(size, dtype=torch.float32).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.float(), crop_top_lefts.float(), target], dim=1)


class StableDiffusionXLTraining(TrainingFamily):
    """Stable Diffusion XL: `sdxl` (SDXL base's sizes) and `tiny-sdxl` (the family's `TINY`).

    Both text encoders get LoRAs (`text_encoder`: CLIP-L, `text_encoder_2`: OpenCLIP-G, diffusers' names), and the
    UNet is conditioned on the pooled embedding and on each image's time ids (`sdxl_time_ids`).

    Example:
        ```py
        import torch
        from refiners.training import LoraFineTuning, TrainingBatch

        module = LoraFineTuning(base="tiny-sdxl", rank=4, train_text_encoder=True)
        assert {name.split(".")[0] for name in module.diffusers_loras()} == {"unet", "text_encoder", "text_encoder_2"}
        latents = torch.randn(2, 4, 8, 8)  # 64 x 64 images
        batch = TrainingBatch(
            captions=["a red circle", ""],
            original_sizes=torch.tensor([[600, 800], [64, 64]]),  # (height, width) before the resize
            crop_top_lefts=torch.tensor([[0, 21], [0, 0]]),  # (top, left) of the crop
        )
        conditioning = module.conditioning(batch, latents)
        assert conditioning["time_ids"][0].tolist() == [600.0, 800.0, 0.0, 21.0, 64.0, 64.0]
        noise, steps = module.draw(latents, torch.Generator().manual_seed(0))
        module.loss(latents, conditioning.pop("clip_text_embedding"), noise, steps, **conditioning).backward()
        assert all(parameter.grad is not None for parameter in module.parameters())
        ```
    """

    label = "Stable Diffusion XL"
    text_conditioning = frozenset({"clip_text_embedding", "pooled_text_embedding"})
    full_base = "sdxl"
    tiny_base = "tiny-sdxl"
    convert_command = "refiners-convert sdxl --from <source> --to <folder>"
    kohya_base_model = "sdxl_base_v1-0"
    default_size = 1024

    presets: ClassVar[Mapping[str, Any]] = {"sdxl": sdxl_presets.SDXL_BASE, "tiny-sdxl": sdxl_presets.TINY}
    random_bases: ClassVar[frozenset[str]] = frozenset({"tiny-sdxl"})

    def load(self, folder: Path, base: str) -> dict[str, Any]:
        # The folder's files record the sizes of what they hold: the family's `from_folder` builds them.
        model = StableDiffusion_XL.from_folder(folder)
        if model.clip_text_encoder.text_encoder_l.tokenizer is None:
            raise self.missing_tokenizer(folder)
        return {"unet": model.unet, "lda": model.lda, "clip_text_encoder": model.clip_text_encoder}

    def pipeline(
        self, unet: UNet, lda: LatentDiffusionAutoencoder, clip_text_encoder: fl.Chain, solver: Solver
    ) -> StableDiffusion_XL:
        assert isinstance(unet, SDXLUNet) and isinstance(clip_text_encoder, DoubleTextEncoder)
        return StableDiffusion_XL(unet=unet, lda=lda, clip_text_encoder=clip_text_encoder, solver=solver)

    def solver_params(self, params: SolverParams) -> SolverParams:
        return replace(SDXL_SOLVER_PARAMS, model_prediction_type=params.model_prediction_type)

    def text_encoders(self, clip_text_encoder: fl.Chain) -> dict[str, CLIPTextEncoder]:
        assert isinstance(clip_text_encoder, DoubleTextEncoder)
        return {"text_encoder": clip_text_encoder.text_encoder_l, "text_encoder_2": clip_text_encoder.text_encoder_g}

    def encode_texts(self, clip_text_encoder: fl.Chain, captions: list[str]) -> dict[str, Tensor]:
        embedding, pooled = clip_text_encoder(captions)
        return {"clip_text_embedding": embedding, "pooled_text_embedding": pooled}

    def image_conditioning(self, batch: TrainingBatch, size: tuple[int, int]) -> dict[str, Tensor]:
        original_sizes, crop_top_lefts = batch.get("original_sizes"), batch.get("crop_top_lefts")
        if original_sizes is None or crop_top_lefts is None:
            raise ValueError(
                "an SDXL batch needs each image's original_sizes and crop_top_lefts (B x 2) for its time ids, as "
                f"CaptionedImageDataModule records them; got the keys {sorted(batch)}"
            )
        return {"time_ids": sdxl_time_ids(original_sizes, crop_top_lefts, size)}


FAMILIES: Mapping[str, TrainingFamily] = {
    base: family for family in (StableDiffusion1Training(), StableDiffusionXLTraining()) for base in family.presets
}
"""The family of each `base` of `LoraFineTuning`."""


def family_of(base: str) -> TrainingFamily:
    """The family of `base` (one of `FAMILIES`).

    Raises:
        TrainingSetupError: An unknown base, naming the flag and the choices.
    """
    if base not in FAMILIES:
        raise TrainingSetupError(Setting("base"), f" must be one of {', '.join(map(repr, FAMILIES))}, got {base!r}")
    return FAMILIES[base]
