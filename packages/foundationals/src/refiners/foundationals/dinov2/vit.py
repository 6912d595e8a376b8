"""The Vision Transformer that DINOv2 trains: patches and a class token, learned positions, optional registers, then
pre-norm transformer layers with layer scale.

`ViT` is the architecture at any size; the `DINOv2_*` classes of `refiners.foundationals.dinov2` fix the sizes of
the released models. The output is the whole token sequence after the final LayerNorm, `(batch, 1 + registers +
patches, embedding_dim)`: the class token first, then the registers, then the patches row by row (transformers'
`last_hidden_state`).

Position embeddings are learned for a square grid of `image_size // patch_size` patches a side (37 for the released
models, trained at 518 pixels) and resampled, bicubic, to the grid of each input (16 x 16 patches for a 224 x 224
image), as transformers' `interpolate_pos_encoding` does (see `PositionalEmbedding`).
"""

from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import torch
from torch import Tensor
from torch.nn.functional import interpolate

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts
from refiners.fluxion.layers.attentions import SPATIAL_SHAPE_CONTEXT, SpatialToSequence
from refiners.fluxion.layers.module import ContextModule
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors

__all__ = [
    "FeedForwardKind",
    "swiglu_hidden_dim",
    "ClassToken",
    "PatchEncoder",
    "PositionalEmbedding",
    "PositionalEncoder",
    "RegisterTokens",
    "Registers",
    "LayerScale",
    "FeedForward",
    "SwiGLUFeedForward",
    "TransformerLayer",
    "Transformer",
    "ViT",
]

ViTT = TypeVar("ViTT", bound="ViT")

FeedForwardKind = Literal["gelu", "swiglu"]
"""The MLP of the transformer layers: `"gelu"` (`FeedForward`) for DINOv2 small, base and large, `"swiglu"`
(`SwiGLUFeedForward`) for giant."""


def _subclasses(cls: type[ViTT]) -> list[type[ViTT]]:
    found = [cls]
    for subclass in cls.__subclasses__():
        found += _subclasses(subclass)
    return found


