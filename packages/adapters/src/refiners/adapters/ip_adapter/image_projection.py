"""IP-Adapter's image projections: a CLIP image embedding to a few tokens that the UNet's cross-attentions attend to.

`ImageProjection` is the base IP-Adapter's (one Linear from the projected CLIP embedding to `num_tokens` tokens, then a
LayerNorm); `PerceiverResampler` is IP-Adapter plus' (learned query tokens that attend, layer after layer, to the
penultimate hidden states of the CLIP image encoder and to themselves, as in Flamingo's Perceiver resampler);
`FaceIDImageProjection` is IP-Adapter FaceID's (a face recognition embedding, not a CLIP one, through a two-layer MLP).
"""

import torch

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts

__all__ = [
    "PERCEIVER_CONTEXT",
    "ImageProjection",
    "FaceIDImageProjection",
    "LatentTokens",
    "PerceiverAttention",
    "PerceiverLayer",
    "PerceiverResampler",
]

PERCEIVER_CONTEXT = "perceiver_resampler"
"""Where `PerceiverResampler` keeps its projected input (key `x`) for the attentions of its layers."""

Device = torch.device | str | None


class ImageProjection(fl.Chain):
    """`(batch, clip_image_embedding_dim)` to `(batch, num_tokens, clip_text_embedding_dim)`: Linear, then LayerNorm.

    Args:
        clip_image_embedding_dim: Size of the CLIP image embedding (the image encoder's `output_dim`).
        clip_text_embedding_dim: Size of the tokens (the UNet's cross-attention context).
        num_tokens: Number of tokens per image.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        clip_image_embedding_dim: int,
        clip_text_embedding_dim: int,
        num_tokens: int = 4,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.clip_image_embedding_dim = clip_image_embedding_dim
        self.clip_text_embedding_dim = clip_text_embedding_dim
        self.num_tokens = num_tokens
        super().__init__(
            fl.Linear(clip_image_embedding_dim, num_tokens * clip_text_embedding_dim, device=device, dtype=dtype),
            fl.Reshape(num_tokens, clip_text_embedding_dim),
            fl.LayerNorm(clip_text_embedding_dim, device=device, dtype=dtype),
        )


class FaceIDImageProjection(fl.Chain):
    """`(batch, face_embedding_dim)` to `(batch, num_tokens, clip_text_embedding_dim)`: Linear, GeLU, Linear, then
    LayerNorm (the original `MLPProjModel`; diffusers' `IPAdapterFaceIDImageProjection`).

    Args:
        face_embedding_dim: Size of the face embedding (512 for insightface's `normed_embedding`).
        clip_text_embedding_dim: Size of the tokens (the UNet's cross-attention context).
        num_tokens: Number of tokens per face.
        hidden_dim: Width of the MLP (twice the face embedding in the released files).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        face_embedding_dim: int,
        clip_text_embedding_dim: int,
        num_tokens: int = 4,
        hidden_dim: int = 1024,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.face_embedding_dim = face_embedding_dim
        self.clip_text_embedding_dim = clip_text_embedding_dim
        self.num_tokens = num_tokens
        self.hidden_dim = hidden_dim
        super().__init__(
            fl.Linear(face_embedding_dim, hidden_dim, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Linear(hidden_dim, num_tokens * clip_text_embedding_dim, device=device, dtype=dtype),
            fl.Reshape(num_tokens, clip_text_embedding_dim),
            fl.LayerNorm(clip_text_embedding_dim, device=device, dtype=dtype),
        )


class LatentTokens(fl.Parameter):
    """The resampler's learned query tokens, `(batch, num_tokens, embedding_dim)` (the input only gives the batch)."""

    def __init__(self, num_tokens: int, embedding_dim: int, device: Device = None, dtype: torch.dtype | None = None):
        super().__init__(num_tokens, embedding_dim, device=device, dtype=dtype)


class PerceiverAttention(fl.Chain):
    """The latent tokens attend to the image features and to themselves: keys and values of both, queries of theirs.

    Input: the latent tokens `(batch, num_tokens, embedding_dim)`; the image features are read from
    `PERCEIVER_CONTEXT`. Each is normalized by its own LayerNorm first.

    Args:
        embedding_dim: Size of the tokens.
        num_heads: Number of heads.
        head_dim: Size of a head (64 in IP-Adapter).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        head_dim: int = 64,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner_dim = num_heads * head_dim
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    fl.UseContext(PERCEIVER_CONTEXT, "x"), fl.LayerNorm(embedding_dim, device=device, dtype=dtype)
                ),
                fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
            ),
            fl.Parallel(
                fl.Chain(fl.GetArg(1), fl.Linear(embedding_dim, inner_dim, bias=False, device=device, dtype=dtype)),
                fl.Chain(
                    fl.Concatenate(fl.GetArg(0), fl.GetArg(1), dim=1),
                    fl.Linear(embedding_dim, inner_dim, bias=False, device=device, dtype=dtype),
                ),
                fl.Chain(
                    fl.Concatenate(fl.GetArg(0), fl.GetArg(1), dim=1),
                    fl.Linear(embedding_dim, inner_dim, bias=False, device=device, dtype=dtype),
                ),
            ),
            fl.ScaledDotProductAttention(num_heads=num_heads),
            fl.Linear(inner_dim, embedding_dim, bias=False, device=device, dtype=dtype),
        )


class PerceiverLayer(fl.Chain):
    """`x + attention(x)`, then `x + feedforward(x)` (LayerNorm, Linear, GeLU, Linear; no biases).

    Args:
        embedding_dim: Size of the tokens.
        num_heads: Number of heads.
        feedforward_ratio: Hidden size of the feed-forward block, relative to `embedding_dim`.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        feedforward_ratio: int = 4,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        hidden = embedding_dim * feedforward_ratio
        super().__init__(
            fl.Residual(PerceiverAttention(embedding_dim, num_heads, device=device, dtype=dtype)),
            fl.Residual(
                fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
                fl.Linear(embedding_dim, hidden, bias=False, device=device, dtype=dtype),
                fl.GeLU(),
                fl.Linear(hidden, embedding_dim, bias=False, device=device, dtype=dtype),
            ),
        )


class PerceiverResampler(fl.Chain):
    """IP-Adapter plus' projection: `(batch, sequence, input_dim)` image features to `(batch, num_tokens, output_dim)`.

    Args:
        embedding_dim: Width of the resampler.
        input_dim: Size of the image features (the CLIP image encoder's width: its penultimate hidden states).
        output_dim: Size of the tokens (the UNet's cross-attention context).
        num_layers: Number of layers.
        num_heads: Number of heads (of 64).
        num_tokens: Number of query tokens, i.e. of output tokens per image.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        input_dim: int,
        output_dim: int,
        num_layers: int = 4,
        num_heads: int = 12,
        num_tokens: int = 16,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_tokens = num_tokens
        super().__init__(
            fl.Linear(input_dim, embedding_dim, device=device, dtype=dtype),
            fl.SetContext(PERCEIVER_CONTEXT, "x"),
            LatentTokens(num_tokens, embedding_dim, device=device, dtype=dtype),
            *(PerceiverLayer(embedding_dim, num_heads, device=device, dtype=dtype) for _ in range(num_layers)),
            fl.Linear(embedding_dim, output_dim, device=device, dtype=dtype),
            fl.LayerNorm(output_dim, device=device, dtype=dtype),
        )

    def init_context(self) -> Contexts:
        return {PERCEIVER_CONTEXT: {"x": None}}
