"""diffusers' `AutoencoderKL` (the `vae` of Stable Diffusion pipelines) to `LatentDiffusionAutoencoder` weights.

The key map is derived from the autoencoder's structure: diffusers' blocks (`down_blocks.{i}`, `up_blocks.{i}`,
`mid_block`) are matched in order with the `EncoderBlock`s, `DecoderBlock`s and `MidBlock`s, and within them each
diffusers module with the layer that plays its role, so it holds for every width, depth and number of blocks.
"""

from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.converters.engine import KeyMap, convert_state_dict
from refiners.foundationals.latent_diffusion.auto_encoder import (
    DecoderBlock,
    EncoderBlock,
    LatentDiffusionAutoencoder,
    MidBlock,
    Resnet,
    SelfAttentionBlock,
)

__all__ = ["diffusers_autoencoder_key_map", "convert_diffusers_autoencoder"]

T = TypeVar("T", bound=fl.Module)


def _path(root: fl.Chain, module: fl.Module) -> str:
    """The state-dict prefix of `module` in `root` (e.g. `Encoder.EncoderBlock_1.Resnet_1.Chain.Conv2d_1`)."""
    parts: list[str] = []
    while module is not root:
        parent = module.parent
        if parent is None:
            raise ValueError(f"{type(module).__name__} is not inside {type(root).__name__}")
        parts.append(parent.key_of(module))
        module = parent
    return ".".join(reversed(parts))


def _add_module(key_map: KeyMap, source: str, root: fl.Chain, module: fl.Module) -> None:
    """Map the source module's tensors (`{source}.weight`, `{source}.bias`) to the same tensors of `module`."""
    target = _path(root, module)
    for name, _ in module.named_parameters(recurse=False):
        key_map.add(f"{source}.{name}", f"{target}.{name}")


def _children(chain: fl.Chain, layer_type: type[T]) -> list[T]:
    """The direct children of `chain` of type `layer_type`, in order (`Chain.layers` would also search deeper)."""
    return [child for child in chain if isinstance(child, layer_type)]


def _flatten_1x1_conv(weight: Tensor) -> Tensor:
    # Checkpoints from the original latent-diffusion code store the attention projections as 1x1 convolutions,
    # `(out, in, 1, 1)`: the same matrix as a Linear's `(out, in)` weight.
    return weight.flatten(1) if weight.dim() == 4 else weight


def _add_linear(key_map: KeyMap, source: str, root: fl.Chain, linear: fl.Linear) -> None:
    target = _path(root, linear)
    key_map.add(f"{source}.weight", f"{target}.weight", transform=_flatten_1x1_conv)
    key_map.add(f"{source}.bias", f"{target}.bias")


def _add_resnet(key_map: KeyMap, source: str, root: fl.Chain, resnet: Resnet) -> None:
    body = resnet.layer("Chain", fl.Chain)
    norm1, norm2 = _children(body, fl.GroupNorm)
    conv1, conv2 = _children(body, fl.Conv2d)
    for name, module in (("norm1", norm1), ("conv1", conv1), ("norm2", norm2), ("conv2", conv2)):
        _add_module(key_map, f"{source}.{name}", root, module)
    if isinstance(shortcut := resnet[0], fl.Conv2d):
        _add_module(key_map, f"{source}.conv_shortcut", root, shortcut)


def _add_attention(key_map: KeyMap, source: str, root: fl.Chain, block: SelfAttentionBlock) -> None:
    _add_module(key_map, f"{source}.group_norm", root, block.ensure_find(fl.GroupNorm))
    attention = block.ensure_find(fl.SelfAttention2d)
    query, key, value = _children(attention.layer("Distribute", fl.Distribute), fl.Linear)
    output = attention.layer("Linear", fl.Linear)
    for name, linear in (("to_q", query), ("to_k", key), ("to_v", value), ("to_out.0", output)):
        _add_linear(key_map, f"{source}.{name}", root, linear)


