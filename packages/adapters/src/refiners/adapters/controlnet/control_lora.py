"""Control-LoRA: a ControlNet stored as low-rank differences from the UNet it controls (Stability AI's control-lora).

A Control-LoRA file (`control-lora-canny-rank128.safetensors`...) holds a ControlNet in the original layout
(`input_blocks.1.0.in_layers.2`, `input_hint_block.0`, `zero_convs.0.0`, `middle_block_out.0`, no `control_model.`
prefix) as Stability's `ControlLoraSave` writes it: each weight of two or more dimensions that the ControlNet shares
with the base UNet's encoder is a pair `{module}.up` `(out, rank[, 1, 1])` and `{module}.down` `(rank, in[, kh, kw])`,
the ControlNet's weight being `W_base + up.flatten(1) @ down.flatten(1)` reshaped (ComfyUI's `ControlLoraOps`); the
other tensors (biases, norms, the condition encoder, the zero convolutions) are stored whole, and an empty
`lora_controlnet` tensor marks the file. What the file leaves out is the base UNet's, as ComfyUI reads it.
`control_lora_state_dict` builds the ControlNet's weights from the UNet and such a file; the families' adapters load it
(`SDXLControlnetAdapter.from_control_lora`).
"""

import re
from collections.abc import Mapping

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.controlnet.model import Controlnet
from refiners.foundationals.latent_diffusion.unet import UNet
from refiners.foundationals.latent_diffusion.unet_names import (
    diffusers_encoder_modules,
    diffusers_unet_modules,
    ldm_unet_renaming,
)

__all__ = [
    "CONTROL_LORA_MARKER",
    "original_controlnet_modules",
    "condition_encoder_sizes",
    "control_lora_state_dict",
]

CONTROL_LORA_MARKER = "lora_controlnet"
"""The key (an empty tensor) that marks a Control-LoRA file."""

_HINT = re.compile(r"input_hint_block\.(\d+)\.weight")


def original_controlnet_modules(controlnet: Controlnet) -> dict[str, tuple[fl.WeightedModule, str | None]]:
    """Every layer with weights of a ControlNet by its original (lllyasviel's `cldm`) path, with the diffusers name of
    the UNet layer it copies (None for the condition encoder and the zero convolutions, which the UNet has not).

    Args:
        controlnet: The ControlNet (its weights are not read: it may live on the "meta" device).
    """
    topology = controlnet.topology
    renaming = ldm_unet_renaming(
        topology.layers_per_block, topology.attention_levels, controlnet.extra_original_modules()
    )
    modules: dict[str, tuple[fl.WeightedModule, str | None]] = {}
    for name, module in diffusers_encoder_modules(controlnet, controlnet.extra_diffusers_modules()):
        original = renaming.to_original(name)
        assert original is not None, f"{name} has no original name"
        modules[original] = (module, name)
    # `input_hint_block` is one Sequential: a SiLU after each convolution but the last.
    for index, conv in enumerate(controlnet.condition_encoder.layers(fl.Conv2d)):
        modules[f"input_hint_block.{2 * index}"] = (conv, None)
    *skips, middle = controlnet.residual_projections.layers(fl.Conv2d)
    for index, conv in enumerate(skips):
        modules[f"zero_convs.{index}.0"] = (conv, None)
    modules["middle_block_out.0"] = (middle, None)
    return modules


def _require_marker(tensors: Mapping[str, Tensor], source: str) -> None:
    if CONTROL_LORA_MARKER not in tensors:
        raise ValueError(
            f"{source} is not a Control-LoRA file: it has no {CONTROL_LORA_MARKER!r} key (a full ControlNet converts "
            "with `refiners-convert controlnet` and loads with the adapter's weights=...)"
        )


