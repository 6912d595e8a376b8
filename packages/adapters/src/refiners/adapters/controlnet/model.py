"""The ControlNet itself: a copy of a UNet's encoder half that turns a condition image into residuals for its skips.

`Controlnet` is laid out by the target UNet's `UNetTopology`, with the UNet's own blocks (`TimestepEncoder`,
`DownBlocks`, `MiddleBlock`): a `ConditionEncoder` (diffusers' `controlnet_cond_embedding`, the original
`input_hint_block`) embeds the condition image and adds it after the input convolution, each down block keeps its
output as the UNet keeps its skip connections, and `ResidualProjections` (the "zero convolutions") project each of
them, and the middle block's output, into what is added to the UNet's. It is a model of its own (a root Chain with its
own contexts): `ControlnetAdapter` runs it beside the UNet. The families fix its sizes (`SD1Controlnet`,
`SDXLControlnet`), as they fix their UNets'.
"""

from collections.abc import Sequence
from itertools import pairwise
from typing import Any, ClassVar

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts, lookup_key
from refiners.foundationals.latent_diffusion.cross_attention import CROSS_ATTENTION_CONTEXT
from refiners.foundationals.latent_diffusion.range_adapter import (
    RANGE_ADAPTER_CONTEXT,
    TIMESTEP_CONTEXT,
    TIMESTEP_EMBEDDING_KEY,
    TIMESTEP_KEY,
    RangeAdapter2d,
    TimestepEncoder,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import (
    POOLED_TEXT_EMBEDDING_KEY,
    TEXT_TIME_CONTEXT,
    TIME_IDS_KEY,
    SDXLUNet,
    TextTimeEmbedding,
)
from refiners.foundationals.latent_diffusion.unet import (
    CLIP_TEXT_EMBEDDING_KEY,
    RESIDUALS_KEY,
    UNET_CONTEXT,
    DownBlocks,
    MiddleBlock,
    ResidualAccumulator,
    ResidualBlock,
    UNetTopology,
)

__all__ = [
    "CONTROLNET_CONTEXT",
    "CONDITION_KEY",
    "ConditionEncoder",
    "ResidualProjections",
    "Controlnet",
    "SD1Controlnet",
    "SDXLControlnet",
]

CONTROLNET_CONTEXT = "controlnet"
CONDITION_KEY = "condition"
"""`CONTROLNET_CONTEXT[CONDITION_KEY]`: the condition image of a `Controlnet`'s next forward, `(batch, 3, H, W)`."""

Device = torch.device | str | None
SideInput = tuple[str, str]


class ConditionEncoder(fl.Chain):
    """The condition image to the UNet's first width at the latents' size: 3x3 convolutions with SiLUs between them,
    every other one of stride 2 (diffusers' `ControlNetConditioningEmbedding`, the original `input_hint_block`).

    Args:
        out_channels: The UNet's first width.
        in_channels: Channels of the condition image.
        channels: The widths of its stages (diffusers' `conditioning_embedding_out_channels`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        out_channels: int,
        in_channels: int = 3,
        channels: Sequence[int] = (16, 32, 96, 256),
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        layers: list[fl.Module] = [
            fl.Conv2d(in_channels, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype),
            fl.SiLU(),
        ]
        for width, next_width in pairwise(channels):
            layers += [
                fl.Conv2d(width, width, kernel_size=3, padding=1, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(width, next_width, kernel_size=3, padding=1, stride=2, device=device, dtype=dtype),
                fl.SiLU(),
            ]
        layers.append(fl.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1, device=device, dtype=dtype))
        super().__init__(layers)


class ResidualProjections(fl.Chain):
    """The 1x1 "zero convolutions": one per skip connection, then one for the middle block's output.

    Reads the skips from `UNET_CONTEXT[RESIDUALS_KEY]` (kept by the down blocks) and takes the middle block's output
    as its input; returns the projected skips followed by the projected middle output.

    Args:
        skip_channels: The width of each skip connection (`UNetTopology.skip_channels`).
        middle_channels: The middle block's width.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        skip_channels: Sequence[int],
        middle_channels: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            *(fl.Conv2d(width, width, kernel_size=1, device=device, dtype=dtype) for width in skip_channels),
            fl.Conv2d(middle_channels, middle_channels, kernel_size=1, device=device, dtype=dtype),
        )

    def forward(self, *args: Any) -> tuple[Tensor, ...]:
        (middle,) = args
        skips: list[Tensor] = lookup_key(self.use_context(UNET_CONTEXT), UNET_CONTEXT, RESIDUALS_KEY)
        *skip_projections, middle_projection = self.layers(fl.Conv2d)
        return (
            *(projection(skip) for projection, skip in zip(skip_projections, skips, strict=True)),
            middle_projection(middle),
        )


