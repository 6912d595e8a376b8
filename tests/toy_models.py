"""Small reference models (diffusers, transformers) and their refiners counterparts, shared by test modules.

Importable from any test as `toy_models` (the root pyproject puts `tests/` on pytest's `pythonpath` and pyright's
`extraPaths`).

- `build_unet`, `build_text_encoder`, `layers`: the smallest diffusers UNet and transformers CLIP text model that
  have every kind of layer a LoRA file names (for LoRA-format tests that compare weight deltas only).
- `Reference`, `build_reference`, `convert_reference`, `toy_sd`: the SD1.5 architecture at toy size (UNet widths
  32-64, a 2-layer CLIP text model) on both sides, for tests that run the models.
"""

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from refiners.converters.clip_text import convert_transformers_clip_text
from refiners.converters.reference_check import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.foundationals.clip import CLIPTextEncoder
from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet, StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY

# -- the smallest models with every LoRA target ---------------------------------------------------------------------


def build_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def build_text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


Layers = dict[str, nn.Linear | nn.Conv2d]


def layers(components: dict[str, nn.Module]) -> Layers:
    """The Linear and Conv2d layers of the models, by name with the component first: what a LoRA may update."""
    return {
        f"{component}.{name}": module
        for component, model in components.items()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    }


# -- the SD1.5 architecture at toy size -----------------------------------------------------------------------------

# The family's TINY preset, with a smaller vocabulary (64 ids) for the text encoder.
UNET_CHANNELS: tuple[int, int, int, int] = TINY.unet.arguments["channels"]
TEXT_WIDTH: int = TINY.unet.arguments["context_embedding_dim"]
HEADS: int = TINY.unet.arguments["num_attention_heads"]
VOCABULARY_SIZE = 64
UNET_CONFIG: dict[str, Any] = SD15_UNET_CONFIG | {
    "block_out_channels": list(UNET_CHANNELS),
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": HEADS,  # diffusers' name for SD1's number of heads
    "sample_size": 8,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = SD15_TEXT_ENCODER_CONFIG | {
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": TEXT_WIDTH,
    "vocab_size": VOCABULARY_SIZE,
}


@dataclass
class Reference:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel


def perturb_norms(model: nn.Module) -> None:
    """Random norm weights and biases: default init gives every norm the same weights, which hides swaps."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                assert module.weight is not None and module.bias is not None
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))


def build_reference() -> Reference:
    """diffusers' UNet and transformers' text model at toy size, random weights (seeded), norms perturbed."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).eval()
    perturb_norms(unet)
    perturb_norms(text_encoder)
    return Reference(unet, text_encoder)


def toy_unet() -> SD1UNet:
    return TINY.unet.build((SD1UNet,), device="meta")


def toy_text_encoder() -> CLIPTextEncoder:
    return CLIPTextEncoder(
        embedding_dim=TEXT_WIDTH,
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=2,
        num_attention_heads=4,
        feedforward_dim=64,
        gelu_approximation="quick",
        device="meta",
    )


def convert_reference(reference: Reference) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The reference's weights for `toy_unet()` and `toy_text_encoder()`, by the refiners key maps."""
    unet = convert_diffusers_unet(reference.unet.state_dict(), toy_unet())
    text_encoder = convert_transformers_clip_text(reference.text_encoder.state_dict(), toy_text_encoder())
    return unet, text_encoder


def toy_sd(converted: tuple[dict[str, Tensor], dict[str, Tensor]]) -> StableDiffusion_1:
    """A fresh `StableDiffusion_1` holding copies of the converted weights (fusing a LoRA writes into them)."""
    unet, text_encoder = toy_unet(), toy_text_encoder()
    unet.load_state_dict({k: v.clone() for k, v in converted[0].items()}, assign=True)
    text_encoder.load_state_dict({k: v.clone() for k, v in converted[1].items()}, assign=True)
    lda = LatentDiffusionAutoencoder(0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    return StableDiffusion_1(unet=unet, lda=lda, clip_text_encoder=text_encoder)
