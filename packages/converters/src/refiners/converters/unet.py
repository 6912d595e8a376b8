"""diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x) to `SD1UNet` weights.

The key map is derived from the UNet's structure: its blocks are walked in order and numbered as diffusers numbers
them (`down_blocks.{i}.resnets.{j}`, `up_blocks.{i}.attentions.{j}`, ...), and inside each block every diffusers
module is matched with the refiners layer that plays its role, found by type in order. It holds for every width
(`SD1UNet(channels=...)`) and for both the text-to-image and the inpainting UNets.
"""

from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.foundationals.latent_diffusion.cross_attention import CrossAttentionBlock2d
from refiners.foundationals.latent_diffusion.range_adapter import RangeEncoder
from refiners.foundationals.latent_diffusion.unet import (
    DownBlocks,
    MiddleBlock,
    OutputBlock,
    ResidualBlock,
    SD1UNet,
    UpBlocks,
)

__all__ = ["diffusers_unet_key_map", "convert_diffusers_unet"]

T = TypeVar("T", bound=fl.Module)

_RESNET = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
_TRANSFORMER_BLOCK = "transformer_blocks.0"
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _path(root: fl.Chain, module: fl.Module) -> str:
    """The state-dict prefix of `module` in `root` (e.g. `DownBlocks.Chain_2.ResidualBlock.Conv2d`)."""
    parts: list[str] = []
    while module is not root:
        parent = module.parent
        if parent is None:
            raise ValueError(f"{type(module).__name__} is not inside {type(root).__name__}")
        parts.append(parent.key_of(module))
        module = parent
    return ".".join(reversed(parts))


def _add(key_map: KeyMap, root: fl.Chain, pairs: Iterable[tuple[str, fl.Module]]) -> None:
    """Map each source module's tensors (`{source}.weight`, `{source}.bias`) to the same tensors of its layer."""
    for source, module in pairs:
        target = _path(root, module)
        for name, _ in module.named_parameters(recurse=False):
            key_map.add(f"{source}.{name}", f"{target}.{name}")


def _the(modules: Iterable[T], what: str, count: int) -> list[T]:
    found = list(modules)
    if len(found) != count:
        raise ValueError(f"expected {count} {what}, found {len(found)}: is this an SD1UNet?")
    return found


def _resnet(prefix: str, block: ResidualBlock) -> list[tuple[str, fl.Module]]:
    # In the order diffusers applies them: norm1, conv1 (+ time_emb_proj), norm2, conv2, and the 1x1 shortcut.
    norm1, norm2 = _the(block.layers(fl.GroupNorm), "GroupNorms per ResidualBlock", 2)
    convs = list(block.layers(fl.Conv2d))
    if len(convs) not in (2, 3):
        raise ValueError(f"expected 2 or 3 Conv2ds per ResidualBlock, found {len(convs)}: is this an SD1UNet?")
    conv1, conv2, *shortcut = convs
    (time_emb_proj,) = _the(block.layers(fl.Linear), "Linear per ResidualBlock (timestep projection)", 1)
    modules = (norm1, conv1, time_emb_proj, norm2, conv2, *shortcut)
    return [(f"{prefix}.{name}", module) for name, module in zip(_RESNET, modules, strict=False)]


def _transformer(prefix: str, block: CrossAttentionBlock2d) -> list[tuple[str, fl.Module]]:
    (norm,) = _the(block.layers(fl.GroupNorm), "GroupNorm per CrossAttentionBlock2d", 1)
    proj_in, proj_out = _the(block.layers(fl.Conv2d), "Conv2ds per CrossAttentionBlock2d", 2)
    norm1, norm2, norm3 = _the(block.layers(fl.LayerNorm), "LayerNorms per CrossAttentionBlock2d", 3)
    linears = _the(block.layers(fl.Linear), "Linears per CrossAttentionBlock2d", 10)
    attn1, attn2, (ff_in, ff_out) = linears[0:4], linears[4:8], linears[8:10]
    t = f"{prefix}.{_TRANSFORMER_BLOCK}"
    return [
        (f"{prefix}.norm", norm),
        (f"{prefix}.proj_in", proj_in),
        (f"{t}.norm1", norm1),
        *((f"{t}.attn1.{name}", module) for name, module in zip(_ATTENTION, attn1, strict=True)),
        (f"{t}.norm2", norm2),
        *((f"{t}.attn2.{name}", module) for name, module in zip(_ATTENTION, attn2, strict=True)),
        (f"{t}.norm3", norm3),
        (f"{t}.ff.net.0.proj", ff_in),
        (f"{t}.ff.net.2", ff_out),
        (f"{prefix}.proj_out", proj_out),
    ]