def _add_mid_block(key_map: KeyMap, source: str, root: fl.Chain, block: MidBlock) -> None:
    for index, resnet in enumerate(_children(block, Resnet)):
        _add_resnet(key_map, f"{source}.resnets.{index}", root, resnet)
    _add_attention(key_map, f"{source}.attentions.0", root, block.layer("SelfAttentionBlock", SelfAttentionBlock))


def _add_sampling_block(key_map: KeyMap, source: str, root: fl.Chain, block: EncoderBlock | DecoderBlock) -> None:
    for index, resnet in enumerate(_children(block, Resnet)):
        _add_resnet(key_map, f"{source}.resnets.{index}", root, resnet)
    if (downsample := block.find(fl.Downsample)) is not None:
        _add_module(key_map, f"{source}.downsamplers.0.conv", root, downsample.ensure_find(fl.Conv2d))
    if (upsample := block.find(fl.Upsample)) is not None:
        _add_module(key_map, f"{source}.upsamplers.0.conv", root, upsample.ensure_find(fl.Conv2d))


def diffusers_autoencoder_key_map(autoencoder: LatentDiffusionAutoencoder) -> KeyMap:
    """The key map from a diffusers `AutoencoderKL` state dict to `autoencoder`'s.

    The mid-block attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`) are Linear weights in diffusers; when a
    source stores them as 1x1 convolution weights (4-D, as checkpoints of the original latent-diffusion code do),
    they are flattened.

    Args:
        autoencoder: The target autoencoder (its weights are not read: it may live on the "meta" device).
    """
    key_map = KeyMap()
    root = autoencoder
    encoder, decoder = autoencoder.encoder, autoencoder.decoder

    conv_in, quant_conv = _children(encoder, fl.Conv2d)
    _add_module(key_map, "encoder.conv_in", root, conv_in)
    for index, block in enumerate(_children(encoder, EncoderBlock)):
        _add_sampling_block(key_map, f"encoder.down_blocks.{index}", root, block)
    _add_mid_block(key_map, "encoder.mid_block", root, encoder.layer("MidBlock", MidBlock))
    encoder_out = encoder.layer("Chain", fl.Chain)
    _add_module(key_map, "encoder.conv_norm_out", root, encoder_out.layer("GroupNorm", fl.GroupNorm))
    _add_module(key_map, "encoder.conv_out", root, encoder_out.layer("Conv2d", fl.Conv2d))
    _add_module(key_map, "quant_conv", root, quant_conv)

    post_quant_conv, decoder_conv_in = _children(decoder, fl.Conv2d)
    _add_module(key_map, "post_quant_conv", root, post_quant_conv)
    _add_module(key_map, "decoder.conv_in", root, decoder_conv_in)
    _add_mid_block(key_map, "decoder.mid_block", root, decoder.layer("MidBlock", MidBlock))
    for index, block in enumerate(_children(decoder, DecoderBlock)):
        _add_sampling_block(key_map, f"decoder.up_blocks.{index}", root, block)
    decoder_out = decoder.layer("Chain", fl.Chain)
    _add_module(key_map, "decoder.conv_norm_out", root, decoder_out.layer("GroupNorm", fl.GroupNorm))
    _add_module(key_map, "decoder.conv_out", root, decoder_out.layer("Conv2d", fl.Conv2d))
    return key_map


def convert_diffusers_autoencoder(
    source: Mapping[str, Tensor], autoencoder: LatentDiffusionAutoencoder, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Convert a diffusers `AutoencoderKL` state dict into `autoencoder`'s (see `diffusers_autoencoder_key_map`).

    Args:
        source: The source tensors, e.g. `load_from_safetensors("vae/diffusion_pytorch_model.safetensors")`.
        autoencoder: The target autoencoder (only its state-dict shapes are read: it may live on the "meta" device).
        dtype: Cast floating-point tensors to this dtype (default: keep the source's).

    Raises:
        ConversionError: The source is not an `AutoencoderKL` that fits `autoencoder`; the message lists the keys.
    """
    return convert_state_dict(
        source,
        diffusers_autoencoder_key_map(autoencoder),
        {key: tensor.shape for key, tensor in autoencoder.state_dict().items()},
        what=f"diffusers AutoencoderKL (for {type(autoencoder).__name__})",
        dtype=dtype,
    )
