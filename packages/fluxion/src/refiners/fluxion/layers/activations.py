"""Activation functions."""

from typing import Literal

import torch
from torch import Tensor
from torch.nn.functional import gelu, glu, relu, sigmoid, silu

from refiners.fluxion.layers.module import Module

__all__ = ["Activation", "ReLU", "SiLU", "GeLU", "GLU", "Sigmoid"]


class Activation(Module):
    """Base class of element-wise activations."""


class ReLU(Activation):
    """`max(x, 0)`."""

    def forward(self, x: Tensor) -> Tensor:
        return relu(x)


class SiLU(Activation):
    """`x * sigmoid(x)` (also called Swish)."""

    def forward(self, x: Tensor) -> Tensor:
        return silu(x)


class Sigmoid(Activation):
    """`1 / (1 + exp(-x))`."""

    def forward(self, x: Tensor) -> Tensor:
        return sigmoid(x)


class GeLU(Activation):
    """Gaussian Error Linear Unit.

    Args:
        approximation: `"none"` (exact, with erf), `"tanh"` (the tanh approximation) or `"quick"`
            (`x * sigmoid(1.702 * x)`, as in OpenAI's CLIP).
    """

    def __init__(self, approximation: Literal["none", "tanh", "quick"] = "none") -> None:
        super().__init__()
        if approximation not in ("none", "tanh", "quick"):
            raise ValueError(f'GeLU approximation must be "none", "tanh" or "quick", got {approximation!r}')
        self.approximation = approximation

    def forward(self, x: Tensor) -> Tensor:
        match self.approximation:
            case "none":
                return gelu(x)
            case "tanh":
                return gelu(x, approximate="tanh")
            case "quick":
                return x * torch.sigmoid(1.702 * x)
            case _:  # pragma: no cover (rejected in __init__)
                raise ValueError(f"unknown GeLU approximation {self.approximation!r}")


class GLU(Activation):
    """Gated Linear Unit: split the last dimension in two halves `a, b` and return `a * activation(b)`.

    Args:
        activation: The gate's activation; `Sigmoid()` gives `torch.nn.functional.glu`, `GeLU()` gives GEGLU.
    """

    def __init__(self, activation: Activation | None = None) -> None:
        super().__init__()
        self.activation = activation if activation is not None else Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.activation, Sigmoid):
            return glu(x, dim=-1)
        if x.shape[-1] % 2 != 0:
            raise ValueError(f"GLU splits the last dimension in two halves: it must be even, got {x.shape[-1]}")
        a, b = x.chunk(2, dim=-1)
        return a * self.activation(b)
