"""The T2I-Adapter's encoder: a small convolutional network that turns a condition image into one feature map per
resolution of the UNet's encoder.

The image is folded into channels (`PixelUnshuffle`), then stages of residual blocks, each after an average pooling
that halves the resolution but the first, produce the features (diffusers' `T2IAdapter`, TencentARC's `Adapter` and
`Adapter_light`). Each of diffusers' kinds (`adapter_type`) is a class: `FullT2IEncoder` (`full_adapter`, SD1.x),
`LightT2IEncoder` (`light_adapter`, SD1.x) and `FullT2IEncoderXL` (`full_adapter_xl`, SDXL). `T2IAdapter` adds their
features to the UNet's.
"""

from collections.abc import Sequence
from typing import Any, ClassVar, Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl

__all__ = [
    "T2IResidualBlock",
    "FeatureStages",
    "T2IEncoder",
    "FullT2IEncoder",
    "LightT2IEncoder",
    "FullT2IEncoderXL",
]

Device = torch.device | str | None


class T2IResidualBlock(fl.Residual):
    """`x + Conv(ReLU(Conv3x3(x)))`, the second convolution 1x1 (the full adapters') or 3x3 (the light one).

    Args:
        channels: Channels of the input and output.
        second_kernel_size: Kernel size of the second convolution.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self, channels: int, second_kernel_size: int = 1, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.Conv2d(channels, channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            fl.ReLU(),
            fl.Conv2d(
                channels,
                channels,
                kernel_size=second_kernel_size,
                padding=second_kernel_size // 2,
                device=device,
                dtype=dtype,
            ),
        )


class FeatureStages(fl.Chain):
    """Its children run one after the other, as a Chain's; it returns the output of each (a tuple, one feature map per
    stage)."""

    def forward(self, *args: Any) -> tuple[Tensor, ...]:
        features: list[Tensor] = []
        for stage in self:
            args = (self._call_layer(stage, *args),)
            features.append(args[0])
        return tuple(features)


def _own_convs(chain: fl.Chain) -> list[fl.Conv2d]:
    """The convolutions that are children of `chain` (not those of its residual blocks)."""
    return [layer for layer in chain if isinstance(layer, fl.Conv2d)]


def _halving() -> fl.AvgPool2d:
    return fl.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)


class T2IEncoder(fl.Chain):
    """A T2I-Adapter's encoder: `(batch, in_channels, H, W)` images in [0, 1] to a tuple of feature maps.

    Subclasses lay out the kinds; each records its sizes (diffusers' config names) and the geometry of its features.

    Attributes:
        kind: diffusers' `adapter_type` of this layout.
        adapter: The adapter that takes it (its family's: `SD1T2IAdapter`, `SDXLT2IAdapter`).
        feature_channels: The channels of each feature map.
        feature_downscales: How many image pixels each feature map's cell spans, per side.
    """

    kind: ClassVar[str]
    adapter: ClassVar[str]

    def __init__(
        self,
        *layers: fl.Module,
        in_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        downscale_factor: int,
        feature_channels: Sequence[int],
        feature_downscales: Sequence[int],
    ) -> None:
        self.in_channels = in_channels
        self.channels = tuple(channels)
        self.num_res_blocks = num_res_blocks
        self.downscale_factor = downscale_factor
        self.feature_channels = tuple(feature_channels)
        self.feature_downscales = tuple(feature_downscales)
        super().__init__(*layers)

    @classmethod
    def for_unet(cls, unet_channels: Sequence[int], device: Device = None, dtype: torch.dtype | None = None) -> Self:
        """A new encoder (random weights) whose features fit a UNet of these widths, with the kind's other sizes.

        Args:
            unet_channels: The UNet's widths, highest resolution first.
            device: Where the weights live.
            dtype: The weights' dtype.
        """
        return cls(channels=tuple(unet_channels), device=device, dtype=dtype)  # pyright: ignore[reportCallIssue]

    @property
    def stages(self) -> FeatureStages:
        """The stages, one per feature map."""
        return self.ensure_find(FeatureStages)

    def diffusers_modules(self) -> list[tuple[str, fl.WeightedModule]]:
        """Every layer with weights, by the name of the module of diffusers' `T2IAdapter` that plays its role.

        A stage's own convolutions are its `in_conv` then its `out_conv`; its residual blocks are its `resnets`.
        """
        pairs: list[tuple[str, fl.WeightedModule]] = [("adapter.conv_in", conv) for conv in _own_convs(self)]
        for i, stage in enumerate(self.stages.layers(fl.Chain)):
            for name, conv in zip(("in_conv", "out_conv"), _own_convs(stage), strict=False):
                pairs.append((f"adapter.body.{i}.{name}", conv))
            for j, block in enumerate(stage.layers(T2IResidualBlock)):
                block1, block2 = block.layers(fl.Conv2d)
                pairs += [
                    (f"adapter.body.{i}.resnets.{j}.block1", block1),
                    (f"adapter.body.{i}.resnets.{j}.block2", block2),
                ]
        return pairs

    def original_names(self) -> list[tuple[str, str]]:
        """The `(original, diffusers)` module names, TencentARC's `Adapter` layout: its body is a flat list of
        residual blocks, `num_res_blocks` per stage, the first of a stage holding the stage's `in_conv`."""
        names = [("conv_in", "adapter.conv_in")]
        for i, stage in enumerate(self.stages.layers(fl.Chain)):
            if _own_convs(stage):
                names.append((f"body.{i * self.num_res_blocks}.in_conv", f"adapter.body.{i}.in_conv"))
            for j in range(self.num_res_blocks):
                for conv in ("block1", "block2"):
                    names.append((f"body.{i * self.num_res_blocks + j}.{conv}", f"adapter.body.{i}.resnets.{j}.{conv}"))
        return names


class FullT2IEncoder(T2IEncoder):
    """diffusers' `full_adapter` (TencentARC's `Adapter`, e.g. `t2iadapter_depth_sd14v1`): a 3x3 convolution after the
    unshuffle, then one stage per width, each but the first halving the resolution and widening with a 1x1
    convolution, each with `num_res_blocks` residual blocks.

    Args:
        in_channels: Channels of the condition image (1 for sketches).
        channels: The widths of the stages: the UNet's widths.
        num_res_blocks: Residual blocks per stage.
        downscale_factor: The unshuffle's factor (the latents' downscale).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    kind = "full_adapter"
    adapter = "SD1T2IAdapter"

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (320, 640, 1280, 1280),
        num_res_blocks: int = 2,
        downscale_factor: int = 8,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        stages: list[fl.Chain] = []
        for i, width in enumerate(channels):
            previous = channels[max(i - 1, 0)]
            layers: list[fl.Module] = [] if i == 0 else [_halving()]
            if previous != width:
                layers.append(fl.Conv2d(previous, width, kernel_size=1, device=device, dtype=dtype))
            layers += [T2IResidualBlock(width, 1, device=device, dtype=dtype) for _ in range(num_res_blocks)]
            stages.append(fl.Chain(layers))
        super().__init__(
            fl.PixelUnshuffle(downscale_factor),
            fl.Conv2d(
                in_channels * downscale_factor**2, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype
            ),
            FeatureStages(stages),
            in_channels=in_channels,
            channels=channels,
            num_res_blocks=num_res_blocks,
            downscale_factor=downscale_factor,
            feature_channels=channels,
            feature_downscales=[downscale_factor * 2**i for i in range(len(channels))],
        )


class LightT2IEncoder(T2IEncoder):
    """diffusers' `light_adapter` (TencentARC's `Adapter_light`, e.g. `t2iadapter_color_sd14v1`): one stage per
    width and a last one at the last width, each but the first halving the resolution; a stage works at a quarter of
    its width between two 1x1 convolutions, with `num_res_blocks` residual blocks of two 3x3 convolutions.

    Args:
        in_channels: Channels of the condition image.
        channels: The widths of the stages but the last (which repeats the last width).
        num_res_blocks: Residual blocks per stage.
        downscale_factor: The unshuffle's factor (the latents' downscale).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    kind = "light_adapter"
    adapter = "SD1T2IAdapter"

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (320, 640, 1280),
        num_res_blocks: int = 4,
        downscale_factor: int = 8,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        widths = [*channels, channels[-1]]
        stages: list[fl.Chain] = []
        previous = in_channels * downscale_factor**2
        for i, width in enumerate(widths):
            inner = width // 4
            stages.append(
                fl.Chain(
                    *([] if i == 0 else [_halving()]),
                    fl.Conv2d(previous, inner, kernel_size=1, device=device, dtype=dtype),
                    *(T2IResidualBlock(inner, 3, device=device, dtype=dtype) for _ in range(num_res_blocks)),
                    fl.Conv2d(inner, width, kernel_size=1, device=device, dtype=dtype),
                )
            )
            previous = width
        super().__init__(
            fl.PixelUnshuffle(downscale_factor),
            FeatureStages(stages),
            in_channels=in_channels,
            channels=channels,
            num_res_blocks=num_res_blocks,
            downscale_factor=downscale_factor,
            feature_channels=widths,
            feature_downscales=[downscale_factor * 2**i for i in range(len(widths))],
        )

    @classmethod
    def for_unet(cls, unet_channels: Sequence[int], device: Device = None, dtype: torch.dtype | None = None) -> Self:
        # Its last stage repeats the last width: SD1's four widths are three stages and that one.
        return cls(channels=tuple(unet_channels[:-1]), device=device, dtype=dtype)

    def original_names(self) -> list[tuple[str, str]]:
        """The `(original, diffusers)` module names, TencentARC's `Adapter_light` layout: one `ExtractorLight` per
        stage, its residual blocks in its own `body`."""
        names: list[tuple[str, str]] = []
        for i in range(len(self.feature_channels)):
            names += [(f"body.{i}.in_conv", f"adapter.body.{i}.in_conv")]
            for j in range(self.num_res_blocks):
                for conv in ("block1", "block2"):
                    names.append((f"body.{i}.body.{j}.{conv}", f"adapter.body.{i}.resnets.{j}.{conv}"))
            names.append((f"body.{i}.out_conv", f"adapter.body.{i}.out_conv"))
        return names


