"""Fluxion layers: `import refiners.fluxion.layers as fl`."""

from refiners.fluxion.adapters.adapter import Adapter
from refiners.fluxion.layers.activations import GLU, Activation, GeLU, ReLU, Sigmoid, SiLU
from refiners.fluxion.layers.chain import Chain, ChainError, Return
from refiners.fluxion.layers.combinators import (
    Breakpoint,
    Concatenate,
    Distribute,
    Lambda,
    Matmul,
    Parallel,
    Passthrough,
    Residual,
    Sum,
)
from refiners.fluxion.layers.conv import Conv2d, ConvTranspose2d
from refiners.fluxion.layers.linear import Linear, MultiLinear
from refiners.fluxion.layers.module import ContextModule, Module, WeightedModule
from refiners.fluxion.layers.use_context import SetContext, UseContext

__all__ = [
    "Module",
    "WeightedModule",
    "ContextModule",
    "Chain",
    "ChainError",
    "Return",
    "Parallel",
    "Distribute",
    "Passthrough",
    "Sum",
    "Residual",
    "Concatenate",
    "Matmul",
    "Lambda",
    "Breakpoint",
    "UseContext",
    "SetContext",
    "Adapter",
    "Activation",
    "ReLU",
    "SiLU",
    "GeLU",
    "GLU",
    "Sigmoid",
    "Linear",
    "MultiLinear",
    "Conv2d",
    "ConvTranspose2d",
]
