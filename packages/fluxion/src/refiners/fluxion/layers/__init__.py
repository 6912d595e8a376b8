"""Fluxion layers: `import refiners.fluxion.layers as fl`."""

from refiners.fluxion.adapters.adapter import Adapter
from refiners.fluxion.layers.activations import GLU, Activation, GeLU, ReLU, Sigmoid, SiLU
from refiners.fluxion.layers.attentions import (
    Attention,
    ScaledDotProductAttention,
    SelfAttention,
    SelfAttention2d,
)
from refiners.fluxion.layers.basics import (
    Cos,
    Flatten,
    GetArg,
    Identity,
    Multiply,
    Parameter,
    Permute,
    Reshape,
    Sin,
    Slicing,
    Squeeze,
    Transpose,
    Unflatten,
    Unsqueeze,
)
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
from refiners.fluxion.layers.converter import Converter
from refiners.fluxion.layers.embedding import Embedding
from refiners.fluxion.layers.linear import Linear, MultiLinear
from refiners.fluxion.layers.module import ContextModule, Module, WeightedModule
from refiners.fluxion.layers.norm import GroupNorm, InstanceNorm2d, LayerNorm, LayerNorm2d
from refiners.fluxion.layers.sampling import (
    Downsample,
    Interpolate,
    MaxPool1d,
    MaxPool2d,
    Pad,
    PixelUnshuffle,
    ReflectionPad2d,
    Upsample,
)
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
    "Converter",
    "Activation",
    "ReLU",
    "SiLU",
    "GeLU",
    "GLU",
    "Sigmoid",
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
    "Linear",
    "MultiLinear",
    "Conv2d",
    "ConvTranspose2d",
    "Embedding",
    "LayerNorm",
    "LayerNorm2d",
    "GroupNorm",
    "InstanceNorm2d",
    "ScaledDotProductAttention",
    "Attention",
    "SelfAttention",
    "SelfAttention2d",
    "Interpolate",
    "Pad",
    "Downsample",
    "Upsample",
    "MaxPool1d",
    "MaxPool2d",
    "ReflectionPad2d",
    "PixelUnshuffle",
]