class FullT2IEncoderXL(T2IEncoder):
    """diffusers' `full_adapter_xl` (TencentARC's SDXL adapters, e.g. `t2i-adapter-canny-sdxl-1.0`): as
    `FullT2IEncoder`, but unshuffled by 16 and halving the resolution once, at the third stage (SDXL's first level
    downsamples before the adapter's features are added, its last does not).

    Args:
        in_channels: Channels of the condition image.
        channels: The widths of the four stages.
        num_res_blocks: Residual blocks per stage.
        downscale_factor: The unshuffle's factor.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    kind = "full_adapter_xl"
    adapter = "SDXLT2IAdapter"

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (320, 640, 1280, 1280),
        num_res_blocks: int = 2,
        downscale_factor: int = 16,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        stages: list[fl.Chain] = []
        for i, width in enumerate(channels):
            previous = channels[i - 1] if i in (1, 2) else width
            layers: list[fl.Module] = [_halving()] if i == 2 else []
            if previous != width:
                layers.append(fl.Conv2d(previous, width, kernel_size=1, device=device, dtype=dtype))
            layers += [T2IResidualBlock(width, 1, device=device, dtype=dtype) for _ in range(num_res_blocks)]
            stages.append(fl.Chain(layers))
        super().__init__(
            fl.PixelUnshuffle(downscale_factor),
            fl.Conv2d(
                in_channels * downscale_factor**2, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype
            ),
            FeatureStages(stages),
            in_channels=in_channels,
            channels=channels,
            num_res_blocks=num_res_blocks,
            downscale_factor=downscale_factor,
            feature_channels=channels,
            feature_downscales=[downscale_factor * (2 if i >= 2 else 1) for i in range(len(channels))],
        )

    @classmethod
    def for_unet(cls, unet_channels: Sequence[int], device: Device = None, dtype: torch.dtype | None = None) -> Self:
        # Its fourth feature goes to the middle block, at SDXL's last width.
        return cls(channels=(*unet_channels, unet_channels[-1]), device=device, dtype=dtype)
