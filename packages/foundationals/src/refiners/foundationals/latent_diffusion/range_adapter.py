"""The diffusion timestep as a side input: its embedding, computed once per forward, fed to every residual block.

`TimestepEncoder` reads the timestep from the context `TIMESTEP_CONTEXT`, embeds it (`RangeEncoder`: sinusoidal
features, then an MLP) and leaves the embedding in the context `RANGE_ADAPTER_CONTEXT`; each `RangeAdapter2d` adds a
projection of it to the output of the convolution it wraps, as diffusers' `ResnetBlock2D` adds `time_emb_proj(temb)`.

Guidance-distilled UNets (LCM's) also embed the guidance scale: a `GuidanceEmbedding` in the `RangeEncoder` adds a
projection of its sinusoidal features to the timestep's, before the MLP (diffusers' `time_cond_proj_dim`).
"""

import math

import torch
from torch import Tensor

import refiners.fluxion.layers as fl

__all__ = [
    "TIMESTEP_CONTEXT",
    "TIMESTEP_KEY",
    "RANGE_ADAPTER_CONTEXT",
    "TIMESTEP_EMBEDDING_KEY",
    "GUIDANCE_SCALE_KEY",
    "compute_sinusoidal_embedding",
    "compute_guidance_scale_embedding",
    "SinusoidalEmbedding",
    "GuidanceEmbedding",
    "RangeEncoder",
    "TimestepEncoder",
    "RangeAdapter2d",
]

TIMESTEP_CONTEXT = "diffusion"
TIMESTEP_KEY = "timestep"
"""`TIMESTEP_CONTEXT[TIMESTEP_KEY]`: the timestep of the current step, a scalar or one per batch element."""

GUIDANCE_SCALE_KEY = "guidance_scale"
"""`TIMESTEP_CONTEXT[GUIDANCE_SCALE_KEY]`: the guidance scale a `GuidanceEmbedding` embeds, a scalar or one per batch
element."""

RANGE_ADAPTER_CONTEXT = "range_adapter"
TIMESTEP_EMBEDDING_KEY = "timestep_embedding"
"""`RANGE_ADAPTER_CONTEXT[TIMESTEP_EMBEDDING_KEY]`: the timestep's embedding, written by `TimestepEncoder`."""


