"""The pieces shared by CLIP's text and image towers: position embeddings and the pre-norm transformer layer."""

from typing import Literal

import torch
from torch import Tensor

import refiners.fluxion.layers as fl

__all__ = ["GeLUApproximation", "PositionalEncoder", "FeedForward", "TransformerLayer"]

GeLUApproximation = Literal["none", "tanh", "quick"]
"""The GeLU variants of `fl.GeLU`: OpenAI's CLIP uses `"quick"`, OpenCLIP's `"none"` (exact)."""


class PositionalEncoder(fl.Embedding):
    """Learned absolute position embeddings: `(batch, sequence, ...)` in, `(1, sequence, embedding_dim)` out.

    Only the sequence length of the input is read (dimension 1: token ids, or patch embeddings), so the output is
    meant to be summed with the input's own embeddings (e.g. in a `fl.Sum` next to a `TokenEncoder`).

    Args:
        max_sequence_length: Number of positions.
        embedding_dim: Size of each position embedding.
        device: Where the table lives.
        dtype: The table's dtype.
    """

    def __init__(
        self,
        max_sequence_length: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings=max_sequence_length, embedding_dim=embedding_dim, device=device, dtype=dtype)
        self.max_sequence_length = max_sequence_length

    def forward(self, input: Tensor) -> Tensor:
        sequence_length = input.shape[1]
        if sequence_length > self.max_sequence_length:
            raise ValueError(
                f"the sequence has {sequence_length} positions but the model has embeddings for "
                f"{self.max_sequence_length}: truncate it (a CLIPTokenizer does, to its sequence_length)."
            )
        return self.weight[:sequence_length].unsqueeze(0)


class FeedForward(fl.Chain):
    """The transformer's position-wise MLP: `Linear -> GeLU -> Linear`.

    Args:
        embedding_dim: Input and output size.
        feedforward_dim: Hidden size.
        gelu_approximation: The GeLU variant (`"quick"` for OpenAI's CLIP, `"none"` for OpenCLIP's).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        feedforward_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        gelu_approximation: GeLUApproximation = "none",
    ) -> None:
        self.embedding_dim = embedding_dim
        self.feedforward_dim = feedforward_dim
        self.gelu_approximation = gelu_approximation
        super().__init__(
            fl.Linear(embedding_dim, feedforward_dim, device=device, dtype=dtype),
            fl.GeLU(approximation=gelu_approximation),
            fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
        )


class TransformerLayer(fl.Chain):
    """A pre-norm transformer layer: `x + attention(norm(x))`, then `x + feedforward(norm(x))`.

    Args:
        embedding_dim: Size of the sequence's embeddings.
        feedforward_dim: Hidden size of the feed-forward block.
        num_attention_heads: Number of attention heads; it must divide `embedding_dim`.
        layer_norm_eps: The LayerNorms' epsilon.
        device: Where the weights live.
        dtype: The weights' dtype.
        gelu_approximation: The GeLU variant of the feed-forward block (see `FeedForward`); keyword only, as is
            `is_causal` (the positional order is the original Refiners').
        is_causal: Mask the attention so that each position only sees itself and earlier ones (CLIP's text tower).
    """

    def __init__(
        self,
        embedding_dim: int,
        feedforward_dim: int,
        num_attention_heads: int,
        layer_norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        gelu_approximation: GeLUApproximation = "none",
        is_causal: bool = False,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.feedforward_dim = feedforward_dim
        self.num_attention_heads = num_attention_heads
        self.layer_norm_eps = layer_norm_eps
        self.gelu_approximation = gelu_approximation
        self.is_causal = is_causal
        super().__init__(
            fl.Residual(
                fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
                fl.SelfAttention(
                    embedding_dim,
                    num_heads=num_attention_heads,
                    is_causal=is_causal,
                    device=device,
                    dtype=dtype,
                ),
            ),
            fl.Residual(
                fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
                FeedForward(
                    embedding_dim, feedforward_dim, device=device, dtype=dtype, gelu_approximation=gelu_approximation
                ),
            ),
        )
