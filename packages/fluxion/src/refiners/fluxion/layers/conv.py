"""Convolutions."""

from typing import Literal

import torch
from torch import Tensor

from refiners.fluxion.layers.module import WeightedModule

__all__ = ["Conv2d", "ConvTranspose2d"]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


class Conv2d(torch.nn.Conv2d, WeightedModule):
    """`torch.nn.Conv2d`.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: Size of the kernel (an int for a square one).
        stride: Step of the kernel.
        padding: Implicit padding: an int, a pair, `"same"` or `"valid"`.
        groups: Number of blocked connections from input to output channels.
        use_bias: Whether to add a learned bias.
        dilation: Spacing between kernel elements.
        padding_mode: `"zeros"`, `"reflect"`, `"replicate"` or `"circular"`.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        groups: int = 1,
        use_bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        padding_mode: PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=use_bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.use_bias = use_bias

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)


class ConvTranspose2d(torch.nn.ConvTranspose2d, WeightedModule):
    """`torch.nn.ConvTranspose2d`.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: Size of the kernel.
        stride: Step of the kernel.
        padding: Implicit padding removed from the output.
        output_padding: Extra size added to one side of the output.
        groups: Number of blocked connections from input to output channels.
        use_bias: Whether to add a learned bias.
        dilation: Spacing between kernel elements.
        padding_mode: Only `"zeros"` (torch's transposed convolutions support no other).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        groups: int = 1,
        use_bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        padding_mode: PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            bias=use_bias,
            dilation=dilation,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.use_bias = use_bias

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        return super().forward(input, output_size=output_size)
