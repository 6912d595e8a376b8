"""SAM's mask decoder: a two-way transformer between prompt tokens and the image embedding, then masks and their
predicted IoU.

The decoder takes the sparse prompt tokens `(batch, points, dim)` (one row per prompt) and reads the rest from the
context `MASK_DECODER_CONTEXT`: the image embedding `(1, dim, h, w)`, the dense prompt embedding (a mask prompt's,
or `NoMaskEmbedding`'s) and the image's position features. Learned output tokens (one for the IoU, one per mask)
are put before the prompt tokens; the transformer updates tokens and image tokens in turn (self-attention of the
tokens, tokens to image, MLP, image to tokens); each mask token then goes through its own MLP (a hypernetwork) into
weights for the upscaled image embedding, and the IoU token into one score per mask. It outputs
`(low_res_masks, iou_predictions)`: `(batch, masks, 4h, 4w)` logits and `(batch, masks)`, all the masks or only the
first (key `multimask_output` of the context, see `MaskSelection`).
"""

from typing import Any

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts

__all__ = [
    "MASK_DECODER_CONTEXT",
    "IoUToken",
    "MaskTokens",
    "ImageTokens",
    "QueriesWithPositions",
    "KeysWithPositions",
    "TokenSelfAttention",
    "TokenToImageAttention",
    "TokenFeedForward",
    "ImageToTokenAttention",
    "TwoWayAttentionBlock",
    "TwoWayTransformer",
    "KeysToGrid",
    "MasksToGrid",
    "MaskUpscaling",
    "Hypernetworks",
    "MaskPrediction",
    "IoUPrediction",
    "MaskSelection",
    "MaskDecoder",
]

MASK_DECODER_CONTEXT = "segment_anything"
"""The context the mask decoder reads: `image_embedding`, `dense_embedding`, `dense_positional_embedding` and
`multimask_output` (set by `SegmentAnything.predict`), and, during a forward, `query_positions` and
`key_positions`."""


class IoUToken(fl.Parameter):
    """The learned output token of the IoU prediction, `(batch, 1, dim)`.

    Args:
        embedding_dim: Width of the token.
        device: Where the weight lives.
        dtype: The weight's dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(1, embedding_dim, device=device, dtype=dtype)


class MaskTokens(fl.Parameter):
    """The learned output tokens of the masks, `(batch, num_tokens, dim)`: the single-mask token, then one per mask
    of the multimask output.

    Args:
        embedding_dim: Width of the tokens.
        num_tokens: Number of mask tokens (SAM: 4).
        device: Where the weight lives.
        dtype: The weight's dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_tokens: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_tokens, embedding_dim, device=device, dtype=dtype)


class ImageTokens(fl.Chain):
    """The image embedding plus the dense prompt embedding, as a sequence of tokens `(batch, h * w, dim)`, one
    copy per prompt (the input, the prompt tokens, gives the batch)."""

    def __init__(self) -> None:
        super().__init__(
            fl.Sum(
                fl.UseContext(MASK_DECODER_CONTEXT, "image_embedding"),
                fl.UseContext(MASK_DECODER_CONTEXT, "dense_embedding"),
            ),
            fl.Flatten(start_dim=2),
            fl.Transpose(1, 2),
        )

    def forward(self, *args: Any) -> Tensor:
        (tokens,) = args
        image_tokens: Tensor = super().forward(tokens)
        return image_tokens.expand(tokens.shape[0], -1, -1)


class QueriesWithPositions(fl.Sum):
    """`(queries, keys)` to the queries plus their positions (the decoder's first tokens)."""

    def __init__(self) -> None:
        super().__init__(fl.GetArg(0), fl.UseContext(MASK_DECODER_CONTEXT, "query_positions"))


class KeysWithPositions(fl.Sum):
    """`(queries, keys)` to the image tokens plus the image's position features."""

    def __init__(self) -> None:
        super().__init__(fl.GetArg(1), fl.UseContext(MASK_DECODER_CONTEXT, "key_positions"))


def _attention(embedding_dim: int, num_heads: int, downsample_rate: int, device: Any, dtype: Any) -> fl.Attention:
    return fl.Attention(
        embedding_dim, num_heads=num_heads, inner_dim=embedding_dim // downsample_rate, device=device, dtype=dtype
    )


