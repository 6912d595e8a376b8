"""Multi-head attention: the scaled dot-product itself, and the Chains that project inputs around it."""

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from refiners.fluxion.context import Contexts
from refiners.fluxion.layers.basics import Identity
from refiners.fluxion.layers.chain import Chain
from refiners.fluxion.layers.combinators import Distribute, Parallel
from refiners.fluxion.layers.linear import Linear
from refiners.fluxion.layers.module import ContextModule, Module

__all__ = [
    "ScaledDotProductAttention",
    "Attention",
    "SelfAttention",
    "SelfAttention2d",
    "SpatialToSequence",
    "SequenceToSpatial",
    "SPATIAL_SHAPE_CONTEXT",
]

SPATIAL_SHAPE_CONTEXT = "reshape"
"""The context where `SpatialToSequence` leaves the height and width that `SequenceToSpatial` restores."""


class ScaledDotProductAttention(Module):
    """`softmax(Q K^T / sqrt(d)) V` for each head, on `(batch, sequence, embedding)` inputs.

    The embeddings are split into `num_heads` heads, attended with `torch.nn.functional.scaled_dot_product_attention`,
    and the heads merged back: the output is `(batch, query_sequence, value_embedding)`.

    Args:
        num_heads: Number of heads; it must divide the embedding sizes of the inputs.
        is_causal: Mask the attention so that query `i` only sees keys `0..i` (top-left aligned, as torch does).
        is_optimized: Use torch's fused kernels; when False, compute the softmax explicitly (slower, but every step
            is a plain op, which helps to debug or export).
        slice_size: If set, attend to the queries `slice_size` at a time: the attention matrix is never larger than
            `(batch, heads, slice_size, key_sequence)`, which caps memory for long sequences.
    """

    def __init__(
        self,
        num_heads: int = 1,
        is_causal: bool = False,
        is_optimized: bool = True,
        slice_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"ScaledDotProductAttention needs at least one head, got num_heads={num_heads}")
        if slice_size is not None and slice_size < 1:
            raise ValueError(f"slice_size must be at least 1 (or None not to slice), got {slice_size}")
        self.num_heads = num_heads
        self.is_causal = is_causal
        self.is_optimized = is_optimized
        self.slice_size = slice_size

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        self._check_inputs(query, key, value)
        query, key, value = self.split_heads(query), self.split_heads(key), self.split_heads(value)
        if self.slice_size is None:
            # Not a loop over one slice: `range` over the sequence length would make torch.compile specialize the
            # graph to that length (one graph per image size).
            return self.merge_heads(self._attend(query, key, value, query_offset=0))
        num_queries = query.shape[2]
        outputs = [
            self._attend(query[:, :, start : start + self.slice_size], key, value, query_offset=start)
            for start in range(0, num_queries, self.slice_size)
        ]
        return self.merge_heads(outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2))

    def split_heads(self, x: Tensor) -> Tensor:
        """`(batch, sequence, heads * dim)` to `(batch, heads, sequence, dim)`."""
        batch, sequence, embedding = x.shape
        return x.reshape(batch, sequence, self.num_heads, embedding // self.num_heads).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """`(batch, heads, sequence, dim)` to `(batch, sequence, heads * dim)`."""
        batch, heads, sequence, dim = x.shape
        return x.transpose(1, 2).reshape(batch, sequence, heads * dim)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, query_offset: int) -> Tensor:
        mask: Tensor | None = None
        if self.is_causal and (query_offset > 0 or not self.is_optimized):
            # A slice of queries starting at `query_offset` keeps its rows of the full causal mask: key j is
            # visible to query i when j <= i + query_offset.
            mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
            mask = mask.tril(diagonal=query_offset)
        if self.is_optimized:
            return scaled_dot_product_attention(
                query, key, value, attn_mask=mask, is_causal=self.is_causal and mask is None
            )
        scores = (query @ key.transpose(-2, -1)) / math.sqrt(query.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ value

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3:
                raise ValueError(
                    f"ScaledDotProductAttention takes (batch, sequence, embedding) tensors, but the {name} has shape "
                    f"{tuple(x.shape)}. Flatten the other dimensions into the sequence first (e.g. `fl.Flatten`)."
                )
            if x.shape[-1] % self.num_heads != 0:
                raise ValueError(
                    f"the {name} embedding size {x.shape[-1]} cannot be split into {self.num_heads} heads: it must "
                    f"be a multiple of num_heads."
                )
        if query.shape[-1] != key.shape[-1]:
            raise ValueError(
                f"query and key must have the same embedding size, got {query.shape[-1]} and {key.shape[-1]}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(
                f"key and value must have the same sequence length (one value per key), got {key.shape[1]} and "
                f"{value.shape[1]}"
            )


class Attention(Chain):
    """Multi-head attention: project query, key and value, attend, and project the result back.

    Takes three inputs, `(query, key, value)`, each `(batch, sequence, embedding)`; e.g. after
    `fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity())` for self-attention, or with `fl.UseContext` giving key
    and value for cross-attention. The state-dict keys are `Distribute.Linear_{1,2,3}` (query, key, value
    projections) and `Linear` (output projection).

    Args:
        embedding_dim: Embedding size of the query, and of the output.
        num_heads: Number of heads; it must divide `inner_dim`.
        key_embedding_dim: Embedding size of the key (default: `embedding_dim`).
        value_embedding_dim: Embedding size of the value (default: `embedding_dim`).
        inner_dim: Size of the projected query, key and value (default: `embedding_dim`).
        use_bias: Whether the query, key and value projections have a bias. The output projection always has one,
            as in Stable Diffusion's attention (`to_out`), which has no bias on `to_q`, `to_k`, `to_v`.
        is_causal: Causal masking (see `ScaledDotProductAttention`).
        is_optimized: Use torch's fused attention kernels (see `ScaledDotProductAttention`).
        device: Where the weights live.
        dtype: The weights' dtype.

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl

        # Self-attention with a skip connection, as in a transformer encoder.
        block = fl.Residual(
            fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity()),
            fl.Attention(embedding_dim=64, num_heads=4),
        )
        assert block(torch.randn(2, 10, 64)).shape == (2, 10, 64)
        ```
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int = 1,
        key_embedding_dim: int | None = None,
        value_embedding_dim: int | None = None,
        inner_dim: int | None = None,
        use_bias: bool = True,
        is_causal: bool = False,
        is_optimized: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.key_embedding_dim = key_embedding_dim or embedding_dim
        self.value_embedding_dim = value_embedding_dim or embedding_dim
        self.inner_dim = inner_dim or embedding_dim
        self.use_bias = use_bias
        self.is_causal = is_causal
        self.is_optimized = is_optimized
        if self.inner_dim % num_heads != 0:
            raise ValueError(
                f"Attention splits its inner dimension into heads: inner_dim={self.inner_dim} is not a multiple of "
                f"num_heads={num_heads}."
            )
        super().__init__(
            Distribute(
                Linear(embedding_dim, self.inner_dim, bias=use_bias, device=device, dtype=dtype),
                Linear(self.key_embedding_dim, self.inner_dim, bias=use_bias, device=device, dtype=dtype),
                Linear(self.value_embedding_dim, self.inner_dim, bias=use_bias, device=device, dtype=dtype),
            ),
            ScaledDotProductAttention(num_heads=num_heads, is_causal=is_causal, is_optimized=is_optimized),
            Linear(self.inner_dim, embedding_dim, bias=True, device=device, dtype=dtype),
        )

    def basic_attributes(self) -> dict[str, Any]:
        # Sizes that default to embedding_dim are noise in a repr: show them only when they differ.
        return {
            name: value
            for name, value in super().basic_attributes().items()
            if not (name.endswith("_dim") and name != "embedding_dim" and value == self.embedding_dim)
        }


class SelfAttention(Attention):
    """Attention of a sequence to itself: one input `x`, used as query, key and value.

    Args:
        embedding_dim: Embedding size of the input and output.
        inner_dim: Size of the projected query, key and value (default: `embedding_dim`).
        num_heads: Number of heads; it must divide `inner_dim`.
        use_bias: Whether the query, key and value projections have a bias (see `Attention`).
        is_causal: Causal masking (see `ScaledDotProductAttention`).
        is_optimized: Use torch's fused attention kernels.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        inner_dim: int | None = None,
        num_heads: int = 1,
        use_bias: bool = True,
        is_causal: bool = False,
        is_optimized: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            inner_dim=inner_dim,
            use_bias=use_bias,
            is_causal=is_causal,
            is_optimized=is_optimized,
            device=device,
            dtype=dtype,
        )
        self.insert(0, Parallel(Identity(), Identity(), Identity()))