class Controlnet(fl.Chain):
    """A ControlNet laid out by a UNet's topology: `(batch, in_channels, h, w)` latents to the residuals of its skip
    connections and of its middle block's output (a tuple, middle last).

    Set its side inputs as the UNet's (`side_inputs` names them) and the condition image in
    `CONTROLNET_CONTEXT[CONDITION_KEY]`; `ControlnetAdapter` does it. The families subclass it with their sizes.

    Args:
        topology: The shape of the UNet it controls.
        in_channels: Channels of the latents.
        condition_channels: Channels of the condition image.
        condition_encoder_channels: Widths of the `ConditionEncoder`'s stages.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    side_inputs: ClassVar[tuple[SideInput, ...]] = (
        (TIMESTEP_CONTEXT, TIMESTEP_KEY),
        (CROSS_ATTENTION_CONTEXT, CLIP_TEXT_EMBEDDING_KEY),
    )
    """The `(context, key)` of the UNet's side inputs it reads too."""

    def __init__(
        self,
        topology: UNetTopology,
        in_channels: int = 4,
        condition_channels: int = 3,
        condition_encoder_channels: Sequence[int] = (16, 32, 96, 256),
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.topology = topology
        self.in_channels = in_channels
        first = topology.channels[0]
        self._num_skips = len(topology.skip_channels)
        super().__init__(
            TimestepEncoder(first, 4 * first, device=device, dtype=dtype),
            DownBlocks(in_channels, topology, device=device, dtype=dtype),
            MiddleBlock(topology, device=device, dtype=dtype),
            ResidualProjections(topology.skip_channels, topology.channels[-1], device=device, dtype=dtype),
        )
        for residual_block in self.layers(ResidualBlock):
            chain = residual_block.layer("Chain", fl.Chain)
            RangeAdapter2d(
                target=chain.layer("Conv2d_1", fl.Conv2d),
                channels=residual_block.out_channels,
                embedding_dim=4 * first,
                device=device,
                dtype=dtype,
            ).inject(chain)
        down_blocks = self.layer("DownBlocks", DownBlocks)
        for n, block in enumerate(down_blocks.layers(fl.Chain)):
            block.append(ResidualAccumulator(n))
        down_blocks.layer(0, fl.Chain).insert(
            1,
            fl.Sum(
                fl.Identity(),
                fl.Chain(
                    fl.UseContext(CONTROLNET_CONTEXT, CONDITION_KEY),
                    fl.Converter(),
                    ConditionEncoder(first, condition_channels, condition_encoder_channels, device=device, dtype=dtype),
                ),
            ),
        )

    def init_context(self) -> Contexts:
        return {
            UNET_CONTEXT: {RESIDUALS_KEY: [None] * self._num_skips},
            TIMESTEP_CONTEXT: {},
            RANGE_ADAPTER_CONTEXT: {TIMESTEP_EMBEDDING_KEY: None},
            CROSS_ATTENTION_CONTEXT: {},
            CONTROLNET_CONTEXT: {},
        }

    @property
    def condition_encoder(self) -> ConditionEncoder:
        """The encoder of the condition image."""
        return self.ensure_find(ConditionEncoder)

    @property
    def residual_projections(self) -> ResidualProjections:
        """The zero convolutions."""
        return self.layer("ResidualProjections", ResidualProjections)

    def extra_diffusers_modules(self) -> list[tuple[str, fl.WeightedModule]]:
        """The layers outside the UNet's common blocks, by their diffusers names (SDXL's text-time embedding)."""
        return []

    def extra_original_modules(self) -> list[tuple[str, str]]:
        """The `(original, diffusers)` paths of the modules outside the UNet's common blocks."""
        return []


class SD1Controlnet(Controlnet):
    """The ControlNet of a Stable Diffusion 1.x UNet (`SD1UNet`'s sizes; lllyasviel's `control_v11*_sd15_*`).

    Args:
        in_channels: Channels of the latents.
        channels: The UNet's four widths.
        context_embedding_dim: Size of the text embedding.
        num_attention_heads: Heads of the transformers.
        condition_channels: Channels of the condition image.
        condition_encoder_channels: Widths of the `ConditionEncoder`'s stages.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int = 4,
        *,
        channels: tuple[int, int, int, int] = (320, 640, 1280, 1280),
        context_embedding_dim: int = 768,
        num_attention_heads: int = 8,
        condition_channels: int = 3,
        condition_encoder_channels: tuple[int, ...] = (16, 32, 96, 256),
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        topology = UNetTopology(
            channels=tuple(channels),
            attention_levels=(True, True, True, False),
            transformer_depths=(1, 1, 1, 1),
            num_attention_heads=(num_attention_heads,) * 4,
            context_embedding_dim=context_embedding_dim,
        )
        super().__init__(
            topology, in_channels, condition_channels, condition_encoder_channels, device=device, dtype=dtype
        )


class SDXLControlnet(Controlnet):
    """The ControlNet of a Stable Diffusion XL UNet (`SDXLUNet`'s sizes), with its own text-time embedding.

    Args:
        in_channels: Channels of the latents.
        channels: The widths of the resolutions.
        attention_levels: Which resolutions have transformers.
        transformer_depths: Transformer layers per block, per resolution.
        num_attention_heads: Heads per resolution.
        context_embedding_dim: Size of the text embedding.
        pooled_embedding_dim: Size of the pooled text embedding.
        num_time_ids: Number of time ids.
        time_embedding_dim: Sinusoidal features per time id.
        layers_per_block: Residual blocks per down block.
        condition_channels: Channels of the condition image.
        condition_encoder_channels: Widths of the `ConditionEncoder`'s stages.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    side_inputs: ClassVar[tuple[SideInput, ...]] = (
        *Controlnet.side_inputs,
        (TEXT_TIME_CONTEXT, POOLED_TEXT_EMBEDDING_KEY),
        (TEXT_TIME_CONTEXT, TIME_IDS_KEY),
    )

    def __init__(
        self,
        in_channels: int = 4,
        *,
        channels: tuple[int, ...] = (320, 640, 1280),
        attention_levels: tuple[bool, ...] = (False, True, True),
        transformer_depths: tuple[int, ...] = (1, 2, 10),
        num_attention_heads: tuple[int, ...] = (5, 10, 20),
        context_embedding_dim: int = 2048,
        pooled_embedding_dim: int = 1280,
        num_time_ids: int = 6,
        time_embedding_dim: int = 256,
        layers_per_block: int = 2,
        condition_channels: int = 3,
        condition_encoder_channels: tuple[int, ...] = (16, 32, 96, 256),
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        topology = UNetTopology(
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            transformer_depths=tuple(transformer_depths),
            num_attention_heads=tuple(num_attention_heads),
            context_embedding_dim=context_embedding_dim,
            layers_per_block=layers_per_block,
            use_linear_projection=True,
        )
        super().__init__(
            topology, in_channels, condition_channels, condition_encoder_channels, device=device, dtype=dtype
        )
        self.insert(
            1,
            TextTimeEmbedding(
                pooled_embedding_dim,
                num_time_ids,
                time_embedding_dim,
                embedding_dim=4 * channels[0],
                device=device,
                dtype=dtype,
            ),
        )

    @classmethod
    def from_unet(
        cls,
        unet: SDXLUNet,
        condition_channels: int = 3,
        condition_encoder_channels: tuple[int, ...] = (16, 32, 96, 256),
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> "SDXLControlnet":
        """A ControlNet of `unet`'s sizes (diffusers' `ControlNetModel.from_unet`), its weights not copied.

        Args:
            unet: The UNet it will control.
            condition_channels: Channels of the condition image.
            condition_encoder_channels: Widths of the `ConditionEncoder`'s stages.
            device: Where the weights live (`"meta"` builds it without allocating them).
            dtype: The weights' dtype.
        """
        return cls(
            unet.in_channels,
            channels=unet.channels,
            attention_levels=unet.attention_levels,
            transformer_depths=unet.transformer_depths,
            num_attention_heads=unet.num_attention_heads,
            context_embedding_dim=unet.topology.context_embedding_dim,
            pooled_embedding_dim=unet.pooled_embedding_dim,
            num_time_ids=unet.num_time_ids,
            time_embedding_dim=unet.time_embedding_dim,
            layers_per_block=unet.layers_per_block,
            condition_channels=condition_channels,
            condition_encoder_channels=condition_encoder_channels,
            device=device,
            dtype=dtype,
        )

    def init_context(self) -> Contexts:
        return super().init_context() | {TEXT_TIME_CONTEXT: {}}

    def extra_diffusers_modules(self) -> list[tuple[str, fl.WeightedModule]]:
        linear_1, linear_2 = self.layer("TextTimeEmbedding", TextTimeEmbedding).layers(fl.Linear)
        return [("add_embedding.linear_1", linear_1), ("add_embedding.linear_2", linear_2)]

    def extra_original_modules(self) -> list[tuple[str, str]]:
        return [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
