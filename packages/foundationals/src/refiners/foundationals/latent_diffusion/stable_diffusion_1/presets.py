"""Named sizes of the Stable Diffusion 1.x family: `SD15`, and `TINY`, the smallest the architecture allows.

`DIGITS` is the architecture of the handwritten digits model the repository ships (trained from scratch with
`refiners-train`). `TINY` is the model the tests, the examples, the demo and `refiners-train`'s `base: tiny` share (instead of each
writing the sizes out): SD1's blocks at 32 to 64 channels, 4 attention heads, an autoencoder of 32-channel blocks
with one layer each, and a 2-layer, 32-wide CLIP text encoder over a byte-level vocabulary (514 ids: each byte
alone and at the end of a word, then the start and end tokens). Each preset is the `ModelConfig` of every
component: what a converted file records, so a preset builds exactly what `from_folder` would.

Example:
    ```py
    from refiners.foundationals.latent_diffusion.stable_diffusion_1 import StableDiffusion_1
    from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY

    sd = StableDiffusion_1(**TINY.build())
    assert sd.unet.channels == (32, 32, 64, 64) and sd.clip_text_encoder.embedding_dim == 32
    ```
"""

from dataclasses import dataclass
from typing import Any

import torch

from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, CLIPTextEncoderL
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet

__all__ = ["SD1Preset", "SD15", "TINY", "TINY_VOCABULARY_SIZE", "DIGITS"]

TINY_VOCABULARY_SIZE = 2 * 256 + 2
"""The byte-level vocabulary of `TINY`'s text encoder: each byte alone and at the end of a word, start and end."""


@dataclass(frozen=True)
class SD1Preset:
    """The sizes of the three components of a Stable Diffusion 1.x model, as their constructor calls.

    Attributes:
        unet: The `SD1UNet`'s.
        lda: The autoencoder's.
        clip_text_encoder: The text encoder's (without tokenizer: a vocabulary is given to it apart).
    """

    unet: ModelConfig
    lda: ModelConfig
    clip_text_encoder: ModelConfig

    def build(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The components, as keyword arguments of `StableDiffusion_1` (random weights; "meta" to load into)."""
        return {
            "unet": self.unet.build((SD1UNet,), device=device, dtype=dtype),
            "lda": self.lda.build((LatentDiffusionAutoencoder, SD1Autoencoder), device=device, dtype=dtype),
            "clip_text_encoder": self.clip_text_encoder.build(
                (CLIPTextEncoder, CLIPTextEncoderL), device=device, dtype=dtype
            ),
        }


SD15 = SD1Preset(
    unet=ModelConfig.of(SD1UNet),
    lda=ModelConfig.of(SD1Autoencoder),
    clip_text_encoder=ModelConfig.of(CLIPTextEncoderL),
)
"""Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5)."""

TINY = SD1Preset(
    unet=ModelConfig.of(SD1UNet, channels=(32, 32, 64, 64), context_embedding_dim=32, num_attention_heads=4),
    lda=ModelConfig.of(
        LatentDiffusionAutoencoder, encoder_scale=0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1
    ),
    clip_text_encoder=ModelConfig.of(
        CLIPTextEncoder,
        embedding_dim=32,
        vocabulary_size=TINY_VOCABULARY_SIZE,
        num_layers=2,
        num_attention_heads=4,
        feedforward_dim=64,
        gelu_approximation="quick",
    ),
)
"""The SD1 architecture at the smallest sizes it allows (see the module's documentation)."""

DIGITS = SD1Preset(
    unet=ModelConfig.of(SD1UNet, channels=(32, 32, 64, 64), context_embedding_dim=32, num_attention_heads=4),
    lda=ModelConfig.of(
        LatentDiffusionAutoencoder,
        encoder_scale=1.0,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        num_groups=8,
    ),
    clip_text_encoder=ModelConfig.of(
        CLIPTextEncoder,
        embedding_dim=32,
        num_layers=2,
        num_attention_heads=4,
        feedforward_dim=64,
        gelu_approximation="quick",
    ),
)
"""The handwritten digits model, trained from scratch (`models/digits` in the repository): 64x64 images, SD1's
architecture at `TINY`'s UNet sizes, a 16-to-32-channel autoencoder and a 2-layer, 32-wide text encoder over CLIP's
real vocabulary (49,408 tokens). The autoencoder's `encoder_scale` is measured on the data when it is trained."""
