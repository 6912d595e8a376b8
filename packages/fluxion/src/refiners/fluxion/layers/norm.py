"""Normalization layers."""

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.functional import layer_norm

from refiners.fluxion.layers.module import Module, WeightedModule

__all__ = ["LayerNorm", "LayerNorm2d", "GroupNorm", "InstanceNorm2d"]


class _Norm(WeightedModule):
    """A norm whose affine weights are optional: without them it reads (and reports) like a weightless layer."""

    weight: torch.nn.Parameter | None  # pyright: ignore[reportIncompatibleVariableOverride]

    @property
    def device(self) -> torch.device:
        # Like a Chain without weights: nothing to place, CPU by convention.
        return self.weight.device if self.weight is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype if self.weight is not None else torch.float32

    def short_repr(self) -> str:
        return WeightedModule.short_repr(self) if self.weight is not None else Module.short_repr(self)


class LayerNorm(torch.nn.LayerNorm, _Norm):
    """`torch.nn.LayerNorm`: normalize over the last dimensions, then scale and shift.

    Args:
        normalized_shape: Size of the last dimension, or sizes of the last dimensions, to normalize over.
        eps: Added to the variance, for numerical stability.
        elementwise_affine: Whether to learn a per-element scale (`weight`) and shift (`bias`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        elementwise_affine: bool = True,
    ) -> None:
        shape = normalized_shape if isinstance(normalized_shape, int) else list(normalized_shape)
        super().__init__(shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)


class LayerNorm2d(WeightedModule):
    """Layer normalization over the channel dimension of `(batch, channels, *spatial)` tensors, at each position.

    This is the `LayerNorm2d` of Segment Anything and the channels-first LayerNorm of ConvNeXt.

    Args:
        channels: Number of channels.
        eps: Added to the variance, for numerical stability.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        channels: int,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # Channels last, so `layer_norm`'s fused kernel normalizes them; then back to channels first.
        normalized = layer_norm(x.movedim(1, -1), (self.channels,), self.weight, self.bias, self.eps)
        return normalized.movedim(-1, 1)


class GroupNorm(torch.nn.GroupNorm, _Norm):
    """`torch.nn.GroupNorm`: normalize `(batch, channels, *)` tensors over groups of channels.

    Args:
        channels: Number of channels.
        num_groups: Number of groups; it must divide `channels`.
        eps: Added to the variance, for numerical stability.
        affine: Whether to learn a per-channel scale (`weight`) and shift (`bias`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        channels: int,
        num_groups: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        affine: bool = True,
    ) -> None:
        if channels % num_groups != 0:
            raise ValueError(
                f"GroupNorm splits channels into num_groups equal groups: {channels} channels cannot be split into "
                f"{num_groups} groups. Pick a num_groups that divides {channels}."
            )
        super().__init__(num_groups, channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.channels = channels

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)


class InstanceNorm2d(torch.nn.InstanceNorm2d, _Norm):
    """`torch.nn.InstanceNorm2d`: normalize each channel of each `(channels, height, width)` element separately.

    Args:
        num_features: Number of channels.
        eps: Added to the variance, for numerical stability.
        affine: Whether to learn a per-channel scale (`weight`) and shift (`bias`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        affine: bool = False,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)
