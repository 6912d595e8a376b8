"""`refiners-convert --check`: a converted model's output next to the reference implementation's, on a random input.

The reference is diffusers' or transformers' model, loaded from the same source by the reference library's own
code: `from_pretrained` for a diffusers folder; for an original single-file checkpoint, diffusers' own
`convert_ldm_*_checkpoint` into a model built from the Stable Diffusion 1.5 config. A wrong key map therefore shows
as a large difference. Both models run in float32 on CPU, one after the other (never both in memory): converted
weights of a narrower dtype are upcast, so the difference measures the conversion plus that rounding.

Needs diffusers and transformers: the `reference` extra (`pip install "refiners-converters[reference]"`).
"""

import gc
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from refiners.converters.architecture import autoencoder_for, clip_text_for, unet_for
from refiners.converters.single_file import ldm_component_prefix
from refiners.converters.sources import DiffusersFolder, Source, SourceError
from refiners.fluxion.utils import load_state_dict_from_safetensors

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel

__all__ = [
    "SD15_UNET_CONFIG",
    "compare_outputs",
    "SDXL_UNET_CONFIG",
    "SDXL_REFINER_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "SDXL_TEXT_ENCODER_2_CONFIG",
    "SD15_VAE_CONFIG",
    "SD15_TEXT_ENCODER_CONFIG",
    "Comparison",
    "missing_reference_packages",
    "compare_clip_text",
    "compare_autoencoder",
    "compare_unet",
]

# runwayml/stable-diffusion-v1-5's configs, for references built from single files (which carry none).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
"""stabilityai/stable-diffusion-xl-base-1.0's `unet/config.json` (the entries that differ from diffusers' defaults)."""
SDXL_REFINER_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [384, 768, 1536, 1536],
    "attention_head_dim": [6, 12, 24, 24],
    "transformer_layers_per_block": 4,
    "cross_attention_dim": 1280,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2560,
}
"""stabilityai/stable-diffusion-xl-refiner-1.0's `unet/config.json` (the entries that differ from diffusers' defaults)."""

SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SDXL_VAE_CONFIG: dict[str, Any] = SD15_VAE_CONFIG | {
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
"""SDXL base's `vae/config.json`: SD1.5's architecture, another scaling factor."""
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-05,
}
"""SDXL base's `text_encoder_2/config.json` (OpenCLIP ViT-bigG/14); its `text_encoder` is SD1.5's CLIP ViT-L."""


@dataclass(frozen=True)
class Comparison:
    """How far the converted model's output is from the reference's.

    Attributes:
        max_abs_difference: The largest absolute difference between the two outputs.
        scale: The largest absolute value of the reference output.
    """

    max_abs_difference: float
    scale: float

    @property
    def relative(self) -> float:
        """The max abs difference relative to the output's scale."""
        return self.max_abs_difference / max(self.scale, 1e-12)


def missing_reference_packages() -> list[str]:
    """The reference libraries `--check` needs that are not installed."""
    return [name for name in ("diffusers", "transformers") if importlib.util.find_spec(name) is None]


def compare_outputs(expected: Tensor, actual: Tensor) -> Comparison:
    """How far `actual` is from the reference output `expected`."""
    return Comparison((actual - expected).abs().max().item(), expected.abs().max().item())


def _weights_variant(source: DiffusersFolder, component: str) -> str | None:
    return "fp16" if any(".fp16." in path.name for path in source.weight_files(component)) else None


def _component_state_dict(source: Source, component: str) -> dict[str, Tensor]:
    """The component's tensors, from a single file, in diffusers/transformers layout by diffusers' own conversion."""
    assert not isinstance(source, DiffusersFolder)
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    tensors = source.tensors
    prefix = ldm_component_prefix(tensors, component)
    if prefix is None:  # one component's weights, already in diffusers/transformers layout
        return dict(tensors)
    checkpoint = {key: tensors[key] for key in tensors if key.startswith(prefix)}
    if component == "unet":
        conv_in = checkpoint[f"{prefix}input_blocks.0.0.weight"]
        return convert_ldm_unet_checkpoint(checkpoint, SD15_UNET_CONFIG | {"in_channels": conv_in.shape[1]})
    if component == "vae":
        return convert_ldm_vae_checkpoint(checkpoint, SD15_VAE_CONFIG)
    converted = convert_ldm_clip_checkpoint(checkpoint)
    # Checkpoints saved with older transformers name the text encoder's keys without `text_model.`.
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in converted.items()}