def compute_sinusoidal_embedding(x: Tensor, embedding_dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of scalars: `cat(cos(x * f), sin(x * f))` for `embedding_dim // 2` frequencies `f`.

    This is diffusers' `get_timestep_embedding` with `flip_sin_to_cos=True` and `downscale_freq_shift=0` (Stable
    Diffusion's), computed in float32 with the same operations, so the features are bitwise equal.

    Args:
        x: The values, a scalar or a `(batch,)` tensor (e.g. diffusion timesteps).
        embedding_dim: Number of features (even).
        max_period: The longest period; the frequencies are `max_period ** (-i / half)` for `i < half`.

    Returns:
        A `(batch, embedding_dim)` float32 tensor (batch 1 for a scalar).
    """
    if embedding_dim % 2 != 0:
        raise ValueError(
            f"sinusoidal embeddings pair a cosine with each sine: embedding_dim must be even, got {embedding_dim}"
        )
    if x.dim() > 1:
        raise ValueError(
            f"expected a scalar or a (batch,) tensor of values (e.g. one timestep per batch element), got shape "
            f"{tuple(x.shape)}"
        )
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float32, device=x.device)
    frequencies = torch.exp(exponent / half_dim)
    angles = x.reshape(-1, 1).float() * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def compute_guidance_scale_embedding(guidance_scale: Tensor, embedding_dim: int) -> Tensor:
    """Sinusoidal features of guidance scales, as LCM embeds them: `cat(sin(1000 w f), cos(1000 w f))`, `w = scale - 1`.

    This is what diffusers' pipelines give a UNet with `time_cond_proj_dim` (`get_guidance_scale_embedding` of
    `guidance_scale - 1`): sines first, and `half` frequencies `10000 ** (-i / (half - 1))`, unlike the timestep's.

    Args:
        guidance_scale: The classifier-free guidance scales the UNet was distilled to imitate: a scalar or `(batch,)`.
        embedding_dim: Number of features (diffusers' `time_cond_proj_dim`, 256 for LCM).

    Returns:
        A `(batch, embedding_dim)` float32 tensor (batch 1 for a scalar).
    """
    half_dim = embedding_dim // 2
    if half_dim < 2:
        raise ValueError(f"the guidance scale embedding needs at least 4 features, got embedding_dim={embedding_dim}")
    w = (guidance_scale.reshape(-1).float() - 1) * 1000.0
    step = torch.log(torch.tensor(10_000.0)) / (half_dim - 1)  # diffusers' operations, for equal features
    frequencies = torch.exp(torch.arange(half_dim, dtype=torch.float32) * -step).to(w.device)
    angles = w[:, None] * frequencies[None, :]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(features, (0, embedding_dim % 2))


class SinusoidalEmbedding(fl.Module):
    """`compute_sinusoidal_embedding` as a layer: `(batch,)` values (or a scalar) to `(batch, embedding_dim)`.

    Args:
        embedding_dim: Number of features (even).
    """

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        if embedding_dim % 2 != 0:
            raise ValueError(f"SinusoidalEmbedding needs an even embedding_dim, got {embedding_dim}")
        self.embedding_dim = embedding_dim

    def forward(self, x: Tensor | int | float) -> Tensor:
        if not isinstance(x, Tensor):
            x = torch.tensor(x)
        return compute_sinusoidal_embedding(x, self.embedding_dim)


class RangeEncoder(fl.Chain):
    """Embed scalars (timesteps): sinusoidal features, then `Linear -> SiLU -> Linear` (diffusers' `TimestepEmbedding`).

    The features are computed in float32 on the input's device, then cast to the weights' device and dtype.

    Args:
        sinusoidal_embedding_dim: Number of sinusoidal features (the first Linear's input size).
        embedding_dim: Size of the embedding.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        sinusoidal_embedding_dim: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.sinusoidal_embedding_dim = sinusoidal_embedding_dim
        self.embedding_dim = embedding_dim
        super().__init__(
            SinusoidalEmbedding(sinusoidal_embedding_dim),
            fl.Converter(),
            fl.Linear(sinusoidal_embedding_dim, embedding_dim, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Linear(embedding_dim, embedding_dim, device=device, dtype=dtype),
        )


class GuidanceScaleFeatures(fl.Module):
    """`compute_guidance_scale_embedding` as a layer.

    Args:
        embedding_dim: Number of features.
    """

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim

    def forward(self, guidance_scale: Tensor) -> Tensor:
        return compute_guidance_scale_embedding(guidance_scale, self.embedding_dim)


class GuidanceEmbedding(fl.Sum):
    """Add `Linear(guidance_scale_features)` to the timestep's sinusoidal features (diffusers' `cond_proj`).

    Reads `TIMESTEP_CONTEXT[GUIDANCE_SCALE_KEY]` (see `UNet.set_guidance_scale`). A UNet distilled from classifier-free
    guidance (LCM) takes the guidance scale as an input instead of running a negative batch.

    Args:
        guidance_embedding_dim: Number of guidance scale features (diffusers' `time_cond_proj_dim`).
        sinusoidal_embedding_dim: Number of the timestep's sinusoidal features.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        guidance_embedding_dim: int,
        sinusoidal_embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.guidance_embedding_dim = guidance_embedding_dim
        super().__init__(
            fl.Identity(),
            fl.Chain(
                fl.UseContext(TIMESTEP_CONTEXT, GUIDANCE_SCALE_KEY),
                GuidanceScaleFeatures(guidance_embedding_dim),
                fl.Converter(),
                fl.Linear(guidance_embedding_dim, sinusoidal_embedding_dim, bias=False, device=device, dtype=dtype),
            ),
        )

    @property
    def projection(self) -> fl.Linear:
        """The projection of the guidance scale features (diffusers' `time_embedding.cond_proj`)."""
        return self.layer(("Chain", "Linear"), fl.Linear)


class TimestepEncoder(fl.Passthrough):
    """Embed the timestep of the context `TIMESTEP_CONTEXT` into `RANGE_ADAPTER_CONTEXT`; pass the input through.

    Args:
        sinusoidal_embedding_dim: Number of sinusoidal features (Stable Diffusion: the UNet's first width, 320).
        embedding_dim: Size of the embedding (Stable Diffusion: 4 times that width, 1280).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        sinusoidal_embedding_dim: int = 320,
        embedding_dim: int = 1280,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.sinusoidal_embedding_dim = sinusoidal_embedding_dim
        self.embedding_dim = embedding_dim
        super().__init__(
            fl.UseContext(TIMESTEP_CONTEXT, TIMESTEP_KEY),
            RangeEncoder(sinusoidal_embedding_dim, embedding_dim, device=device, dtype=dtype),
            fl.SetContext(RANGE_ADAPTER_CONTEXT, TIMESTEP_EMBEDDING_KEY),
        )


class RangeAdapter2d(fl.Sum, fl.Adapter[fl.Conv2d]):
    """Add a projection of the timestep embedding to a convolution's output, channel by channel.

    `conv(x) + Linear(SiLU(embedding))[:, :, None, None]`: diffusers' `ResnetBlock2D` does this after its first
    convolution (`time_emb_proj`). The embedding is read from `RANGE_ADAPTER_CONTEXT[TIMESTEP_EMBEDDING_KEY]`; with one
    embedding per batch element or a single one for the whole batch.

    Args:
        target: The convolution to wrap.
        channels: Its output channels.
        embedding_dim: Size of the timestep embedding.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        target: fl.Conv2d,
        channels: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = channels
        self.embedding_dim = embedding_dim
        with self.setup_adapter(target):
            super().__init__(
                target,
                fl.Chain(
                    fl.UseContext(RANGE_ADAPTER_CONTEXT, TIMESTEP_EMBEDDING_KEY),
                    fl.SiLU(),
                    fl.Linear(embedding_dim, channels, device=device, dtype=dtype),
                    fl.Reshape(channels, 1, 1),
                ),
            )
