"""`ControlnetAdapter`: run a `Controlnet` beside a UNet and add its residuals to the UNet's skips and middle output.

Injected, it wraps two layers of the UNet: the input convolution of the down blocks, where a `ControlnetBranch` runs
the ControlNet on the latents (and the UNet's side inputs) and keeps its residuals in `CONTROLNET_RESIDUALS_CONTEXT`,
and the first skip concatenation of the up blocks, where a `ControlnetResidualsAddition` adds them to the skip
connections kept by the down blocks and to the middle block's output (diffusers' `down_block_additional_residuals`
and `mid_block_additional_residual`). Several ControlNets stack, each under its name with its own scale, and their
residuals add up (diffusers' `MultiControlNetModel`). Ejected, the UNet is what it was.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Generic, Self, TypeVar

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.controlnet.control_lora import condition_encoder_sizes, control_lora_state_dict
from refiners.adapters.controlnet.model import (
    CONDITION_KEY,
    CONTROLNET_CONTEXT,
    Controlnet,
    SD1Controlnet,
    SDXLControlnet,
)
from refiners.fluxion.context import Contexts, lookup_key
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import (
    load_from_safetensors,
    load_metadata_from_safetensors,
    load_state_dict_from_safetensors,
)
from refiners.foundationals.latent_diffusion.model import DENOISING_CONTEXT, GUIDED_KEY, NUM_STEPS_KEY, STEP_INDEX_KEY
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import SDXLUNet
from refiners.foundationals.latent_diffusion.unet import (
    RESIDUALS_KEY,
    UNET_CONTEXT,
    DownBlocks,
    ResidualConcatenator,
    UNet,
    UpBlocks,
)

__all__ = [
    "CONTROLNET_RESIDUALS_CONTEXT",
    "ControlnetBranch",
    "ControlnetResidualsAddition",
    "ControlnetAdapter",
    "SD1ControlnetAdapter",
    "SDXLControlnetAdapter",
]

CONTROLNET_RESIDUALS_CONTEXT = "controlnet_residuals"
"""`CONTROLNET_RESIDUALS_CONTEXT[name]`: the residuals of the ControlNet `name` in the current forward (None when it
sits out this step)."""

ControlnetT = TypeVar("ControlnetT", bound=Controlnet)
UNetT = TypeVar("UNetT", bound=UNet)


class ControlnetBranch(fl.ContextModule):
    """Run a ControlNet on the latents, keep its scaled residuals in `CONTROLNET_RESIDUALS_CONTEXT[name]`, and pass the
    latents through.

    Args:
        controlnet: The ControlNet (a model of its own: its side inputs are copied from the UNet's contexts).
        name: The ControlNet's name in the UNet.
        scale: The residuals' scale (diffusers' `controlnet_conditioning_scale`).
        guidance_start: The fraction of the run's steps before which it sits out (`control_guidance_start`).
        guidance_end: The fraction of the run's steps after which it sits out (`control_guidance_end`).
        guess_mode: diffusers' `guess_mode`: residuals scaled from 0.1 (first skip) to 1 (middle) on a log scale, and
            under classifier-free guidance run on the positive half only, zeros for the negative half.
    """

    def __init__(
        self,
        controlnet: Controlnet,
        name: str,
        scale: float = 1.0,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        guess_mode: bool = False,
    ) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.name = name
        self.scale = scale
        self.guidance_start = guidance_start
        self.guidance_end = guidance_end
        self.guess_mode = guess_mode

    def _active(self) -> bool:
        denoising = self.use_context(DENOISING_CONTEXT)
        step, num_steps = denoising.get(STEP_INDEX_KEY), denoising.get(NUM_STEPS_KEY)
        if step is None or num_steps is None:
            return True  # called outside a denoising loop: every call is a step it acts on
        # diffusers' `controlnet_keep`: off where i / n < start or (i + 1) / n > end.
        return not (step / num_steps < self.guidance_start or (step + 1) / num_steps > self.guidance_end)

    def forward(self, x: Tensor) -> Tensor:
        condition: Tensor | None = self.use_context(CONTROLNET_CONTEXT).get(self.name)
        if condition is None:
            raise ValueError(
                f"the ControlNet {self.name!r} has no condition image: call its adapter's "
                "`set_controlnet_condition(image_tensor)` before the forward"
            )
        factor = 8 * x.shape[-2], 8 * x.shape[-1]
        if tuple(condition.shape[-2:]) != factor:
            raise ValueError(
                f"the condition image of the ControlNet {self.name!r} is {condition.shape[-2]}x{condition.shape[-1]} "
                f"(height x width) but the latents {tuple(x.shape[-2:])} are of a {factor[0]}x{factor[1]} image: "
                f"resize the condition image to {factor[0]}x{factor[1]}"
            )
        if not self._active():
            self.set_context(CONTROLNET_RESIDUALS_CONTEXT, {self.name: None})
            return x
        guided = bool(self.use_context(DENOISING_CONTEXT).get(GUIDED_KEY, False))
        split = self.guess_mode and guided
        batch = x.shape[0]
        rows = batch // 2 if split else batch
        for context, key in self.controlnet.side_inputs:
            value = lookup_key(self.use_context(context), context, key)
            if split and isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
                value = value[rows:]  # the positive half only
            self.controlnet.set_context(context, {key: value})
        if batch % condition.shape[0] != 0 and condition.shape[0] != rows:
            raise ValueError(
                f"the ControlNet {self.name!r} has {condition.shape[0]} condition images for {rows} latents: give one, "
                "or one per latent"
            )
        condition = condition.repeat(rows // condition.shape[0], 1, 1, 1) if condition.shape[0] != rows else condition
        self.controlnet.set_context(CONTROLNET_CONTEXT, {CONDITION_KEY: condition})
        residuals: tuple[Tensor, ...] = self.controlnet(x[batch - rows :])
        if self.guess_mode:
            scales = torch.logspace(-1, 0, len(residuals), device=x.device) * self.scale
            residuals = tuple(residual * scale for residual, scale in zip(residuals, scales, strict=True))
        else:
            residuals = tuple(residual * self.scale for residual in residuals)
        if split:
            residuals = tuple(torch.cat([torch.zeros_like(residual), residual]) for residual in residuals)
        self.set_context(CONTROLNET_RESIDUALS_CONTEXT, {self.name: residuals})
        return x


class ControlnetResidualsAddition(fl.ContextModule):
    """Add the residuals of the ControlNet `name` to the UNet's skip connections and to the input (the middle block's
    output).

    Args:
        name: The ControlNet's name in the UNet.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        residuals: tuple[Tensor, ...] | None = self.use_context(CONTROLNET_RESIDUALS_CONTEXT).get(self.name)
        if residuals is None:
            return x
        *controls, middle = residuals
        unet = self.use_context(UNET_CONTEXT)
        skips: list[Tensor] = lookup_key(unet, UNET_CONTEXT, RESIDUALS_KEY)
        unet[RESIDUALS_KEY] = [skip + control for skip, control in zip(skips, controls, strict=True)]
        return x + middle


