"""SAM's image encoder: a plain ViT (ViTDet's backbone) with windowed attention, relative positions, and a neck.

The image, `(batch, 3, image_size, image_size)`, is cut into 16x16 patches; most transformer layers attend within
14x14 windows of patches, a few (`global_attention_indices`) over the whole grid. Every attention adds decomposed
relative position embeddings to its scores (MViTv2's: one table along the height, one along the width). The neck
turns the `(batch, h, w, embedding_dim)` grid into the `(batch, 256, h, w)` image embedding the mask decoder reads.
"""

from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import pad, scaled_dot_product_attention

import refiners.fluxion.layers as fl

__all__ = [
    "PatchEncoder",
    "PositionalEncoding",
    "RelativePositionAttention",
    "FusedSelfAttention",
    "Windows",
    "TransformerLayer",
    "Neck",
    "SAMViT",
]


class PatchEncoder(fl.Chain):
    """`(batch, 3, H, W)` images to a channels-last grid of patch embeddings, `(batch, H / p, W / p, dim)`.

    Args:
        embedding_dim: Size of each patch embedding.
        patch_size: Side of the square patches, in pixels.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        patch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.patch_size = patch_size
        super().__init__(
            fl.Conv2d(3, embedding_dim, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype),
            fl.Permute(0, 2, 3, 1),
        )


class PositionalEncoding(fl.Residual):
    """Add learned absolute position embeddings, one per patch of the grid: `(batch, h, w, dim)` in and out.

    Args:
        grid_size: Side of the patch grid (SAM: 1024 / 16 = 64).
        embedding_dim: Size of the embeddings.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        grid_size: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.grid_size = grid_size
        self.embedding_dim = embedding_dim
        super().__init__(fl.Parameter(grid_size, grid_size, embedding_dim, device=device, dtype=dtype))