def _level_blocks(prefix: str, blocks: Iterable[fl.Chain]) -> list[tuple[str, fl.Module]]:
    """The down or up blocks: one diffusers block per resolution, closed by its down- or upsampler (if any)."""
    pairs: list[tuple[str, fl.Module]] = []
    level, index = 0, 0
    for block in blocks:
        for layer in block:
            if isinstance(layer, ResidualBlock):
                pairs += _resnet(f"{prefix}.{level}.resnets.{index}", layer)
            elif isinstance(layer, CrossAttentionBlock2d):
                pairs += _transformer(f"{prefix}.{level}.attentions.{index}", layer)
            elif isinstance(layer, fl.Downsample | fl.Upsample):
                (conv,) = _the(layer.layers(fl.Conv2d), f"Conv2d per {type(layer).__name__}", 1)
                kind = "downsamplers" if isinstance(layer, fl.Downsample) else "upsamplers"
                pairs.append((f"{prefix}.{level}.{kind}.0.conv", conv))
        if any(isinstance(layer, fl.Downsample | fl.Upsample) for layer in block):
            level, index = level + 1, 0
        elif block.find(ResidualBlock) is not None:
            index += 1
    return pairs


def diffusers_unet_key_map(unet: SD1UNet) -> KeyMap:
    """The key map from a diffusers `UNet2DConditionModel` state dict (SD1.x layout) to `unet`'s.

    Args:
        unet: The target UNet (its weights are not read: it may live on the "meta" device).
    """
    key_map = KeyMap()
    range_encoder = unet.ensure_find(RangeEncoder)
    linear_1, linear_2 = _the(range_encoder.layers(fl.Linear), "Linears in the RangeEncoder", 2)
    _add(key_map, unet, [("time_embedding.linear_1", linear_1), ("time_embedding.linear_2", linear_2)])

    down_blocks = unet.layer("DownBlocks", DownBlocks)
    conv_in_block, *down = list(down_blocks.layers(fl.Chain))
    (conv_in,) = _the(conv_in_block.layers(fl.Conv2d), "Conv2d in the first down block", 1)
    _add(key_map, unet, [("conv_in", conv_in)])
    _add(key_map, unet, _level_blocks("down_blocks", down))

    middle = unet.layer("MiddleBlock", MiddleBlock)
    resnet_0, resnet_1 = _the(middle.layers(ResidualBlock), "ResidualBlocks in the MiddleBlock", 2)
    (attention,) = _the(middle.layers(CrossAttentionBlock2d), "CrossAttentionBlock2d in the MiddleBlock", 1)
    _add(key_map, unet, _resnet("mid_block.resnets.0", resnet_0))
    _add(key_map, unet, _transformer("mid_block.attentions.0", attention))
    _add(key_map, unet, _resnet("mid_block.resnets.1", resnet_1))

    _add(key_map, unet, _level_blocks("up_blocks", unet.layer("UpBlocks", UpBlocks).layers(fl.Chain)))

    output = unet.layer("OutputBlock", OutputBlock)
    _add(key_map, unet, [("conv_norm_out", output.layer("GroupNorm", fl.GroupNorm))])
    _add(key_map, unet, [("conv_out", output.layer("Conv2d", fl.Conv2d))])
    return key_map


def convert_diffusers_unet(
    source: Mapping[str, Tensor], unet: SD1UNet, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Convert a diffusers `UNet2DConditionModel` state dict into `unet`'s (see `diffusers_unet_key_map`).

    Args:
        source: The source tensors, e.g. `load_from_safetensors("unet/diffusion_pytorch_model.safetensors")`.
        unet: The target UNet (only its state-dict shapes are read: it may live on the "meta" device).
        dtype: Cast floating-point tensors to this dtype (default: keep the source's).

    Raises:
        ConversionError: The source is not a UNet that fits `unet` (e.g. an inpainting UNet, with 9 input
            channels, converted for a text-to-image `SD1UNet`); the message lists the keys and shapes.
    """
    conv_in = source.get("conv_in.weight")
    if conv_in is not None and conv_in.dim() == 4 and conv_in.shape[1] != unet.in_channels:
        hint = " (an inpainting UNet)" if conv_in.shape[1] == 9 else ""
        raise ConversionError(
            f"the diffusers UNet takes {conv_in.shape[1]} input channels{hint} but the target SD1UNet takes "
            f"{unet.in_channels}: conv_in.weight {tuple(conv_in.shape)} does not fit. Build the target with "
            f"SD1UNet(in_channels={conv_in.shape[1]})."
        )
    return convert_state_dict(
        source,
        diffusers_unet_key_map(unet),
        {key: tensor.shape for key, tensor in unet.state_dict().items()},
        what="diffusers UNet (for SD1UNet)",
        dtype=dtype,
    )