def swiglu_hidden_dim(embedding_dim: int, mlp_ratio: int = 4) -> int:
    """The hidden size of DINOv2's SwiGLU MLP: two thirds of `embedding_dim * mlp_ratio`, rounded up to a multiple of
    8 (4096 for giant's 1536), as facebook's `SwiGLUFFNFused` and transformers' `Dinov2SwiGLUFFN` compute it."""
    return (int(embedding_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class ClassToken(fl.Parameter):
    """The learned class token, `(1, embedding_dim)`, given to each image of the batch: `(batch, 1, embedding_dim)`.

    Args:
        embedding_dim: The token's size.
        device: Where the token lives.
        dtype: The token's dtype.
    """

    def __init__(
        self, embedding_dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(1, embedding_dim, device=device, dtype=dtype)
        self.embedding_dim = embedding_dim

    def basic_attributes(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim}


class PatchEncoder(fl.Chain):
    """Images `(batch, channels, height, width)` to patch tokens `(batch, grid_height * grid_width, out_channels)`.

    A convolution with the patch size as kernel and stride embeds each patch (a remainder of the image that is not a
    whole patch is dropped, as in the references); the grid's height and width are left in the context
    `SPATIAL_SHAPE_CONTEXT` for `PositionalEmbedding`.

    Args:
        in_channels: The images' channels.
        out_channels: The tokens' size.
        patch_size: The side of a patch, in pixels.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        patch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        super().__init__(
            fl.Conv2d(in_channels, out_channels, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype),
            SpatialToSequence(),
        )

    def init_context(self) -> Contexts:
        return {SPATIAL_SHAPE_CONTEXT: {"height": None, "width": None}}


class PositionalEmbedding(fl.WeightedModule, ContextModule):
    """The learned position embeddings, resampled to the input's patch grid: `(1, 1 + patches, embedding_dim)`.

    The weight holds the class token's position then a square grid of `grid_size` x `grid_size` patch positions. For
    an input of another grid (read from the context `SPATIAL_SHAPE_CONTEXT`, which `PatchEncoder` fills), the grid
    is resampled to it with `torch.nn.functional.interpolate(..., size=grid, mode="bicubic")` in float32, as
    transformers' `interpolate_pos_encoding` does (`antialias=True` for the models with registers, as there).

    facebook's code for the models without registers resamples with `scale_factor=(grid + 0.1) / grid_size` instead
    of the output size (a "kludge" kept from DINO): the same output size, but sampling points shifted by a fraction of
    a patch, so its features differ slightly from transformers'. These models follow transformers.

    Args:
        grid_size: The side of the learned grid, in patches (`image_size // patch_size`: 37 for DINOv2).
        embedding_dim: The size of each embedding.
        antialias: Resample with an antialiasing filter (when shrinking the grid).
        device: Where the weight lives.
        dtype: The weight's dtype.
    """

    def __init__(
        self,
        grid_size: int,
        embedding_dim: int,
        antialias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.embedding_dim = embedding_dim
        self.antialias = antialias
        self.weight = torch.nn.Parameter(torch.randn(1 + grid_size**2, embedding_dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        grid = self.use_context(SPATIAL_SHAPE_CONTEXT)
        height, width = grid["height"], grid["width"]
        if height is None or width is None:
            raise ValueError(
                "PositionalEmbedding found no patch grid: a PatchEncoder must run before it in the same forward."
            )
        if x.shape[1] != 1 + height * width:
            raise ValueError(
                f"PositionalEmbedding expects the class token and {height}x{width} patch tokens, got a sequence of "
                f"{x.shape[1]}: registers are inserted after the position embeddings, not before."
            )
        if (height, width) == (self.grid_size, self.grid_size):
            return self.weight.unsqueeze(0)
        patches = self.weight[1:].reshape(1, self.grid_size, self.grid_size, self.embedding_dim).permute(0, 3, 1, 2)
        resampled = interpolate(
            patches.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=self.antialias
        ).to(self.weight.dtype)
        resampled = resampled.permute(0, 2, 3, 1).reshape(height * width, self.embedding_dim)
        return torch.cat((self.weight[:1], resampled)).unsqueeze(0)


class PositionalEncoder(fl.Residual):
    """Adds `PositionalEmbedding` to the class and patch tokens."""


class RegisterTokens(fl.Parameter):
    """The learned registers, `(num_registers, embedding_dim)`, given to each image: `(batch, num_registers, dim)`.

    Args:
        num_registers: How many.
        embedding_dim: Their size.
        device: Where they live.
        dtype: Their dtype.
    """

    def __init__(
        self,
        num_registers: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_registers, embedding_dim, device=device, dtype=dtype)
        self.num_registers = num_registers
        self.embedding_dim = embedding_dim

    def basic_attributes(self) -> dict[str, Any]:
        return {"num_registers": self.num_registers, "embedding_dim": self.embedding_dim}


class Registers(fl.Concatenate):
    """Inserts the register tokens between the class token and the patches ("Vision Transformers Need Registers",
    arXiv:2309.16588). They come after the position embeddings: registers have no position.

    Args:
        num_registers: How many.
        embedding_dim: Their size.
        device: Where they live.
        dtype: Their dtype.
    """

    def __init__(
        self,
        num_registers: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.num_registers = num_registers
        self.embedding_dim = embedding_dim
        super().__init__(
            fl.Slicing(dim=1, end=1),
            RegisterTokens(num_registers, embedding_dim, device=device, dtype=dtype),
            fl.Slicing(dim=1, start=1),
            dim=1,
        )


class LayerScale(fl.WeightedModule):
    """`x * weight`, a learned per-channel scale of a residual branch (CaiT's LayerScale, arXiv:2103.17239).

    Args:
        embedding_dim: The channels.
        init_value: The scale's initial value.
        device: Where the weight lives.
        dtype: The weight's dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        init_value: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.init_value = init_value
        self.weight = torch.nn.Parameter(torch.full((embedding_dim,), init_value, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class FeedForward(fl.Chain):
    """The MLP of DINOv2 small, base and large: `Linear -> GeLU (exact) -> Linear`.

    Args:
        embedding_dim: Input and output size.
        feedforward_dim: Hidden size.
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
        self.embedding_dim = embedding_dim
        self.feedforward_dim = feedforward_dim
        super().__init__(
            fl.Linear(embedding_dim, feedforward_dim, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
        )


class SwiGLUFeedForward(fl.Chain):
    """The MLP of DINOv2 giant: one `Linear` to twice the hidden size, `GLU(SiLU)`, then a `Linear` back.

    `fl.GLU` computes `a * silu(b)` for the halves `a, b` of its input: the first half of the first Linear's outputs
    is the value, the second the gate (the references store the gate first; the converter swaps the halves).

    Args:
        embedding_dim: Input and output size.
        feedforward_dim: Hidden size (`swiglu_hidden_dim(embedding_dim)`: 4096 for giant).
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
        self.embedding_dim = embedding_dim
        self.feedforward_dim = feedforward_dim
        super().__init__(
            fl.Linear(embedding_dim, 2 * feedforward_dim, device=device, dtype=dtype),
            fl.GLU(fl.SiLU()),
            fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
        )


class TransformerLayer(fl.Chain):
    """A pre-norm transformer layer with layer scale: `x + ls1(attention(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`.

    Args:
        embedding_dim: The tokens' size.
        num_heads: Attention heads; it must divide `embedding_dim`.
        feedforward_dim: The MLP's hidden size.
        feedforward: The MLP's kind (see `FeedForwardKind`).
        norm_eps: The LayerNorms' epsilon.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        feedforward_dim: int,
        feedforward: FeedForwardKind = "gelu",
        norm_eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.feedforward_dim = feedforward_dim
        self.feedforward = feedforward
        self.norm_eps = norm_eps
        mlp = {"gelu": FeedForward, "swiglu": SwiGLUFeedForward}[feedforward]
        super().__init__(
            fl.Residual(
                fl.LayerNorm(embedding_dim, eps=norm_eps, device=device, dtype=dtype),
                fl.SelfAttention(embedding_dim, num_heads=num_heads, device=device, dtype=dtype),
                LayerScale(embedding_dim, device=device, dtype=dtype),
            ),
            fl.Residual(
                fl.LayerNorm(embedding_dim, eps=norm_eps, device=device, dtype=dtype),
                mlp(embedding_dim, feedforward_dim, device=device, dtype=dtype),
                LayerScale(embedding_dim, device=device, dtype=dtype),
            ),
        )


class Transformer(fl.Chain):
    """The stack of `TransformerLayer`s."""


class ViT(fl.Chain):
    """A Vision Transformer as DINOv2 lays it out: `(batch, 3, height, width)` images to `(batch, 1 + num_registers +
    patches, embedding_dim)` tokens (class token, registers, patches), after the final LayerNorm.

    Any image size works: `height // patch_size` x `width // patch_size` patches, the position embeddings resampled
    to that grid. See "DINOv2: Learning Robust Visual Features without Supervision" (arXiv:2304.07193).

    Args:
        embedding_dim: The tokens' size.
        patch_size: The side of a patch, in pixels.
        image_size: The side of the images the position embeddings were learned for (518 for DINOv2).
        num_layers: Transformer layers.
        num_heads: Attention heads.
        norm_eps: The LayerNorms' epsilon.
        mlp_ratio: The MLP's hidden size over `embedding_dim` (before SwiGLU's two thirds).
        num_registers: Register tokens (0: none; DINOv2's `_reg` models have 4).
        feedforward: The MLP's kind: `"gelu"` or `"swiglu"` (giant).
        feedforward_dim: The MLP's hidden size (default: from `mlp_ratio` and `feedforward`).
        interpolate_antialias: Resample the position embeddings with antialiasing (the `_reg` models).
        device: Where the weights live.
        dtype: The weights' dtype.

    Example:
        ```py
        import torch
        from refiners.foundationals.dinov2 import ViT

        vit = ViT(embedding_dim=32, patch_size=14, image_size=56, num_layers=2, num_heads=2, num_registers=4)
        tokens = vit(torch.randn(1, 3, 28, 42))  # any size: a 2 x 3 grid of patches
        assert tokens.shape == (1, 1 + 4 + 6, 32)
        ```
    """

    def __init__(
        self,
        embedding_dim: int = 768,
        patch_size: int = 16,
        image_size: int = 224,
        num_layers: int = 12,
        num_heads: int = 12,
        norm_eps: float = 1e-6,
        mlp_ratio: int = 4,
        num_registers: int = 0,
        feedforward: FeedForwardKind = "gelu",
        feedforward_dim: int | None = None,
        interpolate_antialias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if image_size < patch_size:
            raise ValueError(f"image_size ({image_size}) must hold at least one patch of {patch_size} pixels")
        if num_registers < 0:
            raise ValueError(f"num_registers must be 0 or more, got {num_registers}")
        if feedforward not in ("gelu", "swiglu"):
            raise ValueError(f"feedforward must be 'gelu' or 'swiglu', got {feedforward!r}")
        if feedforward_dim is None:
            feedforward_dim = (
                swiglu_hidden_dim(embedding_dim, mlp_ratio) if feedforward == "swiglu" else embedding_dim * mlp_ratio
            )
        self.embedding_dim = embedding_dim
        self.patch_size = patch_size
        self.image_size = image_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.norm_eps = norm_eps
        self.mlp_ratio = mlp_ratio
        self.num_registers = num_registers
        self.feedforward = feedforward
        self.feedforward_dim = feedforward_dim
        self.interpolate_antialias = interpolate_antialias
        super().__init__(
            # Images come from `preprocess` in float32 on the CPU: move them to the weights' device and dtype.
            fl.Converter(),
            fl.Concatenate(
                ClassToken(embedding_dim, device=device, dtype=dtype),
                PatchEncoder(3, embedding_dim, patch_size, device=device, dtype=dtype),
                dim=1,
            ),
            PositionalEncoder(
                PositionalEmbedding(
                    image_size // patch_size,
                    embedding_dim,
                    antialias=interpolate_antialias,
                    device=device,
                    dtype=dtype,
                ),
            ),
            *([Registers(num_registers, embedding_dim, device=device, dtype=dtype)] if num_registers else []),
            Transformer(
                TransformerLayer(
                    embedding_dim,
                    num_heads,
                    feedforward_dim,
                    feedforward=feedforward,
                    norm_eps=norm_eps,
                    device=device,
                    dtype=dtype,
                )
                for _ in range(num_layers)
            ),
            fl.LayerNorm(embedding_dim, eps=norm_eps, device=device, dtype=dtype),
        )

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """The model a converted file records (see `refiners-convert dinov2`), built at its sizes and loaded.

        The model is built on the "meta" device (nothing allocated) and the file's tensors loaded into it.

        Args:
            path: A `.safetensors` file written by `refiners-convert dinov2`.
            device: Where the weights go (default: CPU).
            dtype: The weights' dtype (default: float32).

        Raises:
            ValueError: The file records no model, or a model that is not this class (or one of its subclasses).
        """
        config = ModelConfig.from_metadata(load_metadata_from_safetensors(path))
        if config is None:
            raise ValueError(
                f"{path} records no model (no refiners.model.* metadata): convert the checkpoint with "
                "`refiners-convert dinov2 --from CHECKPOINT --to FILE`, or build the model and call "
                "load_from_safetensors"
            )
        model = config.build(_subclasses(cls), device="meta", dtype=dtype)
        model.load_from_safetensors(path)
        return model.to(device=device) if device is not None else model

    @property
    def grid_size(self) -> int:
        """The side of the learned grid of position embeddings, in patches."""
        return self.image_size // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        """The length of the output sequence for `height` x `width` images."""
        return 1 + self.num_registers + (height // self.patch_size) * (width // self.patch_size)

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """The patch tokens of an output, `(batch, patches, embedding_dim)`: without the class token and registers."""
        return tokens[:, 1 + self.num_registers :]