class _ResidualsAdapter(fl.Chain, fl.Adapter[ResidualConcatenator]):
    """Where the residuals are added: before the first skip concatenation of the up blocks."""

    def __init__(self, target: ResidualConcatenator, name: str) -> None:
        with self.setup_adapter(target):
            super().__init__(ControlnetResidualsAddition(name), target)


class ControlnetAdapter(fl.Chain, fl.Adapter[fl.Conv2d], Generic[UNetT, ControlnetT]):
    """A ControlNet for a UNet: `inject()` it, set its condition image, generate; `eject()` it.

    Args:
        target: The UNet.
        controlnet: The ControlNet, of the UNet's topology.
        name: Its name (several ControlNets in one UNet have distinct names).
        scale: The residuals' scale (diffusers' `controlnet_conditioning_scale`).
        guidance_start: diffusers' `control_guidance_start`: the fraction of the steps before which it sits out.
        guidance_end: diffusers' `control_guidance_end`: the fraction of the steps after which it sits out.
        guess_mode: diffusers' `guess_mode` (see `ControlnetBranch`).
    """

    def __init__(
        self,
        target: UNetT,
        controlnet: ControlnetT,
        name: str = "controlnet",
        scale: float = 1.0,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        guess_mode: bool = False,
    ) -> None:
        if controlnet.topology != target.topology or controlnet.in_channels != target.in_channels:
            raise ValueError(
                f"the ControlNet {name!r} ({type(controlnet).__name__}, {controlnet.topology}, in_channels="
                f"{controlnet.in_channels}) does not fit the {type(target).__name__} ({target.topology}, in_channels="
                f"{target.in_channels}): it was trained for another UNet"
            )
        if not 0.0 <= guidance_start < guidance_end <= 1.0:
            raise ValueError(
                f"the step range must be 0 <= guidance_start < guidance_end <= 1, got {guidance_start}, {guidance_end}"
            )
        self.name = name
        self.unet = [target]  # a list: not a child
        conv_in = target.ensure_find(DownBlocks).layer(0, fl.Chain).ensure_find(fl.Conv2d)
        concatenator = target.ensure_find(UpBlocks).layer(0, fl.Chain).ensure_find(ResidualConcatenator)
        self._residuals_adapter = [_ResidualsAdapter(concatenator, name)]
        with self.setup_adapter(conv_in):
            super().__init__(
                ControlnetBranch(controlnet, name, scale, guidance_start, guidance_end, guess_mode), conv_in
            )

    def init_context(self) -> Contexts:
        return {
            CONTROLNET_CONTEXT: {},
            CONTROLNET_RESIDUALS_CONTEXT: {},
            DENOISING_CONTEXT: {STEP_INDEX_KEY: None, NUM_STEPS_KEY: None, GUIDED_KEY: False},
        }

    @property
    def branch(self) -> ControlnetBranch:
        """The layer that runs the ControlNet (its scale, step range and guess mode are attributes of it)."""
        return self.layer("ControlnetBranch", ControlnetBranch)

    @property
    def controlnet(self) -> Controlnet:
        """The ControlNet."""
        return self.branch.controlnet

    @property
    def scale(self) -> float:
        """The residuals' scale."""
        return self.branch.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.branch.scale = value

    def inject(self, parent: fl.Chain | None = None) -> Self:
        unet = self.unet[0]
        if any(branch.name == self.name for branch in unet.layers(ControlnetBranch)):
            raise ValueError(
                f"a ControlNet named {self.name!r} is already injected in this {type(unet).__name__}: give each "
                "ControlNet its own name"
            )
        super().inject(parent)
        self._residuals_adapter[0].inject()
        return self

    def eject(self) -> None:
        # The UNet keeps no tensor of it: neither the condition image nor the last residuals.
        self.set_context(CONTROLNET_CONTEXT, {self.name: None})
        self.set_context(CONTROLNET_RESIDUALS_CONTEXT, {self.name: None})
        self._residuals_adapter[0].eject()
        super().eject()

    def set_controlnet_condition(self, condition: Tensor) -> None:
        """Set the condition image: `(batch, 3, height, width)` in [0, 1], as big as the image generated (diffusers'
        control image), one for all latents or one per latent.

        Args:
            condition: The condition image (e.g. `image_to_tensor(canny_edges)`).
        """
        if (
            condition.dim() != 4
            or condition.shape[1] != self.controlnet.condition_encoder.layer(0, fl.Conv2d).in_channels
        ):
            raise ValueError(
                f"the condition image must be (batch, 3, height, width) in [0, 1], got shape {tuple(condition.shape)}"
            )
        self.set_context(CONTROLNET_CONTEXT, {self.name: condition})


