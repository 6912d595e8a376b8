"""The Stable Diffusion UNet, generic over the families: diffusers' `UNet2DConditionModel` laid out by a topology.

The tree reads like the architecture: a `TimestepEncoder` embeds the timestep, `DownBlocks` halve the resolution
three times, a `MiddleBlock` works at the lowest one, `UpBlocks` come back up, each of them concatenating the output
of its mirror down block (the skip connections, kept in the context `UNET_CONTEXT`), and an `OutputBlock` predicts
the noise. The side inputs travel through the Context API: set them with `unet.set_timestep(...)` and
`unet.set_clip_text_embedding(...)`, then call `unet(latents)`.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts, lookup_key
from refiners.foundationals.latent_diffusion.cross_attention import (
    CROSS_ATTENTION_CONTEXT,
    CrossAttentionBlock,
    CrossAttentionBlock2d,
)
from refiners.foundationals.latent_diffusion.range_adapter import (
    GUIDANCE_SCALE_KEY,
    RANGE_ADAPTER_CONTEXT,
    TIMESTEP_CONTEXT,
    TIMESTEP_EMBEDDING_KEY,
    TIMESTEP_KEY,
    GuidanceEmbedding,
    RangeAdapter2d,
    RangeEncoder,
    TimestepEncoder,
)

__all__ = [
    "UNET_CONTEXT",
    "RESIDUALS_KEY",
    "CLIP_TEXT_EMBEDDING_KEY",
    "ResidualBlock",
    "CLIPLCrossAttention",
    "UNetTopology",
    "DownBlocks",
    "MiddleBlock",
    "UpBlocks",
    "OutputBlock",
    "ResidualAccumulator",
    "ResidualConcatenator",
    "UNet",
]

UNET_CONTEXT = "unet"
RESIDUALS_KEY = "residuals"
"""`UNET_CONTEXT[RESIDUALS_KEY]`: the outputs of the down blocks, in order, that the up blocks concatenate."""

CLIP_TEXT_EMBEDDING_KEY = "clip_text_embedding"
"""The text embedding's key in `CROSS_ATTENTION_CONTEXT`."""

Device = torch.device | str | None