def condition_encoder_sizes(
    tensors: Mapping[str, Tensor], source: str = "the Control-LoRA file"
) -> tuple[int, tuple[int, ...]]:
    """The condition image's channels and the `ConditionEncoder`'s stage widths of a Control-LoRA file, read from its
    `input_hint_block` (convolutions at even indices: the first, then two per stage, then the last).

    Args:
        tensors: The file's tensors.
        source: What the tensors are, for the error message (e.g. the file's path).

    Raises:
        ValueError: The file is not a Control-LoRA, or has no complete `input_hint_block`.
    """
    _require_marker(tensors, source)
    indices = sorted(int(match[1]) for key in tensors if (match := _HINT.fullmatch(key)))
    convs = len(indices)
    if convs < 2 or convs % 2 or indices != list(range(0, 2 * convs, 2)):
        raise ValueError(
            f"{source} does not hold a condition encoder: a Control-LoRA file has input_hint_block.{{0, 2, 4, ...}}"
            f".weight (an even number of convolutions), found the indices {indices}"
        )
    channels = tuple(tensors[f"input_hint_block.{4 * stage}.weight"].shape[0] for stage in range(convs // 2))
    return tensors["input_hint_block.0.weight"].shape[1], channels


def _listed(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def control_lora_state_dict(
    controlnet: Controlnet, unet: UNet, tensors: Mapping[str, Tensor], source: str = "the Control-LoRA file"
) -> dict[str, Tensor]:
    """The weights of `controlnet` (its `state_dict` keys) from the base UNet's and a Control-LoRA file's.

    A weight is the file's (else the UNet's) plus, if the file has its `.up` and `.down`, their product; the tensors
    are new ones (not the UNet's), on the UNet's device and of its dtype, the products computed in float32 at least.

    Args:
        controlnet: The ControlNet to load (of the UNet's topology; its weights are not read: it may live on "meta").
        unet: The base UNet the Control-LoRA was trained on.
        tensors: The file's tensors, its `lora_controlnet` marker included.
        source: What the tensors are, for the error message (e.g. the file's path).

    Raises:
        ValueError: The file is not a Control-LoRA, or does not fit: the message lists the unknown keys, the missing
            ones and the shapes that differ.
    """
    _require_marker(tensors, source)
    device, dtype = unet.device, unet.dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)
    base = diffusers_unet_modules(unet)
    paths = {id(module): path for path, module in controlnet.named_modules()}
    used = {CONTROL_LORA_MARKER}
    missing: list[str] = []
    wrong_shapes: list[str] = []
    state: dict[str, Tensor] = {}
    for original, (module, base_name) in original_controlnet_modules(controlnet).items():
        base_module = None if base_name is None else base[base_name]
        for name, parameter in module.named_parameters(recurse=False):
            key = f"{original}.{name}"
            if key in tensors:
                used.add(key)
                value = tensors[key].to(device=device, dtype=compute_dtype)
            elif base_module is not None:
                value = getattr(base_module, name).detach().to(compute_dtype)
            else:
                missing.append(key)
                continue
            up, down = (f"{original}.up", f"{original}.down") if name == "weight" else ("", "")
            if up in tensors or down in tensors:
                if up not in tensors or down not in tensors:
                    used.add(up if up in tensors else down)  # the pair is incomplete: report the half missing
                    missing.append(down if up in tensors else up)
                    continue
                used |= {up, down}
                up_flat, down_flat = (tensors[k].to(device=device, dtype=compute_dtype).flatten(1) for k in (up, down))
                if up_flat.shape[1] != down_flat.shape[0] or up_flat.shape[0] * down_flat.shape[1] != value.numel():
                    wrong_shapes.append(
                        f"{up} {tuple(tensors[up].shape)} @ {down} {tuple(tensors[down].shape)} for a weight "
                        f"{tuple(parameter.shape)}"
                    )
                    continue
                value = value + (up_flat @ down_flat).reshape(value.shape)
            if value.shape != parameter.shape:
                wrong_shapes.append(f"{key} {tuple(value.shape)} for {tuple(parameter.shape)}")
                continue
            state[f"{paths[id(module)]}.{name}"] = value.to(dtype).clone()
    unknown = sorted(key for key in tensors if key not in used)
    if unknown or missing or wrong_shapes:
        problems = [
            f"{len(unknown)} unknown keys: {_listed(unknown)}" if unknown else "",
            f"{len(missing)} missing keys: {_listed(missing)}" if missing else "",
            f"{len(wrong_shapes)} shapes differ: {_listed(wrong_shapes, 5)}" if wrong_shapes else "",
        ]
        raise ValueError(
            f"{source} does not fit this {type(unet).__name__} ({unet.topology}): "
            + "; ".join(problem for problem in problems if problem)
            + ". Is it a Control-LoRA of this base model?"
        )
    return state
