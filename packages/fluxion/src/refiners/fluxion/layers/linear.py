"""Linear layers."""

import itertools

import torch
from torch import Tensor

from refiners.fluxion.layers.activations import Activation, ReLU
from refiners.fluxion.layers.chain import Chain
from refiners.fluxion.layers.module import WeightedModule

__all__ = ["Linear", "MultiLinear"]


class Linear(torch.nn.Linear, WeightedModule):
    """`torch.nn.Linear`: `y = x @ weight.T + bias`.

    Args:
        in_features: Size of the last dimension of the input.
        out_features: Size of the last dimension of the output.
        bias: Whether to add a learned bias.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)


class MultiLinear(Chain):
    """A multi-layer perceptron: Linear layers with an activation between each pair.

    Args:
        input_dim: Input size.
        output_dim: Output size.
        inner_dim: Size of the hidden layers.
        num_layers: Number of Linear layers.
        activation: The activation class put between Linear layers.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        inner_dim: int,
        num_layers: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        activation: type[Activation] = ReLU,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"MultiLinear needs at least one layer, got num_layers={num_layers}")
        sizes = [input_dim] + [inner_dim] * (num_layers - 1) + [output_dim]
        layers: list[WeightedModule | Activation] = []
        for index, (size_in, size_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(Linear(size_in, size_out, device=device, dtype=dtype))
            if index < num_layers - 1:
                layers.append(activation())
        super().__init__(*layers)
