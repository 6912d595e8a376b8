"""Changing the spatial size of feature maps: interpolation, strided convolutions, pooling, padding."""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Size, Tensor
from torch.nn.functional import interpolate, pad

from refiners.fluxion.context import Contexts, lookup_key
from refiners.fluxion.layers.basics import Identity
from refiners.fluxion.layers.chain import Chain
from refiners.fluxion.layers.combinators import Parallel
from refiners.fluxion.layers.conv import Conv2d
from refiners.fluxion.layers.module import ContextModule, Module

__all__ = [
    "AvgPool2d",
    "Interpolate",
    "Pad",
    "PushShape",
    "PopShape",
    "ScaledShape",
    "Downsample",
    "Upsample",
    "MaxPool1d",
    "MaxPool2d",
    "ReflectionPad2d",
    "PixelUnshuffle",
    "SAMPLING_CONTEXT",
    "SHAPES_KEY",
]

SAMPLING_CONTEXT = "sampling"
SHAPES_KEY = "shapes"
"""`SAMPLING_CONTEXT[SHAPES_KEY]` is a stack (a list) of the spatial sizes seen by `Downsample`s, innermost last."""

InterpolateMode = Literal["nearest", "nearest-exact", "bilinear", "bicubic", "area"]


class Interpolate(Module):
    """Resize a `(batch, channels, height, width)` map to `shape`: `forward(x, shape)`.

    Args:
        mode: The interpolation (see `torch.nn.functional.interpolate`).
        antialias: Anti-alias when downsampling (bilinear and bicubic modes), as torch's `antialias`.
    """

    def __init__(self, mode: InterpolateMode = "nearest", antialias: bool = False) -> None:
        super().__init__()
        self.mode = mode
        self.antialias = antialias

    def forward(self, x: Tensor, shape: Sequence[int]) -> Tensor:
        return interpolate(x, size=tuple(shape), mode=self.mode, antialias=self.antialias)


class Pad(Module):
    """`torch.nn.functional.pad(x, pad, mode, value)`.

    Args:
        pad: Padding sizes, last dimension first: `(left, right, top, bottom)` for a 2d map.
        mode: `"constant"`, `"reflect"`, `"replicate"` or `"circular"`.
        value: The fill value of `"constant"` padding.
    """

    def __init__(
        self,
        pad: tuple[int, ...],
        mode: Literal["constant", "reflect", "replicate", "circular"] = "constant",
        value: float = 0.0,
    ) -> None:
        super().__init__()
        self.pad = pad
        self.mode = mode
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return pad(x, self.pad, mode=self.mode, value=self.value if self.mode == "constant" else None)


class PushShape(ContextModule):
    """Push the spatial size of the input (`x.shape[2:]`) on the stack `SAMPLING_CONTEXT[SHAPES_KEY]`; pass `x` on.

    The stack is replaced, not appended to in place: its default value is never mutated, so a forward that stops
    half-way (or a Downsample without matching Upsample) leaves nothing behind for the next one.
    """

    def forward(self, x: Tensor) -> Tensor:
        context = self.use_context(SAMPLING_CONTEXT)
        context[SHAPES_KEY] = [*lookup_key(context, SAMPLING_CONTEXT, SHAPES_KEY), x.shape[2:]]
        return x


class PopShape(ContextModule):
    """Output the last spatial size pushed by a `PushShape` (in a `Downsample`), and remove it from the stack."""

    def forward(self, *args: Any) -> Size:
        context = self.use_context(SAMPLING_CONTEXT)
        shapes: list[Size] = lookup_key(context, SAMPLING_CONTEXT, SHAPES_KEY)
        if not shapes:
            raise ValueError(
                "no spatial size left to restore: an Upsample without upsample_factor restores the size seen by a "
                "Downsample(register_shape=True) earlier in the same forward, and there is none. Add that Downsample, "
                "or give the Upsample an upsample_factor."
            )
        context[SHAPES_KEY] = shapes[:-1]
        return shapes[-1]