class RelativePositionAttention(fl.Module):
    """Multi-head attention of a `(batch, h, w, 3 * dim)` grid of fused queries, keys and values, to `(batch, h, w, dim)`.

    The scores get decomposed relative position biases (MViTv2, eq. 4): for query `(i, j)` and key `(k, l)`,
    `q · R_h[i - k] + q · R_w[j - l]`, with `R_h` and `R_w` learned tables of `2 * grid_size - 1` rows each
    (`rel_pos_h` and `rel_pos_w`, SAM's names). The unscaled query is used, as in SAM and ViTDet.

    Args:
        embedding_dim: The width of the values and of the output (the input has three times as many channels).
        num_heads: Number of heads; it must divide `embedding_dim`.
        grid_size: Side of the grids attended over: the window size, or the whole grid's side.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        grid_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide embedding_dim={embedding_dim}")
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.grid_size = grid_size
        head_dim = embedding_dim // num_heads
        self.rel_pos_h = torch.nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim, device=device, dtype=dtype))
        self.rel_pos_w = torch.nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        if height != self.grid_size or width != self.grid_size:
            raise ValueError(
                f"this attention has relative positions for {self.grid_size}x{self.grid_size} grids, got a "
                f"{height}x{width} grid: SAM pads its images to image_size (see SegmentAnything.preprocess)"
            )
        head_dim = self.embedding_dim // self.num_heads
        query, key, value = x.reshape(batch, height * width, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        positions = torch.arange(self.grid_size, device=x.device)
        offsets = positions[:, None] - positions[None, :] + self.grid_size - 1
        spatial_query = query.reshape(batch, self.num_heads, height, width, head_dim)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", spatial_query, self.rel_pos_h[offsets])
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", spatial_query, self.rel_pos_w[offsets])
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(batch, self.num_heads, height * width, -1)
        attended = scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return attended.transpose(1, 2).reshape(batch, height, width, self.embedding_dim)


class FusedSelfAttention(fl.Chain):
    """Self-attention of a channels-last grid: a fused query-key-value projection, `RelativePositionAttention`, and
    the output projection.

    Args:
        embedding_dim: Width of the grid.
        num_heads: Number of heads.
        grid_size: Side of the grids attended over (see `RelativePositionAttention`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        grid_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.grid_size = grid_size
        super().__init__(
            fl.Linear(embedding_dim, 3 * embedding_dim, device=device, dtype=dtype),
            RelativePositionAttention(embedding_dim, num_heads, grid_size, device=device, dtype=dtype),
            fl.Linear(embedding_dim, embedding_dim, device=device, dtype=dtype),
        )


class Windows(fl.Chain):
    """Run the children on each `window_size` x `window_size` window of a `(batch, h, w, dim)` grid, separately.

    The grid is zero-padded at the bottom and right to a multiple of the window size, cut into windows (which become
    the batch), and put back together and cropped after the children ran.

    Args:
        *modules: What runs on each window.
        window_size: Side of the windows.
    """

    def __init__(self, *modules: fl.Module, window_size: int) -> None:
        self.window_size = window_size
        super().__init__(*modules)

    def forward(self, *args: Any) -> Any:
        (x,) = args
        batch, height, width, channels = x.shape
        size = self.window_size
        pad_h, pad_w = -height % size, -width % size
        if pad_h or pad_w:
            x = pad(x, (0, 0, 0, pad_w, 0, pad_h))
        rows, columns = (height + pad_h) // size, (width + pad_w) // size
        windows = x.reshape(batch, rows, size, columns, size, channels).transpose(2, 3)
        windows = windows.reshape(batch * rows * columns, size, size, channels)
        output: Tensor = super().forward(windows)
        output = output.reshape(batch, rows, columns, size, size, -1).transpose(2, 3)
        output = output.reshape(batch, rows * size, columns * size, -1)
        return output[:, :height, :width] if pad_h or pad_w else output


class TransformerLayer(fl.Chain):
    """A pre-norm ViT layer on a channels-last grid: attention (windowed, or global), then the MLP.

    Args:
        embedding_dim: Width of the grid.
        num_heads: Number of attention heads.
        feedforward_dim: Hidden size of the MLP.
        grid_size: Side of the whole grid.
        window_size: Side of the attention windows; None for global attention over the whole grid.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        feedforward_dim: int,
        grid_size: int,
        window_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.feedforward_dim = feedforward_dim
        self.window_size = window_size
        attention = FusedSelfAttention(
            embedding_dim, num_heads, grid_size=window_size or grid_size, device=device, dtype=dtype
        )
        super().__init__(
            fl.Residual(
                fl.LayerNorm(embedding_dim, eps=1e-6, device=device, dtype=dtype),
                Windows(attention, window_size=window_size) if window_size is not None else attention,
            ),
            fl.Residual(
                fl.LayerNorm(embedding_dim, eps=1e-6, device=device, dtype=dtype),
                fl.Linear(embedding_dim, feedforward_dim, device=device, dtype=dtype),
                fl.GeLU(),
                fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
            ),
        )

    @property
    def is_global(self) -> bool:
        """Whether the layer attends over the whole grid (not within windows)."""
        return self.window_size is None


class Neck(fl.Chain):
    """The channels-last grid to the image embedding, `(batch, output_dim, h, w)`: 1x1 and 3x3 convolutions, each
    followed by a channel LayerNorm.

    Args:
        embedding_dim: Width of the grid.
        output_dim: Channels of the image embedding (SAM: 256).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        output_dim: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.output_dim = output_dim
        super().__init__(
            fl.Permute(0, 3, 1, 2),
            fl.Conv2d(embedding_dim, output_dim, kernel_size=1, use_bias=False, device=device, dtype=dtype),
            fl.LayerNorm2d(output_dim, device=device, dtype=dtype),
            fl.Conv2d(output_dim, output_dim, kernel_size=3, padding=1, use_bias=False, device=device, dtype=dtype),
            fl.LayerNorm2d(output_dim, device=device, dtype=dtype),
        )


class SAMViT(fl.Chain):
    """SAM's image encoder: `(batch, 3, image_size, image_size)` normalized images to `(batch, output_dim, h, w)`.

    Args:
        embedding_dim: Width of the ViT (B: 768, L: 1024, H: 1280).
        num_layers: Number of transformer layers (B: 12, L: 24, H: 32).
        num_heads: Number of attention heads (B: 12, L and H: 16).
        global_attention_indices: The layers that attend over the whole grid; the others attend within windows
            (B: 2, 5, 8, 11; L: 5, 11, 17, 23; H: 7, 15, 23, 31).
        window_size: Side of the attention windows, in patches.
        image_size: Side of the (padded) input images.
        patch_size: Side of the patches.
        output_dim: Channels of the image embedding.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        global_attention_indices: tuple[int, ...] = (2, 5, 8, 11),
        window_size: int = 14,
        image_size: int = 1024,
        patch_size: int = 16,
        output_dim: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        if outside := [index for index in global_attention_indices if not 0 <= index < num_layers]:
            raise ValueError(f"global_attention_indices {outside} are not layers of a {num_layers}-layer ViT")
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.global_attention_indices = tuple(global_attention_indices)
        self.window_size = window_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.output_dim = output_dim
        grid_size = image_size // patch_size
        super().__init__(
            PatchEncoder(embedding_dim, patch_size, device=device, dtype=dtype),
            PositionalEncoding(grid_size, embedding_dim, device=device, dtype=dtype),
            (
                TransformerLayer(
                    embedding_dim,
                    num_heads,
                    feedforward_dim=4 * embedding_dim,
                    grid_size=grid_size,
                    window_size=None if index in self.global_attention_indices else window_size,
                    device=device,
                    dtype=dtype,
                )
                for index in range(num_layers)
            ),
            Neck(embedding_dim, output_dim, device=device, dtype=dtype),
        )

    @property
    def grid_size(self) -> int:
        """Side of the patch grid, and of the image embedding."""
        return self.image_size // self.patch_size