def _given(
    weights: Path | str | None, controlnet: ControlnetT | None, classes: tuple[type[ControlnetT], ...], unet: UNet
) -> ControlnetT:
    """The ControlNet given, or built from the record in its converted file (`refiners-convert controlnet`), loaded."""
    if (weights is None) == (controlnet is None):
        raise ValueError("give the ControlNet's converted file (weights=...) or the ControlNet (controlnet=...)")
    if controlnet is not None:
        return controlnet
    assert weights is not None
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(weights))
    if config is None:
        raise ValueError(
            f"{weights} does not record its model: convert the ControlNet with `refiners-convert controlnet --from "
            "SOURCE --to FILE`"
        )
    loaded = config.build(classes, device="meta")
    load_state_dict_from_safetensors(loaded, weights)
    return loaded.to(device=unet.device, dtype=unet.dtype)


class SD1ControlnetAdapter(ControlnetAdapter[SD1UNet, SD1Controlnet]):
    """A ControlNet for `SD1UNet`, from a file converted by `refiners-convert controlnet` or a built `SD1Controlnet`.

    Args:
        target: The UNet.
        name: The ControlNet's name in the UNet.
        scale: The residuals' scale (diffusers' `controlnet_conditioning_scale`).
        weights: The converted file (the ControlNet is built from the record it holds).
        controlnet: The ControlNet, in place of `weights`.
        guidance_start: diffusers' `control_guidance_start`.
        guidance_end: diffusers' `control_guidance_end`.
        guess_mode: diffusers' `guess_mode`.
    """

    def __init__(
        self,
        target: SD1UNet,
        name: str = "controlnet",
        scale: float = 1.0,
        weights: Path | str | None = None,
        *,
        controlnet: SD1Controlnet | None = None,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        guess_mode: bool = False,
    ) -> None:
        controlnet = _given(weights, controlnet, (SD1Controlnet,), target)
        super().__init__(target, controlnet, name, scale, guidance_start, guidance_end, guess_mode)


