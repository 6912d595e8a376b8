"""diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x, SDXL) to `SD1UNet` / `SDXLUNet` weights.

The key map is derived from the UNet's structure: `diffusers_unet_modules` (in `refiners.foundationals`, where the
LoRA loaders read it too) walks the UNet's blocks in order, numbers them as diffusers numbers them
(`down_blocks.{i}.resnets.{j}`, `up_blocks.{i}.attentions.{j}`, ...) and pairs every diffusers module with the
refiners layer that plays its role; each module's tensors map to that layer's. It holds for every width
(`SD1UNet(channels=...)`), for every topology (SD1, SDXL and its refiner) and for both the text-to-image and the
inpainting UNets.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.foundationals.latent_diffusion.unet import UNet
from refiners.foundationals.latent_diffusion.unet_names import diffusers_unet_modules

__all__ = ["diffusers_unet_key_map", "convert_diffusers_unet", "module_key_map"]


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


def diffusers_unet_key_map(unet: UNet) -> KeyMap:
    """The key map from a diffusers `UNet2DConditionModel` state dict to `unet`'s.

    Args:
        unet: The target UNet (its weights are not read: it may live on the "meta" device).
    """
    return module_key_map(unet, diffusers_unet_modules(unet))


def module_key_map(root: fl.Chain, modules: Mapping[str, fl.WeightedModule]) -> KeyMap:
    """The key map from a source whose modules are named `modules`' keys to `root`'s state dict: each module's
    parameters map to those of the layer of `root` it names.

    Args:
        root: The target model.
        modules: Source module names and the layers of `root` that play their roles.
    """
    key_map = KeyMap()
    for source, module in modules.items():
        target = _path(root, module)
        for name, _ in module.named_parameters(recurse=False):
            key_map.add(f"{source}.{name}", f"{target}.{name}")
    return key_map


def convert_diffusers_unet(
    source: Mapping[str, Tensor], unet: UNet, dtype: torch.dtype | None = None
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
            f"the diffusers UNet takes {conv_in.shape[1]} input channels{hint} but the target {type(unet).__name__} "
            f"takes {unet.in_channels}: conv_in.weight {tuple(conv_in.shape)} does not fit. Build the target with "
            f"{type(unet).__name__}(in_channels={conv_in.shape[1]})."
        )
    return convert_state_dict(
        source,
        diffusers_unet_key_map(unet),
        {key: tensor.shape for key, tensor in unet.state_dict().items()},
        what=f"diffusers UNet (for {type(unet).__name__})",
        dtype=dtype,
    )
