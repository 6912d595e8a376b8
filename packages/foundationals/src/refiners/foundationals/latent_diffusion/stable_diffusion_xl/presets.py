"""Named sizes of the Stable Diffusion XL family: `SDXL_BASE`, `SDXL_REFINER`, and `TINY` and `TINY_REFINER`, their
architectures at toy sizes.

`TINY` keeps what makes SDXL SDXL (three resolutions without attention at the first, several transformer layers per
block, linear projections, the text-time embedding, two text encoders of their own widths, 32 and 48, the second
pooled) at sizes that run in milliseconds: the tests share it. Each preset is the `ModelConfig` of every component,
as a converted file records it.

Example:
    ```py
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY

    sdxl = StableDiffusion_XL(**TINY.build(), default_size=64)
    assert sdxl.unet.context_embedding_dim == sdxl.clip_text_encoder.embedding_dim == 80
    ```
"""

from dataclasses import dataclass
from typing import Any

import torch

from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.model import (
    SDXL_AUTOENCODER_CLASSES,
    SDXL_TEXT_ENCODER_CLASSES,
    SDXL_UNET_CLASSES,
    SDXLAutoencoder,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.text_encoder import (
    DoubleTextEncoder,
    RefinerTextEncoder,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import SDXLRefinerUNet, SDXLUNet

__all__ = ["SDXLPreset", "SDXL_BASE", "SDXL_REFINER", "TINY", "TINY_REFINER"]


@dataclass(frozen=True)
class SDXLPreset:
    """The sizes of the three components of an SDXL model, as their constructor calls.

    Attributes:
        unet: The UNet's.
        lda: The autoencoder's.
        clip_text_encoder: The `DoubleTextEncoder`'s (its two encoders nested).
    """

    unet: ModelConfig
    lda: ModelConfig
    clip_text_encoder: ModelConfig

    def build(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The components, as keyword arguments of `StableDiffusion_XL` (random weights; "meta" to load into)."""
        return {
            "unet": self.unet.build(SDXL_UNET_CLASSES, device=device, dtype=dtype),
            "lda": self.lda.build(SDXL_AUTOENCODER_CLASSES, device=device, dtype=dtype),
            "clip_text_encoder": self.clip_text_encoder.build(SDXL_TEXT_ENCODER_CLASSES, device=device, dtype=dtype),
        }


SDXL_BASE = SDXLPreset(
    unet=ModelConfig.of(SDXLUNet),
    lda=ModelConfig.of(SDXLAutoencoder),
    clip_text_encoder=ModelConfig.of(DoubleTextEncoder),
)
"""stabilityai/stable-diffusion-xl-base-1.0."""

SDXL_REFINER = SDXLPreset(
    unet=ModelConfig.of(SDXLRefinerUNet),
    lda=ModelConfig.of(SDXLAutoencoder),
    clip_text_encoder=ModelConfig.of(RefinerTextEncoder),
)
"""stabilityai/stable-diffusion-xl-refiner-1.0 (`StableDiffusion_XL_Refiner`)."""


def _clip(width: int, feedforward: int, layers: int, gelu: str) -> ModelConfig:
    return ModelConfig.of(
        CLIPTextEncoder,
        embedding_dim=width,
        vocabulary_size=2 * 256 + 2,  # the byte-level vocabulary of the SD1 family's TINY
        num_layers=layers,
        num_attention_heads=4,
        feedforward_dim=feedforward,
        gelu_approximation=gelu,
    )


TINY = SDXLPreset(
    unet=ModelConfig.of(
        SDXLUNet,
        channels=(32, 64, 64),
        num_attention_heads=(1, 2, 4),
        transformer_depths=(1, 2, 3),
        context_embedding_dim=32 + 48,
        pooled_embedding_dim=48,
        time_embedding_dim=8,
    ),
    lda=ModelConfig.of(
        LatentDiffusionAutoencoder, encoder_scale=0.13025, block_out_channels=(32, 32, 32, 32), layers_per_block=1
    ),
    clip_text_encoder=ModelConfig.of(
        DoubleTextEncoder,
        text_encoder_l=_clip(32, 64, 2, "quick"),
        text_encoder_g=_clip(48, 96, 3, "none"),
        projection_dim=48,
    ),
)
"""SDXL's architecture at toy sizes (see the module's documentation)."""

TINY_REFINER = SDXLPreset(
    unet=ModelConfig.of(
        SDXLUNet,
        channels=(32, 64, 64, 64),
        attention_levels=(False, True, True, False),
        num_attention_heads=(1, 2, 4, 4),
        transformer_depths=(2, 2, 2, 2),
        context_embedding_dim=48,
        pooled_embedding_dim=48,
        num_time_ids=5,
        time_embedding_dim=8,
    ),
    lda=TINY.lda,
    clip_text_encoder=ModelConfig.of(
        RefinerTextEncoder, text_encoder_g=TINY.clip_text_encoder.arguments["text_encoder_g"], projection_dim=48
    ),
)
"""The refiner's architecture at toy sizes (four resolutions, attention at the middle two, OpenCLIP-G alone, five
time ids), with `TINY`'s autoencoder and OpenCLIP-G: it takes `TINY`'s latents (`StableDiffusion_XL_Refiner`)."""