class SpatialToSequence(ContextModule):
    """`(batch, channels, height, width)` to `(batch, height * width, channels)`; the height and width are left in the
    context `SPATIAL_SHAPE_CONTEXT` for `SequenceToSpatial`."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a (batch, channels, height, width) tensor, got shape {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        self.set_context(SPATIAL_SHAPE_CONTEXT, {"height": height, "width": width})
        return x.reshape(batch, channels, height * width).transpose(1, 2)


class SequenceToSpatial(ContextModule):
    """`(batch, height * width, channels)` back to `(batch, channels, height, width)`, with the height and width
    that `SpatialToSequence` left in the context `SPATIAL_SHAPE_CONTEXT`."""

    def forward(self, x: Tensor) -> Tensor:
        context = self.use_context(SPATIAL_SHAPE_CONTEXT)
        height, width = context.get("height"), context.get("width")
        if height is None or width is None:
            raise ValueError(
                "SequenceToSpatial found no height and width to restore: a SpatialToSequence must run before it in "
                "the same forward."
            )
        batch, _, channels = x.shape
        return x.transpose(1, 2).reshape(batch, channels, height, width)


class SelfAttention2d(SelfAttention):
    """Self-attention over the positions of a `(batch, channels, height, width)` feature map.

    The map is flattened to a `(batch, height * width, channels)` sequence, attended, and reshaped back.

    Args:
        channels: Number of channels (the embedding size of the attention).
        num_heads: Number of heads; it must divide `channels`.
        use_bias: Whether the query, key and value projections have a bias (see `Attention`).
        is_causal: Causal masking over the flattened positions (see `ScaledDotProductAttention`).
        is_optimized: Use torch's fused attention kernels.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        use_bias: bool = True,
        is_causal: bool = False,
        is_optimized: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = channels
        super().__init__(
            embedding_dim=channels,
            num_heads=num_heads,
            use_bias=use_bias,
            is_causal=is_causal,
            is_optimized=is_optimized,
            device=device,
            dtype=dtype,
        )
        self.insert(0, SpatialToSequence())
        self.append(SequenceToSpatial())

    def init_context(self) -> Contexts:
        return {SPATIAL_SHAPE_CONTEXT: {"height": None, "width": None}}