class TokenSelfAttention(fl.Parallel):
    """`(queries, keys)` to `(norm(queries + attention(q, q, queries)), keys)`, with `q` the queries plus their
    positions; the first block of the transformer replaces the queries (no residual, no positions), as SAM does.

    Args:
        embedding_dim: Width of the tokens.
        num_heads: Number of attention heads.
        is_first: Whether this is the transformer's first block.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        is_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.is_first = is_first
        attention = _attention(embedding_dim, num_heads, 1, device, dtype)
        update = (
            fl.Chain(fl.GetArg(0), fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity()), attention)
            if is_first
            else fl.Sum(
                fl.GetArg(0),
                fl.Chain(fl.Parallel(QueriesWithPositions(), QueriesWithPositions(), fl.GetArg(0)), attention),
            )
        )
        super().__init__(
            fl.Chain(update, fl.LayerNorm(embedding_dim, device=device, dtype=dtype)),
            fl.GetArg(1),
        )


class TokenToImageAttention(fl.Parallel):
    """`(queries, keys)` to `(norm(queries + attention(queries + positions, keys + positions, keys)), keys)`.

    Args:
        embedding_dim: Width of the tokens.
        num_heads: Number of attention heads.
        downsample_rate: The attention works at `embedding_dim / downsample_rate` channels (SAM: 2).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Chain(
                fl.Sum(
                    fl.GetArg(0),
                    fl.Chain(
                        fl.Parallel(QueriesWithPositions(), KeysWithPositions(), fl.GetArg(1)),
                        _attention(embedding_dim, num_heads, downsample_rate, device, dtype),
                    ),
                ),
                fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
            ),
            fl.GetArg(1),
        )


class TokenFeedForward(fl.Parallel):
    """`(queries, keys)` to `(norm(queries + mlp(queries)), keys)`; the MLP's activation is a ReLU.

    Args:
        embedding_dim: Width of the tokens.
        feedforward_dim: Hidden size of the MLP.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        feedforward_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Chain(
                fl.GetArg(0),
                fl.Residual(
                    fl.Linear(embedding_dim, feedforward_dim, device=device, dtype=dtype),
                    fl.ReLU(),
                    fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
                ),
                fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
            ),
            fl.GetArg(1),
        )


class ImageToTokenAttention(fl.Parallel):
    """`(queries, keys)` to `(queries, norm(keys + attention(keys + positions, queries + positions, queries)))`.

    Args:
        embedding_dim: Width of the tokens.
        num_heads: Number of attention heads.
        downsample_rate: The attention works at `embedding_dim / downsample_rate` channels (SAM: 2).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.GetArg(0),
            fl.Chain(
                fl.Sum(
                    fl.GetArg(1),
                    fl.Chain(
                        fl.Parallel(KeysWithPositions(), QueriesWithPositions(), fl.GetArg(0)),
                        _attention(embedding_dim, num_heads, downsample_rate, device, dtype),
                    ),
                ),
                fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
            ),
        )


class TwoWayAttentionBlock(fl.Chain):
    """One block of the two-way transformer, on `(queries, keys)`: the tokens attend to themselves, then to the
    image, go through an MLP, and the image attends to the tokens.

    Args:
        embedding_dim: Width of the tokens.
        num_heads: Number of attention heads.
        feedforward_dim: Hidden size of the tokens' MLP.
        is_first: Whether this is the transformer's first block (see `TokenSelfAttention`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        feedforward_dim: int,
        is_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            TokenSelfAttention(embedding_dim, num_heads, is_first=is_first, device=device, dtype=dtype),
            TokenToImageAttention(embedding_dim, num_heads, device=device, dtype=dtype),
            TokenFeedForward(embedding_dim, feedforward_dim, device=device, dtype=dtype),
            ImageToTokenAttention(embedding_dim, num_heads, device=device, dtype=dtype),
        )


class TwoWayTransformer(fl.Chain):
    """`(queries, keys)` to `(queries, keys)`: `depth` two-way blocks, then a last attention of the tokens to the
    image. The image's position features, `(1, h * w, dim)`, are put in the context first (`key_positions`).

    Args:
        embedding_dim: Width of the tokens.
        depth: Number of two-way blocks (SAM: 2).
        num_heads: Number of attention heads (SAM: 8).
        feedforward_dim: Hidden size of the tokens' MLPs (SAM: 2048).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.depth = depth
        self.num_heads = num_heads
        self.feedforward_dim = feedforward_dim
        super().__init__(
            fl.Passthrough(
                fl.UseContext(MASK_DECODER_CONTEXT, "dense_positional_embedding"),
                fl.Flatten(start_dim=2),
                fl.Transpose(1, 2),
                fl.SetContext(MASK_DECODER_CONTEXT, "key_positions"),
            ),
            (
                TwoWayAttentionBlock(
                    embedding_dim, num_heads, feedforward_dim, is_first=index == 0, device=device, dtype=dtype
                )
                for index in range(depth)
            ),
            TokenToImageAttention(embedding_dim, num_heads, device=device, dtype=dtype),
        )


class KeysToGrid(fl.ContextModule):
    """`(batch, h * w, dim)` image tokens back to `(batch, dim, h, w)`, at the image embedding's size."""

    def forward(self, keys: Tensor) -> Tensor:
        height, width = self.use_context(MASK_DECODER_CONTEXT)["image_embedding"].shape[-2:]
        return keys.transpose(1, 2).reshape(keys.shape[0], -1, height, width)


class MasksToGrid(fl.ContextModule):
    """`(batch, masks, 16 * h * w)` to `(batch, masks, 4h, 4w)`, four times the image embedding's size."""

    def forward(self, masks: Tensor) -> Tensor:
        height, width = self.use_context(MASK_DECODER_CONTEXT)["image_embedding"].shape[-2:]
        return masks.reshape(masks.shape[0], masks.shape[1], 4 * height, 4 * width)


class MaskUpscaling(fl.Chain):
    """The transformer's image tokens, `(batch, dim, h, w)`, upscaled to `(batch, dim / 8, 4h, 4w)`.

    Args:
        embedding_dim: Width of the tokens.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        super().__init__(
            fl.ConvTranspose2d(embedding_dim, embedding_dim // 4, 2, stride=2, device=device, dtype=dtype),
            fl.LayerNorm2d(embedding_dim // 4, device=device, dtype=dtype),
            fl.GeLU(),
            fl.ConvTranspose2d(embedding_dim // 4, embedding_dim // 8, 2, stride=2, device=device, dtype=dtype),
            fl.GeLU(),
        )


class Hypernetworks(fl.Chain):
    """`(batch, tokens, dim)` to `(batch, tokens, dim / 8)`: each token through its own 3-layer MLP.

    Args:
        embedding_dim: Width of the tokens.
        num_tokens: Number of tokens (and of MLPs).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        num_tokens: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_tokens = num_tokens
        super().__init__(
            fl.MultiLinear(embedding_dim, embedding_dim // 8, embedding_dim, 3, device=device, dtype=dtype)
            for _ in range(num_tokens)
        )

    def forward(self, *args: Any) -> Tensor:
        (tokens,) = args
        return torch.stack([self._call_layer(mlp, tokens[:, index]) for index, mlp in enumerate(self)], dim=1)


class MaskPrediction(fl.Chain):
    """`(queries, keys)` to the masks' logits, `(batch, num_mask_tokens, 4h, 4w)`: the weights each mask token's
    hypernetwork makes, applied to the upscaled image tokens.

    Args:
        embedding_dim: Width of the tokens.
        num_mask_tokens: Number of mask tokens (they follow the IoU token).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        num_mask_tokens: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_mask_tokens = num_mask_tokens
        super().__init__(
            fl.Matmul(
                fl.Chain(
                    fl.GetArg(0),
                    fl.Slicing(dim=1, start=1, end=1 + num_mask_tokens),
                    Hypernetworks(embedding_dim, num_mask_tokens, device=device, dtype=dtype),
                ),
                fl.Chain(
                    fl.GetArg(1),
                    KeysToGrid(),
                    MaskUpscaling(embedding_dim, device=device, dtype=dtype),
                    fl.Flatten(start_dim=2),
                ),
            ),
            MasksToGrid(),
        )


class IoUPrediction(fl.Chain):
    """`(queries, keys)` to the predicted IoU of each mask, `(batch, num_mask_tokens)`, from the IoU token.

    Args:
        embedding_dim: Width of the tokens.
        num_mask_tokens: Number of masks.
        hidden_dim: Hidden size of the MLP (SAM: 256).
        num_layers: Number of layers of the MLP (SAM: 3).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        num_mask_tokens: int = 4,
        hidden_dim: int = 256,
        num_layers: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_mask_tokens = num_mask_tokens
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        super().__init__(
            fl.GetArg(0),
            fl.Slicing(dim=1, start=0, end=1),
            fl.Squeeze(1),
            fl.MultiLinear(embedding_dim, num_mask_tokens, hidden_dim, num_layers, device=device, dtype=dtype),
        )


class MaskSelection(fl.ContextModule):
    """`(masks, iou_predictions)` to the multimask output (all masks but the first) when the context's
    `multimask_output` is true, else the single-mask output (the first)."""

    def forward(self, masks: Tensor, iou_predictions: Tensor) -> tuple[Tensor, Tensor]:
        selected = slice(1, None) if self.use_context(MASK_DECODER_CONTEXT)["multimask_output"] else slice(0, 1)
        return masks[:, selected], iou_predictions[:, selected]


class MaskDecoder(fl.Chain):
    """Sparse prompt tokens `(batch, points, dim)` to `(low_res_masks, iou_predictions)` (see the module's
    documentation for what it reads from the context).

    Args:
        embedding_dim: Width of the tokens and of the image embedding (SAM: 256).
        num_multimask_outputs: Number of masks of the multimask output (SAM: 3); there is one more mask token.
        depth: Number of two-way transformer blocks (SAM: 2).
        num_heads: Number of attention heads (SAM: 8).
        feedforward_dim: Hidden size of the tokens' MLPs (SAM: 2048).
        iou_hidden_dim: Hidden size of the IoU prediction's MLP (SAM: 256).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        num_multimask_outputs: int = 3,
        depth: int = 2,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        iou_hidden_dim: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_multimask_outputs = num_multimask_outputs
        num_mask_tokens = num_multimask_outputs + 1
        super().__init__(
            fl.Concatenate(
                IoUToken(embedding_dim, device=device, dtype=dtype),
                MaskTokens(embedding_dim, num_mask_tokens, device=device, dtype=dtype),
                fl.Identity(),
                dim=1,
            ),
            fl.SetContext(MASK_DECODER_CONTEXT, "query_positions"),
            fl.Parallel(fl.Identity(), ImageTokens()),
            TwoWayTransformer(embedding_dim, depth, num_heads, feedforward_dim, device=device, dtype=dtype),
            fl.Parallel(
                MaskPrediction(embedding_dim, num_mask_tokens, device=device, dtype=dtype),
                IoUPrediction(embedding_dim, num_mask_tokens, iou_hidden_dim, device=device, dtype=dtype),
            ),
            MaskSelection(),
        )

    def set_inputs(
        self,
        image_embedding: Tensor,
        dense_embedding: Tensor,
        dense_positional_embedding: Tensor,
        multimask_output: bool = True,
    ) -> None:
        """Give the decoder what it reads from the context besides the prompt tokens (see the module's documentation).

        Args:
            image_embedding: `(1, dim, h, w)`, the image encoder's output.
            dense_embedding: `(batch or 1, dim, h or 1, w or 1)`: a mask prompt's embedding, or `NoMaskEmbedding`'s.
            dense_positional_embedding: `(1, dim, h, w)`: the position features of the embedding's cells.
            multimask_output: Output all masks but the first, or the first alone.
        """
        self.set_context(
            MASK_DECODER_CONTEXT,
            {
                "image_embedding": image_embedding,
                "dense_embedding": dense_embedding,
                "dense_positional_embedding": dense_positional_embedding,
                "multimask_output": multimask_output,
            },
        )

    def init_context(self) -> Contexts:
        return {
            MASK_DECODER_CONTEXT: {
                "image_embedding": None,
                "dense_embedding": None,
                "dense_positional_embedding": None,
                "multimask_output": True,
                "query_positions": None,
                "key_positions": None,
            }
        }