def _assign(model: torch.nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    expected = model.state_dict()
    # transformers 5 names a CLIPTextModel's keys without `text_model.`; checkpoints on the Hub have it.
    if not any(key.startswith("text_model.") for key in expected):
        state_dict = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    state_dict = {key: value for key, value in state_dict.items() if not key.endswith("position_ids")}
    if missing := [key for key in expected if key not in state_dict and not key.endswith("position_ids")]:
        raise SourceError(f"cannot build the reference {what}: its checkpoint lacks {', '.join(missing[:10])}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if meta := [name for name, tensor in model.state_dict().items() if tensor.is_meta]:
        raise SourceError(f"cannot build the reference {what}: {', '.join(meta[:10])} left unloaded")


def _reference_clip_text(source: Source) -> "CLIPTextModel":
    from transformers import CLIPTextConfig, CLIPTextModel

    if isinstance(source, DiffusersFolder):
        folder = source.component_folder("text_encoder")
        return CLIPTextModel.from_pretrained(folder, variant=_weights_variant(source, "text_encoder")).float()
    # Built on CPU: transformers' non-persistent `position_ids` buffer would stay on the meta device.
    model = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    _assign(model, _component_state_dict(source, "text_encoder"), "CLIPTextModel")
    return model.float()


def _reference_autoencoder(source: Source) -> "AutoencoderKL":
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    if isinstance(source, DiffusersFolder):
        folder = source.component_folder("vae")
        return AutoencoderKL.from_pretrained(folder, variant=_weights_variant(source, "vae")).float()
    with torch.device("meta"):
        model = AutoencoderKL(**SD15_VAE_CONFIG)
    _assign(model, _component_state_dict(source, "vae"), "AutoencoderKL")
    return model.float()


def _reference_unet(source: Source, in_channels: int) -> "UNet2DConditionModel":
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    if isinstance(source, DiffusersFolder):
        folder = source.component_folder("unet")
        return UNet2DConditionModel.from_pretrained(folder, variant=_weights_variant(source, "unet")).float()
    with torch.device("meta"):
        config: dict[str, Any] = SD15_UNET_CONFIG | {"in_channels": in_channels}
        model = UNet2DConditionModel(**config)
    _assign(model, _component_state_dict(source, "unet"), "UNet2DConditionModel")
    return model.float()


def compare_clip_text(source: Source, converted: Path, seed: int = 0) -> Comparison:
    """Compare the last hidden states of transformers' `CLIPTextModel` and `CLIPTextEncoderL` on random token ids.

    Args:
        source: The source the weights were converted from.
        converted: The converted `.safetensors` file.
        seed: Seed of the random input.
    """
    encoder = clip_text_for(source)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, encoder.vocabulary_size, (1, encoder.max_sequence_length), generator=generator)
    reference = _reference_clip_text(source).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
    del reference
    gc.collect()
    load_state_dict_from_safetensors(encoder, converted)  # weights only: the encoder takes ids, not text
    with torch.no_grad():
        return compare_outputs(expected, encoder(ids))


def compare_autoencoder(source: Source, converted: Path, seed: int = 0) -> Comparison:
    """Compare the reconstructions of diffusers' `AutoencoderKL` (posterior mean) and `SD1Autoencoder`.

    Args:
        source: The source the weights were converted from.
        converted: The converted `.safetensors` file.
        seed: Seed of the random input (a 64x64 image in [-1, 1]).
    """
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    reference = _reference_autoencoder(source).eval()
    with torch.no_grad():
        expected = reference(image, sample_posterior=False).sample
    del reference
    gc.collect()
    autoencoder = autoencoder_for(source)
    load_state_dict_from_safetensors(autoencoder, converted)
    with torch.no_grad():
        return compare_outputs(expected, autoencoder(image))


def _shape_in_file(path: Path, key: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice(key).get_shape())


def compare_unet(source: Source, converted: Path, seed: int = 0) -> Comparison:
    """Compare the noise predictions of diffusers' `UNet2DConditionModel` and `SD1UNet` on random inputs.

    Args:
        source: The source the weights were converted from.
        converted: The converted `.safetensors` file (for `SD1UNet` with 4 or 9 input channels).
        seed: Seed of the random inputs (8x8 latents, a random text embedding, timestep 500).
    """
    # The first convolution of the down blocks reads the latents: its weight tells the input channels.
    shapes = {key: tensor.shape for key, tensor in unet_for(source, 4).state_dict().items()}
    conv_in = next(key for key, shape in shapes.items() if key.startswith("DownBlocks.") and len(shape) == 4)
    in_channels = _shape_in_file(converted, conv_in)[1]
    generator = torch.Generator().manual_seed(seed)
    unet = unet_for(source, in_channels)
    latents = torch.randn(1, in_channels, 8, 8, generator=generator)
    text_embedding = torch.randn(1, 77, unet.context_embedding_dim, generator=generator)
    timestep = torch.tensor([500])
    reference = _reference_unet(source, in_channels).eval()
    with torch.no_grad():
        expected = reference(latents, timestep, encoder_hidden_states=text_embedding).sample
    del reference
    gc.collect()
    load_state_dict_from_safetensors(unet, converted)
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text_embedding)
    with torch.no_grad():
        return compare_outputs(expected, unet(latents))
