"""The converted weights of a Stable Diffusion 1.x model, and the components they build at their own sizes.

The files and their records are the same for every family (`refiners.foundationals.latent_diffusion.weights`,
re-exported here); what is SD1's is how a folder without records loads (SD1.5's sizes), and `SD1Weights`.

`refiners-convert sd1` writes a folder of three files, `CLIP_TEXT_FILE`, `AUTOENCODER_FILE` and `UNET_FILE`. Each
records in its metadata the constructor call of the model it holds (`refiners.fluxion.model_config`), so that it
loads at its sizes, SD1.5's or any other; the text encoder's also carries its tokenizer
(`CLIPTokenizer.to_metadata`), and the UNet's its native sample size (`SAMPLE_SIZE_KEY`: diffusers' `sample_size`, the
side of the latents it was trained on). The conversion in memory (`refiners.converters`) gives the same tensors and
metadata as `ConvertedWeights`, without writing files; `SD1Weights` holds either kind.

Files converted before sizes were recorded have no constructor call: they are read as SD1.5's sizes, and one that does
not fit says to convert it again.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, CLIPTextEncoderL
from refiners.foundationals.clip.tokenizer import METADATA_PREFIX, CLIPTokenizer
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.weights import (
    AUTOENCODER_FILE,
    CLIP_TEXT_FILE,
    SAMPLE_SIZE_KEY,
    UNET_FILE,
    ComponentWeights,
    ConvertedWeights,
    WeightsFile,
    unet_metadata,
)

__all__ = [
    "CLIP_TEXT_FILE",
    "AUTOENCODER_FILE",
    "UNET_FILE",
    "SAMPLE_SIZE_KEY",
    "SD15_SAMPLE_SIZE",
    "ConvertedWeights",
    "WeightsFile",
    "ComponentWeights",
    "SD1Weights",
    "unet_metadata",
]

SD15_SAMPLE_SIZE = 64
"""The side of SD1.5's latents in training (diffusers' `sample_size`): 512x512 images."""

# What each file's record may name: the family's classes for its components.
_UNET_CLASSES = (SD1UNet,)
_AUTOENCODER_CLASSES = (LatentDiffusionAutoencoder, SD1Autoencoder)
_CLIP_TEXT_CLASSES = (CLIPTextEncoder, CLIPTextEncoderL)


def _convert_command(folder: Path | str) -> str:
    return f"refiners-convert sd1 --from SOURCE --to {folder}"


@dataclass(frozen=True)
class SD1Weights:
    """The converted weights of the three components of a Stable Diffusion 1.x model, in files or in memory.

    `build_*` make the models they fit on the "meta" device (nothing allocated); the weights' `load_into` fills them.

    Attributes:
        unet: The UNet's weights.
        lda: The autoencoder's weights.
        clip_text_encoder: The text encoder's weights (and its tokenizer, in the metadata).
    """

    unet: ComponentWeights
    lda: ComponentWeights
    clip_text_encoder: ComponentWeights

    @classmethod
    def read(cls, folder: str | Path) -> "SD1Weights":
        """The files of a folder that `refiners-convert sd1` wrote, their metadata read (not their tensors).

        Raises:
            FileNotFoundError: The folder, or one of its files, is missing; the message says how to make it.
        """
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"no such folder: {path}. Convert a Stable Diffusion 1.x model into it with `{_convert_command(path)}`"
            )
        return cls(
            unet=WeightsFile.open(path / UNET_FILE, _convert_command(path)),
            lda=WeightsFile.open(path / AUTOENCODER_FILE, _convert_command(path)),
            clip_text_encoder=WeightsFile.open(path / CLIP_TEXT_FILE, _convert_command(path)),
        )

    @property
    def sample_size(self) -> int:
        """The UNet's native sample size, in latent pixels (SD1.5's for weights that do not record it)."""
        value = self.unet.metadata.get(SAMPLE_SIZE_KEY)
        if value is None:
            return SD15_SAMPLE_SIZE
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"the UNet's metadata gives {SAMPLE_SIZE_KEY}={value!r}: expected a positive integer")
        return int(value)

    def build_unet(self, in_channels: int, dtype: torch.dtype | None = None) -> SD1UNet:
        """The UNet the weights fit, on the meta device; `SD1UNet(in_channels)` if they record no sizes.

        Raises:
            ValueError: The weights record no sizes and are not SD1.5's; the message says to convert them again.
        """
        config = ModelConfig.from_metadata(self.unet.metadata)
        if config is None:
            return _unrecorded(self.unet, SD1UNet(in_channels, device="meta", dtype=dtype))
        return config.build(_UNET_CLASSES, device="meta", dtype=dtype)

    def build_lda(self, dtype: torch.dtype | None = None) -> LatentDiffusionAutoencoder:
        """The autoencoder the weights fit, on the meta device; `SD1Autoencoder` if they record no sizes.

        Raises:
            ValueError: The weights record no sizes and are not SD1.5's; the message says to convert them again.
        """
        config = ModelConfig.from_metadata(self.lda.metadata)
        if config is None:
            return _unrecorded(self.lda, SD1Autoencoder(device="meta", dtype=dtype))
        return config.build(_AUTOENCODER_CLASSES, device="meta", dtype=dtype)

    def build_clip_text_encoder(self, dtype: torch.dtype | None = None) -> CLIPTextEncoder:
        """The text encoder the weights fit, on the meta device, with the metadata's tokenizer if there is one;
        `CLIPTextEncoderL` if they record no sizes.

        Raises:
            ValueError: The weights record no sizes and are not SD1.5's; the message says to convert them again.
        """
        metadata = self.clip_text_encoder.metadata
        config = ModelConfig.from_metadata(metadata)
        if config is None:
            encoder = _unrecorded(self.clip_text_encoder, CLIPTextEncoderL(device="meta", dtype=dtype))
        else:
            encoder = config.build(_CLIP_TEXT_CLASSES, device="meta", dtype=dtype)
        if any(key.startswith(METADATA_PREFIX) for key in metadata):
            encoder.set_tokenizer(CLIPTokenizer.from_metadata(metadata))
        return encoder


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def _unrecorded(weights: ComponentWeights, sd15: ModuleT) -> ModuleT:
    """`sd15`, the family's default component, for weights that record no sizes: checked to fit, from the file's
    header, before anything is built around it."""
    if not isinstance(weights, WeightsFile):
        return sd15  # in memory: `load_into` lists what does not fit
    expected = {key: tuple(tensor.shape) for key, tensor in sd15.state_dict().items()}
    differing = sorted(
        key for key in expected.keys() | weights.shapes.keys() if expected.get(key) != weights.shapes.get(key)
    )
    if not differing:
        return sd15
    example = differing[0]
    raise ValueError(
        f"{weights.path} was converted before sizes were recorded and is not SD1.5-sized: convert it again with "
        f"{_convert_command(weights.path.parent)} ({len(differing)} of its tensors differ from {type(sd15).__name__}'s, "
        f"e.g. {example}: {weights.shapes.get(example, 'absent')} in the file, {expected.get(example, 'absent')} in "
        "the model)"
    )
