"""The transformer of the Stable Diffusion UNet: attention over a feature map's positions, and to a text embedding.

`CrossAttentionBlock2d` is diffusers' `Transformer2DModel` (1x1 convolutions around the transformer, as in SD1.5, or
Linears with `use_linear_projection`, as in SDXL; one or several transformer layers), and `CrossAttentionBlock` its
`BasicTransformerBlock`. The conditioning (e.g. the CLIP text embedding) is read from the
context `CROSS_ATTENTION_CONTEXT`, under a key given to each block.

The map goes to a sequence and back with the very reshapes diffusers does (`ImageToTokens`, `TokensToImage`), so
each layer gets its input in the same memory layout as in diffusers and runs the same kernels.
"""

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts

__all__ = [
    "CROSS_ATTENTION_CONTEXT",
    "TOKENS_SHAPE_CONTEXT",
    "ImageToTokens",
    "TokensToImage",
    "CrossAttentionBlock",
    "CrossAttentionBlock2d",
]

CROSS_ATTENTION_CONTEXT = "cross_attention_block"
"""The context holding the conditioning sequences that cross-attention attends to, one key per conditioning."""

TOKENS_SHAPE_CONTEXT = "image_to_tokens"
"""Where `ImageToTokens` leaves the height and width that `TokensToImage` restores."""