class ScaledShape(Module):
    """The spatial size of the input times `factor`: `Size(s * factor for s in x.shape[2:])`.

    Args:
        factor: The integer scale.
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Size:
        return Size(size * self.factor for size in x.shape[2:])


class Downsample(Chain):
    """Downsample a `(batch, channels, height, width)` map with a 3x3 convolution of stride `scale_factor`.

    With `padding=0`, the map is first padded by one on the right and bottom (as in the Stable Diffusion UNet and
    autoencoder), so an even size is divided exactly by 2.

    Args:
        channels: Number of input and output channels.
        scale_factor: The stride of the convolution.
        padding: The convolution's padding.
        register_shape: Push the input's spatial size on `SAMPLING_CONTEXT[SHAPES_KEY]`, for an `Upsample` to
            restore it exactly (odd sizes are not recovered by a factor).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        channels: int,
        scale_factor: int,
        padding: int = 0,
        register_shape: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = channels
        self.scale_factor = scale_factor
        self.padding = padding
        self.register_shape = register_shape
        super().__init__(
            *([PushShape()] if register_shape else []),
            *([Pad((0, 1, 0, 1))] if padding == 0 else []),
            Conv2d(channels, channels, 3, stride=scale_factor, padding=padding, device=device, dtype=dtype),
        )

    def init_context(self) -> Contexts:
        return {SAMPLING_CONTEXT: {SHAPES_KEY: []}}


class Upsample(Chain):
    """Upsample a `(batch, channels, height, width)` map (nearest neighbour), then apply a 3x3 convolution.

    Args:
        channels: Number of input and output channels.
        upsample_factor: The integer scale. If None, the map is resized to the last size pushed by a
            `Downsample(register_shape=True)` in the same forward, which restores odd sizes exactly.
        device: Where the weights live.
        dtype: The weights' dtype.

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl

        model = fl.Chain(fl.Downsample(8, scale_factor=2, padding=1), fl.Upsample(8))
        assert model(torch.randn(1, 8, 7, 9)).shape == (1, 8, 7, 9)
        ```
    """

    def __init__(
        self,
        channels: int,
        upsample_factor: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = channels
        self.upsample_factor = upsample_factor
        super().__init__(
            Parallel(Identity(), PopShape() if upsample_factor is None else ScaledShape(upsample_factor)),
            Interpolate(),
            Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype),
        )

    def init_context(self) -> Contexts:
        return {SAMPLING_CONTEXT: {SHAPES_KEY: []}}


class MaxPool1d(torch.nn.MaxPool1d, Module):
    """`torch.nn.MaxPool1d`.

    Args:
        kernel_size: Size of the window.
        stride: Step of the window (default: `kernel_size`).
        padding: Implicit negative-infinity padding on both sides.
        dilation: Spacing between window elements.
        return_indices: Also return the indices of the maxima.
        ceil_mode: Round the output size up instead of down.
    """

    def __init__(
        self,
        kernel_size: int,
        stride: int | None = None,
        padding: int = 0,
        dilation: int = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__(
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            return_indices=return_indices,
            ceil_mode=ceil_mode,
        )


class MaxPool2d(torch.nn.MaxPool2d, Module):
    """`torch.nn.MaxPool2d`.

    Args:
        kernel_size: Size of the window.
        stride: Step of the window (default: `kernel_size`).
        padding: Implicit negative-infinity padding on both sides.
        dilation: Spacing between window elements.
        return_indices: Also return the indices of the maxima.
        ceil_mode: Round the output size up instead of down.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__(
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            return_indices=return_indices,
            ceil_mode=ceil_mode,
        )


class AvgPool2d(torch.nn.AvgPool2d, Module):
    """`torch.nn.AvgPool2d`.

    Args:
        kernel_size: Size of the window.
        stride: Step of the window (default: `kernel_size`).
        padding: Implicit zero padding on both sides.
        ceil_mode: Round the output size up instead of down (a last, partial window is averaged over what it holds).
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__(kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)


class ReflectionPad2d(torch.nn.ReflectionPad2d, Module):
    """`torch.nn.ReflectionPad2d`: pad by mirroring the map at its borders.

    Args:
        padding: One size for all sides, or `(left, right, top, bottom)`.
    """

    def __init__(self, padding: int | tuple[int, int, int, int]) -> None:
        super().__init__(padding)


class PixelUnshuffle(torch.nn.PixelUnshuffle, Module):
    """`torch.nn.PixelUnshuffle`: `(B, C, H * r, W * r)` to `(B, C * r * r, H, W)`.

    Args:
        downscale_factor: The factor `r`.
    """

    def __init__(self, downscale_factor: int) -> None:
        super().__init__(downscale_factor)
