"""Layers without weights that reshape or transform tensors, and `Parameter`, a layer that is a learned tensor."""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from refiners.fluxion.layers.module import Module, WeightedModule

__all__ = [
    "Identity",
    "GetArg",
    "Reshape",
    "Flatten",
    "Unflatten",
    "Transpose",
    "Permute",
    "Slicing",
    "Squeeze",
    "Unsqueeze",
    "Parameter",
    "Sin",
    "Cos",
    "Multiply",
]


class Identity(Module):
    """Return the input unchanged: e.g. one branch of a `Parallel` that passes `x` on as is."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class GetArg(Module):
    """Return the positional argument at `index` of the call: e.g. pick one of the values a layer passes on.

    Args:
        index: The position of the argument to return.
    """

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: Any) -> Any:
        return args[self.index]


class Reshape(Module):
    """Reshape each element of the batch: `x.reshape(x.shape[0], *shape)`. The batch dimension is kept.

    Args:
        *shape: The shape of one batch element (one entry may be -1, as for `torch.reshape`).

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl

        assert fl.Reshape(16, 8)(torch.randn(2, 8, 4, 4)).shape == (2, 16, 8)
        ```
    """

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        try:
            return x.reshape(x.shape[0], *self.shape)
        except RuntimeError as error:
            raise ValueError(
                f"Reshape{self.shape} cannot reshape a batch of shape {tuple(x.shape)}: each element has "
                f"{math.prod(x.shape[1:])} values, which do not fit the shape {self.shape}. Reshape keeps the batch "
                f"dimension: give the shape of one element."
            ) from error

    def basic_attributes(self) -> dict[str, Any]:
        return {"shape": self.shape}


class Flatten(Module):
    """`torch.flatten(x, start_dim, end_dim)`: merge the dimensions from `start_dim` to `end_dim`.

    Args:
        start_dim: First dimension to merge (unlike `torch.nn.Flatten`, the default includes the batch dimension).
        end_dim: Last dimension to merge.
    """

    def __init__(self, start_dim: int = 0, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(self.start_dim, self.end_dim)


class Unflatten(Module):
    """`x.unflatten(dim, sizes)`: split dimension `dim` into `sizes`, given here or at call time.

    Args:
        dim: The dimension to split.
        sizes: The sizes it is split into (one may be -1). None (the original Refiners' form): `forward(x, sizes)`
            takes them, e.g. from a `Parallel` that computes them.
    """

    def __init__(self, dim: int, sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.sizes = None if sizes is None else tuple(sizes)

    def forward(self, x: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
        if (sizes is None) == (self.sizes is None):
            given = (
                "both at construction and at call time"
                if sizes is not None
                else "neither at construction nor at call time"
            )
            raise ValueError(f"Unflatten(dim={self.dim}) needs its sizes once, got them {given}")
        return x.unflatten(self.dim, tuple(sizes if sizes is not None else self.sizes))  # pyright: ignore[reportArgumentType]


class Transpose(Module):
    """`x.transpose(dim0, dim1)`: swap two dimensions.

    Args:
        dim0: First dimension.
        dim1: Second dimension.
    """

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0 = dim0
        self.dim1 = dim1

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(self.dim0, self.dim1)


class Permute(Module):
    """`x.permute(*dims)`: reorder the dimensions.

    Args:
        *dims: The new order of the dimensions (the batch dimension included).
    """

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)

    def basic_attributes(self) -> dict[str, Any]:
        return {"dims": self.dims}


class Slicing(Module):
    """`x[..., start:end:step]` along dimension `dim`, with Python's rules for negative and out-of-range bounds.

    Args:
        dim: The dimension to slice.
        start: First index.
        end: Index after the last one (None: to the end).
        step: Step between indices (at least 1).
    """

    def __init__(self, dim: int = 0, start: int = 0, end: int | None = None, step: int = 1) -> None:
        super().__init__()
        if step < 1:
            raise ValueError(f"Slicing needs a step of at least 1 (torch has no negative steps), got step={step}")
        self.dim = dim
        self.start = start
        self.end = end
        self.step = step

    def forward(self, x: Tensor) -> Tensor:
        dim = self.dim % x.dim()
        index = (slice(None),) * dim + (slice(self.start, self.end, self.step),)
        return x[index]


class Squeeze(Module):
    """`x.squeeze(dim)`: remove dimension `dim` if its size is 1.

    Args:
        dim: The dimension to remove.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.squeeze(self.dim)


class Unsqueeze(Module):
    """`x.unsqueeze(dim)`: insert a dimension of size 1 at `dim`.

    Args:
        dim: Where to insert it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(dim=self.dim)


class Parameter(WeightedModule):
    """A learned tensor of shape `dims`, output for each element of the batch (the input only gives the batch size).

    In a `Residual`, it adds a learned embedding to its input: `fl.Residual(fl.Parameter(num_patches, dim))` adds
    position embeddings to a `(batch, num_patches, dim)` sequence.

    Args:
        *dims: The shape of the tensor, without the batch dimension.
        requires_grad: Whether the tensor is trained.
        device: Where the tensor lives.
        dtype: The tensor's dtype.
    """

    def __init__(
        self,
        *dims: int,
        requires_grad: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.weight = torch.nn.Parameter(torch.randn(*dims, device=device, dtype=dtype), requires_grad=requires_grad)

    @property
    def requires_grad(self) -> bool:
        """Whether the tensor is trained; assign to change it (`layer.requires_grad = False`)."""
        return self.weight.requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.weight.requires_grad_(value)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.expand(x.shape[0], *self.dims)

    def basic_attributes(self) -> dict[str, Any]:
        return {"dims": self.dims} | ({} if self.weight.requires_grad else {"requires_grad": False})


class Sin(Module):
    """`torch.sin(x)`."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


class Cos(Module):
    """`torch.cos(x)`."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cos(x)


class Multiply(Module):
    """`scale * x + bias`, with constant (not learned) `scale` and `bias`.

    Args:
        scale: The factor.
        bias: The offset added after scaling.
    """

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias
