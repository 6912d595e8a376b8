"""SAM's prompt encoders: points and box corners to sparse tokens, a low-resolution mask to a dense embedding.

A point is encoded by random Fourier features of its position (Tancik et al.; SAM's `PositionEmbeddingRandom`) plus
a learned embedding of its type (`PointType`); a box is its two corners, of types `BOX_TOP_LEFT` and
`BOX_BOTTOM_RIGHT`. The same Fourier features of every cell's center give the image embedding its positions
(`PointEncoder.dense_positional_embedding`). A mask prompt, `(batch, 1, 4h, 4w)` logits, goes through strided
convolutions to the embedding's grid; without one, a learned `NoMaskEmbedding` stands everywhere.
"""

import math
from enum import IntEnum

import torch
from torch import Tensor

import refiners.fluxion.layers as fl

__all__ = ["PointType", "PointPositions", "PointTypeEmbedding", "PointEncoder", "MaskEncoder", "NoMaskEmbedding"]


class PointType(IntEnum):
    """The type of each prompt point, as SAM labels them (`-1` pads a prompt without a box)."""

    PADDING = -1
    BACKGROUND = 0
    FOREGROUND = 1
    BOX_TOP_LEFT = 2
    BOX_BOTTOM_RIGHT = 3


class PointTypeEmbedding(fl.Module):
    """`(coordinates, types)` to the learned embedding of each point's type, `(batch, points, embedding_dim)`.

    The five embeddings are SAM's `not_a_point_embed` and `point_embeddings.{0,1,2,3}` (see `PointType`).

    Args:
        embedding_dim: Size of the embeddings.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.padding = torch.nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))
        self.background = torch.nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))
        self.foreground = torch.nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))
        self.box_top_left = torch.nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))
        self.box_bottom_right = torch.nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))

    def forward(self, coordinates: Tensor, types: Tensor) -> Tensor:
        # Rows in the order of `PointType`'s values, from -1: the type plus one is the row.
        table = torch.cat([self.padding, self.background, self.foreground, self.box_top_left, self.box_bottom_right])
        return table[types.long() + 1]


class PointPositions(fl.Module):
    """`(coordinates, types)` to random Fourier features of each point's position, zero for padding points.

    Coordinates are in pixels of the model's input frame (the resized image, `image_size` on its longest side);
    SAM shifts them to the pixel's center (+0.5) and divides by `image_size`, in the coordinates' own precision.
    Positions `p` in `[0, 1]` then give `[sin(2π (2p - 1) G), cos(2π (2p - 1) G)]`, where `G`,
    `(2, embedding_dim / 2)`, is drawn once from a normal distribution and kept (a buffer, SAM's
    `positional_encoding_gaussian_matrix`).

    Args:
        embedding_dim: Size of the features (even).
        image_size: Side of the model's input frame.
        device: Where the buffer lives.
        dtype: The buffer's dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        image_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim % 2 != 0:
            raise ValueError(f"PointPositions needs an even embedding_dim (sines and cosines), got {embedding_dim}")
        self.embedding_dim = embedding_dim
        self.image_size = image_size
        self.register_buffer(
            "positional_encoding_gaussian_matrix", torch.randn(2, embedding_dim // 2, device=device, dtype=dtype)
        )

    def fourier_features(self, positions: Tensor) -> Tensor:
        """`(..., 2)` positions in `[0, 1]` to `(..., embedding_dim)` features."""
        gaussian: Tensor = self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * ((2 * positions.to(gaussian.dtype) - 1) @ gaussian)
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def forward(self, coordinates: Tensor, types: Tensor) -> Tensor:
        encoded = self.fourier_features((coordinates + 0.5) / self.image_size)
        return encoded.masked_fill((types == PointType.PADDING)[..., None], 0.0)


class PointEncoder(fl.Sum):
    """`(coordinates, types)` of the prompt points, `(batch, points, 2)` and `(batch, points)`, to sparse tokens
    `(batch, points, embedding_dim)`: position features plus type embeddings.

    Args:
        embedding_dim: Width of the tokens (SAM: 256).
        image_size: Side of the model's input frame (SAM: 1024).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        image_size: int = 1024,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.image_size = image_size
        super().__init__(
            PointPositions(embedding_dim, image_size, device=device, dtype=dtype),
            PointTypeEmbedding(embedding_dim, device=device, dtype=dtype),
        )

    def dense_positional_embedding(self, grid_size: int) -> Tensor:
        """The position features of the centers of a `grid_size` x `grid_size` grid, `(1, embedding_dim, h, w)`."""
        positions = self.layer("PointPositions", PointPositions)
        centers = (torch.arange(grid_size, device=self.device, dtype=torch.float32) + 0.5) / grid_size
        grid = torch.stack(torch.meshgrid(centers, centers, indexing="xy"), dim=-1)
        return positions.fourier_features(grid).permute(2, 0, 1).unsqueeze(0)


class MaskEncoder(fl.Chain):
    """A low-resolution mask prompt, `(batch, 1, 4h, 4w)` logits, to a dense embedding `(batch, embedding_dim, h, w)`.

    Args:
        embedding_dim: Channels of the output (SAM: 256).
        hidden_channels: Channels after the second downscaling (SAM: 16; the first has a quarter of them).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        hidden_channels: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.hidden_channels = hidden_channels
        quarter = hidden_channels // 4
        super().__init__(
            fl.Conv2d(1, quarter, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.LayerNorm2d(quarter, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Conv2d(quarter, hidden_channels, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.LayerNorm2d(hidden_channels, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Conv2d(hidden_channels, embedding_dim, kernel_size=1, device=device, dtype=dtype),
        )


class NoMaskEmbedding(fl.WeightedModule):
    """The dense embedding when there is no mask prompt: one learned vector, `(1, embedding_dim, 1, 1)`, that
    broadcasts over every cell of the image embedding.

    Args:
        embedding_dim: Size of the vector.
        device: Where the weight lives.
        dtype: The weight's dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.weight = torch.nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))

    def forward(self) -> Tensor:
        return self.weight.reshape(1, self.embedding_dim, 1, 1)