class ImageToTokens(fl.ContextModule):
    """`(batch, channels, height, width)` to a `(batch, height * width, channels)` sequence, channels last in memory.

    The height and width are left in the context `TOKENS_SHAPE_CONTEXT` for `TokensToImage`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a (batch, channels, height, width) tensor, got shape {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        self.set_context(TOKENS_SHAPE_CONTEXT, {"height": height, "width": width})
        # A copy, channels last: the LayerNorms and Linears that follow then read contiguous rows.
        return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)


class TokensToImage(fl.ContextModule):
    """A `(batch, height * width, channels)` sequence back to a contiguous `(batch, channels, height, width)` map.

    The height and width are those left by the last `ImageToTokens` of the forward.
    """

    def forward(self, x: Tensor) -> Tensor:
        context = self.use_context(TOKENS_SHAPE_CONTEXT)
        height, width = context.get("height"), context.get("width")
        if height is None or width is None:
            raise ValueError(
                "TokensToImage found no height and width to restore: an ImageToTokens must run before it in the "
                "same forward."
            )
        batch, _, channels = x.shape
        # Contiguous channels-first, so the 1x1 convolution that follows runs on the usual layout.
        return x.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


class CrossAttentionBlock(fl.Chain):
    """A pre-norm transformer layer with cross-attention: self-attention, cross-attention, then a GEGLU MLP.

    Each step is `x + f(LayerNorm(x))` on a `(batch, sequence, embedding_dim)` input. The cross-attention's keys and
    values come from `CROSS_ATTENTION_CONTEXT[context_key]`, a `(batch, context_sequence, context_embedding_dim)`
    tensor.

    Args:
        embedding_dim: Size of the input's embeddings.
        context_embedding_dim: Size of the conditioning's embeddings.
        context_key: The conditioning's key in `CROSS_ATTENTION_CONTEXT`.
        num_heads: Number of attention heads; it must divide `embedding_dim`.
        use_bias: Whether the query, key and value projections have a bias (Stable Diffusion's do not).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        context_embedding_dim: int,
        context_key: str,
        num_heads: int = 1,
        use_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.context_embedding_dim = context_embedding_dim
        self.context_key = context_key
        self.num_heads = num_heads
        self.use_bias = use_bias
        super().__init__(
            fl.Residual(
                fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
                fl.SelfAttention(embedding_dim, num_heads=num_heads, use_bias=use_bias, device=device, dtype=dtype),
            ),
            fl.Residual(
                fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
                fl.Parallel(
                    fl.Identity(),
                    fl.UseContext(CROSS_ATTENTION_CONTEXT, context_key),
                    fl.UseContext(CROSS_ATTENTION_CONTEXT, context_key),
                ),
                fl.Attention(
                    embedding_dim,
                    num_heads=num_heads,
                    key_embedding_dim=context_embedding_dim,
                    value_embedding_dim=context_embedding_dim,
                    use_bias=use_bias,
                    device=device,
                    dtype=dtype,
                ),
            ),
            fl.Residual(
                fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
                # GEGLU: one Linear gives the values and the gates, `values * gelu(gates)`.
                fl.Linear(embedding_dim, 2 * 4 * embedding_dim, device=device, dtype=dtype),
                fl.GLU(fl.GeLU()),
                fl.Linear(4 * embedding_dim, embedding_dim, device=device, dtype=dtype),
            ),
        )


class CrossAttentionBlock2d(fl.Residual):
    """A transformer over the positions of a `(batch, channels, height, width)` map, conditioned by cross-attention.

    `x + proj_out(transformer(proj_in(GroupNorm(x))))`, where the transformer (`num_attention_layers` `CrossAttentionBlock`s)
    runs on the `(batch, height * width, channels)` sequence of positions, and the projections are 1x1 convolutions
    on the map (SD1) or Linears on the sequence (`use_linear_projection`, SDXL).

    Args:
        channels: Number of channels of the map (the transformer's embedding size).
        context_embedding_dim: Size of the conditioning's embeddings.
        context_key: The conditioning's key in `CROSS_ATTENTION_CONTEXT`.
        num_attention_heads: Number of attention heads; it must divide `channels`.
        num_attention_layers: Number of transformer layers (diffusers' `transformer_layers_per_block`).
        num_groups: Number of groups of the GroupNorm; it must divide `channels`.
        use_bias: Whether the attention's query, key and value projections have a bias.
        use_linear_projection: Project in and out with Linears on the sequence instead of 1x1 convolutions.
        device: Where the weights live.
        dtype: The weights' dtype.

    The positional order is the original Refiners'.
    """

    def __init__(
        self,
        channels: int,
        context_embedding_dim: int,
        context_key: str,
        num_attention_heads: int = 1,
        num_attention_layers: int = 1,
        num_groups: int = 32,
        use_bias: bool = True,
        use_linear_projection: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if num_attention_layers < 1:
            raise ValueError(
                f"CrossAttentionBlock2d needs at least one transformer layer, got num_attention_layers={num_attention_layers}"
            )
        self.channels = channels
        self.context_embedding_dim = context_embedding_dim
        self.context_key = context_key
        self.num_attention_heads = num_attention_heads
        self.num_groups = num_groups
        self.use_bias = use_bias
        self.num_attention_layers = num_attention_layers
        self.use_linear_projection = use_linear_projection
        transformer = [
            CrossAttentionBlock(
                channels,
                context_embedding_dim,
                context_key,
                num_heads=num_attention_heads,
                use_bias=use_bias,
                device=device,
                dtype=dtype,
            )
            for _ in range(num_attention_layers)
        ]
        norm = fl.GroupNorm(channels, num_groups, eps=1e-6, device=device, dtype=dtype)
        if use_linear_projection:
            super().__init__(
                norm,
                ImageToTokens(),
                fl.Linear(channels, channels, device=device, dtype=dtype),
                *transformer,
                fl.Linear(channels, channels, device=device, dtype=dtype),
                TokensToImage(),
            )
        else:
            super().__init__(
                norm,
                fl.Conv2d(channels, channels, kernel_size=1, device=device, dtype=dtype),
                ImageToTokens(),
                *transformer,
                TokensToImage(),
                fl.Conv2d(channels, channels, kernel_size=1, device=device, dtype=dtype),
            )

    def init_context(self) -> Contexts:
        return {TOKENS_SHAPE_CONTEXT: {"height": None, "width": None}}