class ResidualBlock(fl.Sum):
    """`shortcut(x) + Conv(SiLU(GroupNorm(Conv(SiLU(GroupNorm(x))))))`: diffusers' `ResnetBlock2D`.

    The shortcut is the identity, or a 1x1 convolution when the number of channels changes. `SD1UNet` wraps the
    first 3x3 convolution in a `RangeAdapter2d`, which adds the timestep embedding to its output.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        num_groups: Number of groups of the GroupNorms.
        eps: The GroupNorms' epsilon.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_groups = num_groups
        self.eps = eps
        super().__init__(
            fl.Chain(
                fl.GroupNorm(in_channels, num_groups, eps=eps, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
                fl.GroupNorm(out_channels, num_groups, eps=eps, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            ),
            fl.Identity()
            if in_channels == out_channels
            else fl.Conv2d(in_channels, out_channels, kernel_size=1, device=device, dtype=dtype),
        )


class CLIPLCrossAttention(CrossAttentionBlock2d):
    """The UNet's transformer: cross-attention to the CLIP text embedding, no bias on q, k, v.

    The name is SD1's (CLIP ViT-L), and the key of its weights; SDXL's UNet uses it too, on the embedding of its two
    text encoders, with several transformer layers and linear projections.

    Args:
        channels: Number of channels of the map.
        context_embedding_dim: Size of the text embedding (768 for CLIP ViT-L, 2048 for SDXL's two encoders).
        num_attention_heads: Number of attention heads.
        device: Where the weights live.
        dtype: The weights' dtype.
        num_attention_layers: Number of transformer layers (diffusers' `transformer_layers_per_block`).
        use_linear_projection: Linear projections in and out instead of 1x1 convolutions (SDXL).
    """

    def __init__(
        self,
        channels: int,
        context_embedding_dim: int = 768,
        num_attention_heads: int = 8,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        num_attention_layers: int = 1,
        use_linear_projection: bool = False,
    ) -> None:
        super().__init__(
            channels=channels,
            context_embedding_dim=context_embedding_dim,
            context_key=CLIP_TEXT_EMBEDDING_KEY,
            num_attention_heads=num_attention_heads,
            use_bias=False,
            device=device,
            dtype=dtype,
            num_attention_layers=num_attention_layers,
            use_linear_projection=use_linear_projection,
        )


@dataclass(frozen=True)
class UNetTopology:
    """The shape of a Stable Diffusion UNet: what differs between SD1, SDXL and its refiner (diffusers' config names).

    Args:
        channels: The width of each resolution, highest first (`block_out_channels`).
        attention_levels: Whether each resolution's blocks have a transformer (`CrossAttn*Block2D` block types).
        transformer_depths: Transformer layers per block at each resolution (`transformer_layers_per_block`); the
            middle block has the lowest resolution's.
        num_attention_heads: Heads of the transformers at each resolution (diffusers' `attention_head_dim`, which
            these configs use as the number of heads).
        context_embedding_dim: Size of the text embedding (`cross_attention_dim`).
        layers_per_block: Residual blocks per down block; up blocks have one more (`layers_per_block`).
        use_linear_projection: Linear projections around the transformers instead of 1x1 convolutions.
    """

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    transformer_depths: tuple[int, ...]
    num_attention_heads: tuple[int, ...]
    context_embedding_dim: int
    layers_per_block: int = 2
    use_linear_projection: bool = False

    def __post_init__(self) -> None:
        levels = len(self.channels)
        for name in ("attention_levels", "transformer_depths", "num_attention_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"{name} needs one entry per resolution ({levels}, as channels={self.channels}), got "
                    f"{getattr(self, name)}"
                )
        for width, heads in zip(self.channels, self.num_attention_heads, strict=True):
            if width % 32 != 0 or width % heads != 0:
                raise ValueError(
                    f"each width must be a multiple of 32 (the GroupNorms' groups) and of its number of attention "
                    f"heads; got channels={self.channels}, num_attention_heads={self.num_attention_heads}"
                )

    @property
    def skip_channels(self) -> list[int]:
        """The widths of the skip connections, in the order the down blocks make them (`conv_in`'s first)."""
        widths = [self.channels[0]]
        for level, width in enumerate(self.channels):
            widths += [width] * self.layers_per_block
            if level < len(self.channels) - 1:
                widths.append(width)  # the downsampler's output
        return widths

    def cross_attention(self, level: int, device: Device, dtype: torch.dtype | None) -> CLIPLCrossAttention:
        """The transformer of the blocks at resolution `level`."""
        return CLIPLCrossAttention(
            self.channels[level],
            self.context_embedding_dim,
            self.num_attention_heads[level],
            device=device,
            dtype=dtype,
            num_attention_layers=self.transformer_depths[level],
            use_linear_projection=self.use_linear_projection,
        )


class DownBlocks(fl.Chain):
    """The encoder half: the input convolution, then at each resolution `layers_per_block` residual blocks (each
    followed by a transformer where the resolution has attention) and a strided convolution to the next one.

    Each child Chain produces one skip connection; the UNet appends a `ResidualAccumulator` to each.

    Args:
        in_channels: Channels of the latents (4; 9 for inpainting: latents, mask and masked-image latents).
        topology: The UNet's shape.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self, in_channels: int, topology: UNetTopology, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        self.in_channels = in_channels
        channels = topology.channels
        blocks: list[fl.Chain] = [
            fl.Chain(fl.Conv2d(in_channels, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype))
        ]
        previous = channels[0]
        for level, width in enumerate(channels):
            for _ in range(topology.layers_per_block):
                layers: list[fl.Module] = [ResidualBlock(previous, width, device=device, dtype=dtype)]
                if topology.attention_levels[level]:
                    layers.append(topology.cross_attention(level, device, dtype))
                blocks.append(fl.Chain(layers))
                previous = width
            if level < len(channels) - 1:
                blocks.append(fl.Chain(fl.Downsample(width, scale_factor=2, padding=1, device=device, dtype=dtype)))
        super().__init__(blocks)


class MiddleBlock(fl.Chain):
    """At the lowest resolution: residual block, transformer, residual block.

    Args:
        topology: The UNet's shape (the lowest resolution's width, heads and transformer depth).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, topology: UNetTopology, device: Device = None, dtype: torch.dtype | None = None) -> None:
        channels = topology.channels[-1]
        lowest = len(topology.channels) - 1
        super().__init__(
            ResidualBlock(channels, channels, device=device, dtype=dtype),
            topology.cross_attention(lowest, device, dtype),
            ResidualBlock(channels, channels, device=device, dtype=dtype),
        )


class UpBlocks(fl.Chain):
    """The decoder half: at each resolution, from the lowest, `layers_per_block + 1` residual blocks (each followed
    by a transformer where the resolution has attention), then an upsampling to the next one.

    The input of each residual block is concatenated with a skip connection first (the UNet inserts a
    `ResidualConcatenator` at the start of each child Chain), hence their input widths: the sum of the two.

    Args:
        topology: The UNet's shape.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, topology: UNetTopology, device: Device = None, dtype: torch.dtype | None = None) -> None:
        channels = topology.channels
        skips = topology.skip_channels  # consumed from the last
        blocks: list[fl.Chain] = []
        previous = channels[-1]
        lowest = len(channels) - 1
        for level in range(lowest, -1, -1):
            width = channels[level]
            for index in range(topology.layers_per_block + 1):
                layers: list[fl.Module] = [ResidualBlock(previous + skips.pop(), width, device=device, dtype=dtype)]
                if topology.attention_levels[level]:
                    layers.append(topology.cross_attention(level, device, dtype))
                if index == topology.layers_per_block and level > 0:
                    layers.append(fl.Upsample(width, device=device, dtype=dtype))
                blocks.append(fl.Chain(layers))
                previous = width
        super().__init__(blocks)


class OutputBlock(fl.Chain):
    """`Conv(SiLU(GroupNorm(x)))`: from the first width back to the latent channels.

    Args:
        channels: Channels of the input.
        out_channels: Channels of the output (the latents').
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        channels: int = 320,
        out_channels: int = 4,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = channels
        self.out_channels = out_channels
        super().__init__(
            fl.GroupNorm(channels, 32, eps=1e-5, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Conv2d(channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
        )


class ResidualAccumulator(fl.ContextModule):
    """Keep the input as the `n`-th skip connection (in `UNET_CONTEXT[RESIDUALS_KEY]`), and pass it through.

    The list is replaced, not changed in place: its default value stays empty of tensors, so nothing of a forward
    is kept alive after it.

    Args:
        n: The index of the skip connection.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: Tensor) -> Tensor:
        context = self.use_context(UNET_CONTEXT)
        residuals = list(lookup_key(context, UNET_CONTEXT, RESIDUALS_KEY))
        residuals[self.n] = x
        context[RESIDUALS_KEY] = residuals
        return x


class ResidualConcatenator(fl.Concatenate):
    """Concatenate the `n`-th skip connection to the input, along the channels: `cat([x, residuals[n]], dim=1)`.

    Args:
        n: The index of the skip connection.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        super().__init__(
            fl.Identity(),
            # A lambda, not `operator.itemgetter(n)`: torch.compile cannot trace the latter without a graph break.
            fl.UseContext(UNET_CONTEXT, RESIDUALS_KEY).compose(lambda residuals: residuals[n]),
            dim=1,
        )


class UNet(fl.Chain):
    """A Stable Diffusion UNet laid out by a `UNetTopology`: predicts the noise of `(batch, in_channels, h, w)` latents.

    A `TimestepEncoder` embeds the timestep, `DownBlocks`, a `MiddleBlock` and `UpBlocks` follow, joined by the skip
    connections (`ResidualAccumulator`, `ResidualConcatenator`), and an `OutputBlock` predicts the noise. Each
    residual block's first convolution is wrapped in a `RangeAdapter2d`, which adds the timestep embedding to it.
    The families subclass it with their sizes and side inputs (`SD1UNet`, `SDXLUNet`).

    Args:
        in_channels: Channels of the latents.
        topology: The UNet's shape.
        device: Where the weights live.
        dtype: The weights' dtype.
        guidance_embedding_dim: For a UNet distilled from classifier-free guidance (LCM), the number of features of
            the guidance scale it takes as an input (diffusers' `time_cond_proj_dim`, see `set_guidance_scale`).
    """

    repeated_blocks: ClassVar[tuple[type[fl.Module], ...]] = (CrossAttentionBlock,)
    """What `refiners.fluxion.compilation.compile_repeated_blocks` compiles: the transformer layers (diffusers'
    `BasicTransformerBlock`, the `_repeated_blocks` of its UNet), 16 in SD1 and 70 in SDXL, of 3 and 2 widths."""

    def __init__(
        self,
        in_channels: int,
        topology: UNetTopology,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        guidance_embedding_dim: int | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.topology = topology
        self.guidance_embedding_dim = guidance_embedding_dim
        self._num_skips = len(topology.skip_channels)
        first = topology.channels[0]
        timestep_embedding_dim = 4 * first
        super().__init__(
            TimestepEncoder(first, timestep_embedding_dim, device=device, dtype=dtype),
            DownBlocks(in_channels, topology, device=device, dtype=dtype),
            MiddleBlock(topology, device=device, dtype=dtype),
            UpBlocks(topology, device=device, dtype=dtype),
            OutputBlock(first, 4, device=device, dtype=dtype),
        )
        if guidance_embedding_dim is not None:
            range_encoder = self.ensure_find(RangeEncoder)
            range_encoder.insert(2, GuidanceEmbedding(guidance_embedding_dim, first, device=device, dtype=dtype))
        for residual_block in self.layers(ResidualBlock):
            chain = residual_block.layer("Chain", fl.Chain)
            RangeAdapter2d(
                target=chain.layer("Conv2d_1", fl.Conv2d),
                channels=residual_block.out_channels,
                embedding_dim=timestep_embedding_dim,
                device=device,
                dtype=dtype,
            ).inject(chain)
        down_blocks = self.layer("DownBlocks", DownBlocks)
        up_blocks = self.layer("UpBlocks", UpBlocks)
        for n, block in enumerate(down_blocks.layers(fl.Chain)):
            block.append(ResidualAccumulator(n))
        for n, block in enumerate(up_blocks.layers(fl.Chain)):
            block.insert(0, ResidualConcatenator(len(down_blocks) - 1 - n))

    def extra_diffusers_modules(self) -> list[tuple[str, fl.WeightedModule]]:
        """The layers of this UNet outside the common blocks, by their diffusers names (see `unet_names`)."""
        return []

    def extra_original_modules(self) -> list[tuple[str, str]]:
        """The `(original, diffusers)` paths of the modules outside the common blocks (see `unet_renaming`)."""
        return []

    @property
    def context_embedding_dim(self) -> int:
        """Size of the text embedding the transformers attend to."""
        return self.topology.context_embedding_dim

    def init_context(self) -> Contexts:
        return {
            UNET_CONTEXT: {RESIDUALS_KEY: [None] * self._num_skips},
            TIMESTEP_CONTEXT: {},
            RANGE_ADAPTER_CONTEXT: {TIMESTEP_EMBEDDING_KEY: None},
            CROSS_ATTENTION_CONTEXT: {},
        }

    def set_timestep(self, timestep: Tensor | int | float) -> None:
        """Set the timestep of the next forwards: a scalar, or a `(batch,)` tensor with one per batch element.

        Args:
            timestep: The diffusion timestep(s), e.g. `solver.timesteps[step]`.
        """
        if not isinstance(timestep, Tensor):
            timestep = torch.tensor([timestep])
        if timestep.dim() > 1:
            raise ValueError(
                f"the timestep must be a scalar or a (batch,) tensor (one per batch element), got shape "
                f"{tuple(timestep.shape)}"
            )
        self.set_context(TIMESTEP_CONTEXT, {TIMESTEP_KEY: timestep})

    def set_guidance_scale(self, guidance_scale: Tensor | float) -> None:
        """Set the guidance scale of the next forwards, for a UNet that embeds it (LCM's, `guidance_embedding_dim`).

        Args:
            guidance_scale: The classifier-free guidance scale the UNet imitates (diffusers' `guidance_scale`: the
                UNet sees `guidance_scale - 1`), a scalar or one per batch element.
        """
        if self.guidance_embedding_dim is None:
            raise ValueError(
                f"this {type(self).__name__} has no guidance embedding (only guidance-distilled UNets such as LCM's "
                "take the guidance scale as an input): classifier-free guidance is the pipeline's condition_scale"
            )
        if not isinstance(guidance_scale, Tensor):
            guidance_scale = torch.tensor([float(guidance_scale)])
        self.set_context(TIMESTEP_CONTEXT, {GUIDANCE_SCALE_KEY: guidance_scale})

    def set_clip_text_embedding(self, clip_text_embedding: Tensor) -> None:
        """Set the text embedding the cross-attentions attend to in the next forwards.

        Args:
            clip_text_embedding: `(batch, sequence, context_embedding_dim)`: the text encoder's output, e.g.
                `(2, 77, 768)` for SD1 with a negative and a positive prompt (classifier-free guidance).
        """
        if clip_text_embedding.dim() != 3 or clip_text_embedding.shape[-1] != self.context_embedding_dim:
            raise ValueError(
                f"the CLIP text embedding must be (batch, sequence, {self.context_embedding_dim}), got shape "
                f"{tuple(clip_text_embedding.shape)}. Pass the output of this model's text encoder."
            )
        self.set_context(CROSS_ATTENTION_CONTEXT, {CLIP_TEXT_EMBEDDING_KEY: clip_text_embedding})
