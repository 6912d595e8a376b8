"""Chains that combine their children otherwise than one after the other."""

from collections.abc import Callable, Iterable
from typing import Any

import torch

from refiners.fluxion.layers.chain import Chain
from refiners.fluxion.layers.module import ContextModule, Module

__all__ = ["Parallel", "Distribute", "Passthrough", "Sum", "Residual", "Concatenate", "Matmul", "Lambda", "Breakpoint"]


class Parallel(Chain):
    """Give the same inputs to every child; return the tuple of their outputs."""

    _tag = "PAR"

    def forward(self, *args: Any) -> tuple[Any, ...]:
        return tuple(self._call_layer(layer, *args) for layer in self)


class Distribute(Chain):
    """Give the i-th input to the i-th child; return the tuple of their outputs."""

    _tag = "DISTR"

    def forward(self, *args: Any) -> tuple[Any, ...]:
        if len(args) != len(self):
            raise ValueError(
                f"{self.get_path()} distributes its inputs one per child: it has {len(self)} children but got "
                f"{len(args)} inputs"
            )
        return tuple(self._call_layer(layer, arg) for layer, arg in zip(self, args, strict=True))


class Passthrough(Chain):
    """Run the children for their side effects (e.g. `SetContext`), and return the inputs unchanged."""

    _tag = "PASS"

    def forward(self, *args: Any) -> Any:
        super().forward(*args)
        return args[0] if len(args) == 1 else args


class Sum(Chain):
    """Give the same inputs to every child; return the sum of their outputs."""

    _tag = "SUM"

    def forward(self, *args: Any) -> Any:
        output: Any = None
        for layer in self:
            layer_output = self._call_layer(layer, *args)
            output = layer_output if output is None else output + layer_output
        return output


class Residual(Chain):
    """A skip connection: `x + chain(x)`, where `x` is the first input."""

    _tag = "RES"

    def forward(self, *args: Any) -> Any:
        return super().forward(*args) + args[0]


class Concatenate(Chain):
    """Give the same inputs to every child; concatenate their outputs along `dim`."""

    _tag = "CAT"

    def __init__(self, *modules: Module | Iterable[Module], dim: int = 0) -> None:
        self.dim = dim
        super().__init__(*modules)

    def forward(self, *args: Any) -> torch.Tensor:
        return torch.cat([self._call_layer(layer, *args) for layer in self], dim=self.dim)


class Matmul(Chain):
    """`input(*args) @ other(*args)`."""

    _tag = "MATMUL"

    def __init__(self, input: Module, other: Module) -> None:
        super().__init__(input, other)

    def forward(self, *args: Any) -> torch.Tensor:
        input, other = self
        return torch.matmul(self._call_layer(input, *args), self._call_layer(other, *args))


class Lambda(Module):
    """Wrap a function as a layer: `Lambda(torch.sigmoid)`."""

    def __init__(self, func: Callable[..., Any]) -> None:
        super().__init__()
        self.func = func

    def forward(self, *args: Any) -> Any:
        return self.func(*args)

    def short_repr(self) -> str:
        name = getattr(self.func, "__name__", type(self.func).__name__)
        return f"Lambda({name})"


class Breakpoint(ContextModule):
    """Stop in the debugger with this layer's inputs at hand; return them unchanged."""

    def __init__(self, vscode: bool = False) -> None:
        super().__init__()
        self.vscode = vscode

    def forward(self, *args: Any) -> Any:
        if self.vscode:
            import debugpy  # pyright: ignore[reportMissingImports]

            debugpy.breakpoint()  # pyright: ignore[reportUnknownMemberType]
        else:
            breakpoint()
        return args[0] if len(args) == 1 else args