class SDXLControlnetAdapter(ControlnetAdapter[SDXLUNet, SDXLControlnet]):
    """A ControlNet for `SDXLUNet`, from a file converted by `refiners-convert controlnet` or a built `SDXLControlnet`.

    Args:
        target: The UNet.
        name: The ControlNet's name in the UNet.
        scale: The residuals' scale (diffusers' `controlnet_conditioning_scale`).
        weights: The converted file (the ControlNet is built from the record it holds).
        controlnet: The ControlNet, in place of `weights`.
        guidance_start: diffusers' `control_guidance_start`.
        guidance_end: diffusers' `control_guidance_end`.
        guess_mode: diffusers' `guess_mode`.
    """

    def __init__(
        self,
        target: SDXLUNet,
        name: str = "controlnet",
        scale: float = 1.0,
        weights: Path | str | None = None,
        *,
        controlnet: SDXLControlnet | None = None,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        guess_mode: bool = False,
    ) -> None:
        controlnet = _given(weights, controlnet, (SDXLControlnet,), target)
        super().__init__(target, controlnet, name, scale, guidance_start, guidance_end, guess_mode)

    @classmethod
    def from_control_lora(
        cls,
        target: SDXLUNet,
        weights: Path | str | Mapping[str, Tensor],
        name: str = "controlnet",
        scale: float = 1.0,
        *,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        guess_mode: bool = False,
    ) -> "SDXLControlnetAdapter":
        """A ControlNet from a Control-LoRA file (Stability AI's `control-lora-canny-rank128.safetensors`...): its
        encoder is the UNet's, plus the file's low-rank differences (see `refiners.adapters.controlnet.control_lora`).

        Args:
            target: The SDXL UNet the Control-LoRA was trained on (its weights are the ControlNet's base).
            weights: The Control-LoRA file, or its tensors.
            name: The ControlNet's name in the UNet.
            scale: The residuals' scale (ComfyUI's strength, diffusers' `controlnet_conditioning_scale`).
            guidance_start: diffusers' `control_guidance_start`.
            guidance_end: diffusers' `control_guidance_end`.
            guess_mode: diffusers' `guess_mode`.

        Raises:
            ValueError: The target is not an SDXL UNet, or the file is not a Control-LoRA of it (the message lists
                its unknown and missing keys).
        """
        if not isinstance(target, SDXLUNet):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(
                f"SDXLControlnetAdapter.from_control_lora loads SDXL Control-LoRAs, got a {type(target).__name__}: "
                "load the file on an SDXL model's UNet (e.g. StableDiffusion_XL's sdxl.unet)"
            )
        source = "the Control-LoRA tensors" if isinstance(weights, Mapping) else str(weights)
        tensors = weights if isinstance(weights, Mapping) else load_from_safetensors(weights, device=target.device)
        controlnet = SDXLControlnet.from_unet(target, *condition_encoder_sizes(tensors, source), device="meta")
        state = control_lora_state_dict(controlnet, target, tensors, source)
        controlnet.load_state_dict(state, strict=True, assign=True)
        return cls(
            target,
            name,
            scale,
            controlnet=controlnet,
            guidance_start=guidance_start,
            guidance_end=guidance_end,
            guess_mode=guess_mode,
        )
