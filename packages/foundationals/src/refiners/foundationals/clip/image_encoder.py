"""CLIP's image tower: an image to one projected embedding (or to the hidden states of its penultimate layer).

`CLIPImageEncoderH` is OpenCLIP ViT-H/14, the image encoder of IP-Adapter for Stable Diffusion 1.5 (and of the SDXL
"vit-h" files); `CLIPImageEncoderG` is OpenCLIP ViT-bigG/14, that of IP-Adapter's SDXL base file. They compute what
transformers' `CLIPVisionModelWithProjection` computes: `image_embeds` (the class token after the final LayerNorm,
projected), and, with `with_penultimate_output`, `hidden_states[-2]` (what IP-Adapter plus resamples).

`preprocess` prepares images as transformers' `CLIPImageProcessor` does.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import Tensor
from torch.nn.functional import interpolate

import refiners.fluxion.layers as fl
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import image_to_tensor, load_metadata_from_safetensors
from refiners.foundationals.clip.common import GeLUApproximation, PositionalEncoder, TransformerLayer

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClassToken",
    "PatchEncoder",
    "ViTEmbeddings",
    "ClassTokenPooling",
    "CLIPImageEncoder",
    "CLIPImageEncoderH",
    "CLIPImageEncoderG",
    "CLIP_IMAGE_ENCODER_CLASSES",
    "preprocess",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""The per-channel mean of OpenAI CLIP's training images (transformers' `OPENAI_CLIP_MEAN`), which OpenCLIP kept."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Their standard deviation (transformers' `OPENAI_CLIP_STD`)."""


class ClassToken(fl.Parameter):
    """The learned class token, given to each image of the batch: `(batch, 1, embedding_dim)`.

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
    """Images `(batch, 3, size, size)` to patch tokens `(batch, (size // patch_size) ** 2, embedding_dim)`.

    A convolution without bias, with the patch size as kernel and stride, as in CLIP.

    Args:
        embedding_dim: The tokens' size.
        patch_size: The side of a patch, in pixels.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        patch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.patch_size = patch_size
        super().__init__(
            fl.Conv2d(3, embedding_dim, patch_size, stride=patch_size, use_bias=False, device=device, dtype=dtype),
            fl.Flatten(start_dim=2),
            fl.Transpose(1, 2),
        )


class ViTEmbeddings(fl.Chain):
    """The class token followed by the patch tokens, plus the learned position embeddings.

    Args:
        image_size: The side of the square images the model takes.
        embedding_dim: The tokens' size.
        patch_size: The side of a patch, in pixels.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        image_size: int,
        embedding_dim: int,
        patch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.image_size = image_size
        self.embedding_dim = embedding_dim
        self.patch_size = patch_size
        num_positions = (image_size // patch_size) ** 2 + 1
        super().__init__(
            fl.Concatenate(
                ClassToken(embedding_dim, device=device, dtype=dtype),
                PatchEncoder(embedding_dim, patch_size, device=device, dtype=dtype),
                dim=1,
            ),
            fl.Residual(PositionalEncoder(num_positions, embedding_dim, device=device, dtype=dtype)),
        )


class ClassTokenPooling(fl.Module):
    """`(batch, sequence, dim)` to `(batch, dim)`: the class token (the first of the sequence)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class CLIPImageEncoder(fl.Chain):
    """CLIP's vision transformer: images `(batch, 3, image_size, image_size)` to `(batch, output_dim)` embeddings.

    Patch and class tokens with position embeddings, a LayerNorm, the pre-norm transformer layers, then the class
    token through the final LayerNorm and the projection: transformers' `CLIPVisionModelWithProjection`'s
    `image_embeds`. Feed it `preprocess(image)`.

    Args:
        image_size: The side of the square images the model takes (224 for the released models).
        embedding_dim: Width of the transformer.
        output_dim: Size of the projected embedding.
        patch_size: The side of a patch, in pixels.
        num_layers: Number of transformer layers.
        num_attention_heads: Number of attention heads; it must divide `embedding_dim`.
        feedforward_dim: Hidden size of the feed-forward blocks.
        layer_norm_eps: The LayerNorms' epsilon.
        device: Where the weights live.
        dtype: The weights' dtype.
        gelu_approximation: `"none"` (exact GeLU) for OpenCLIP's models, `"quick"` for OpenAI's; keyword only.

    Example:
        ```py
        import torch
        from refiners.foundationals.clip import CLIPImageEncoder

        encoder = CLIPImageEncoder(
            embedding_dim=32, output_dim=16, patch_size=14, num_layers=2, num_attention_heads=4, feedforward_dim=64
        )
        images = torch.randn(2, 3, 224, 224)
        assert encoder(images).shape == (2, 16)
        assert encoder.with_penultimate_output()(images).shape == (2, 257, 32)  # (224 / 14) ** 2 patches + the class
        ```
    """

    def __init__(
        self,
        image_size: int = 224,
        embedding_dim: int = 768,
        output_dim: int = 512,
        patch_size: int = 32,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        feedforward_dim: int = 3072,
        layer_norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        gelu_approximation: GeLUApproximation = "none",
    ) -> None:
        if num_layers < 2:
            raise ValueError(f"CLIPImageEncoder needs at least two transformer layers, got num_layers={num_layers}")
        self.image_size = image_size
        self.embedding_dim = embedding_dim
        self.output_dim = output_dim
        self.patch_size = patch_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.feedforward_dim = feedforward_dim
        self.layer_norm_eps = layer_norm_eps
        self.gelu_approximation = gelu_approximation
        super().__init__(
            # Images come on CPU in float32 from `preprocess`: move them to the weights' device and dtype.
            fl.Converter(),
            ViTEmbeddings(image_size, embedding_dim, patch_size, device=device, dtype=dtype),
            fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
            *(
                TransformerLayer(
                    embedding_dim,
                    feedforward_dim=feedforward_dim,
                    num_attention_heads=num_attention_heads,
                    layer_norm_eps=layer_norm_eps,
                    gelu_approximation=gelu_approximation,
                    device=device,
                    dtype=dtype,
                )
                for _ in range(num_layers)
            ),
            ClassTokenPooling(),
            fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
            fl.Linear(embedding_dim, output_dim, bias=False, device=device, dtype=dtype),
        )

    @classmethod
    def from_safetensors(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "CLIPImageEncoder":
        """The encoder a converted file records (see `refiners-convert clip-image`), built at its sizes and loaded.

        Args:
            path: A `.safetensors` file written by `refiners-convert clip-image`.
            device: Where the weights go (default: CPU).
            dtype: The weights' dtype (default: float32).

        Raises:
            ValueError: The file records no model, or one that is not a `CLIPImageEncoder`.
        """
        config = ModelConfig.from_metadata(load_metadata_from_safetensors(path))
        if config is None:
            raise ValueError(
                f"{path} records no model (no refiners.model.* metadata): convert the checkpoint with "
                "`refiners-convert clip-image --from SOURCE --to FILE`, or build the encoder and call "
                "load_from_safetensors"
            )
        encoder = config.build(CLIP_IMAGE_ENCODER_CLASSES, device="meta", dtype=dtype)
        encoder.load_from_safetensors(path)
        return encoder.to(device=device) if device is not None else encoder

    def with_penultimate_output(self) -> Self:
        """A copy of this encoder, sharing its weights, that outputs the penultimate hidden states.

        That is the input of the last transformer layer, `(batch, 1 + patches, embedding_dim)` (transformers'
        `hidden_states[-2]`), which IP-Adapter plus resamples. Call it after loading the weights: the copy shares
        the tensors the encoder has at that time.
        """
        children = list(self)
        tail = [TransformerLayer, ClassTokenPooling, fl.LayerNorm, fl.Linear]
        if len(children) < 4 or [type(child) for child in children[-4:]] != tail:
            raise ValueError(
                f"{type(self).__name__} must end with its last TransformerLayer, ClassTokenPooling, final LayerNorm "
                f"and projection to drop them, but it ends with {[type(c).__name__ for c in children[-4:]]}: eject "
                "the adapters injected there first."
            )
        copy = self[:-4]
        copy.num_layers = self.num_layers - 1
        return copy


class CLIPImageEncoderH(CLIPImageEncoder):
    """OpenCLIP ViT-H/14 (1280 wide, 32 layers, 16 heads, output 1024): IP-Adapter's image encoder for SD1.5.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=1280,
            output_dim=1024,
            patch_size=14,
            num_layers=32,
            num_attention_heads=16,
            feedforward_dim=5120,
            device=device,
            dtype=dtype,
        )


class CLIPImageEncoderG(CLIPImageEncoder):
    """OpenCLIP ViT-bigG/14 (1664 wide, 48 layers, 16 heads, output 1280): IP-Adapter's SDXL base image encoder.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=1664,
            output_dim=1280,
            patch_size=14,
            num_layers=48,
            num_attention_heads=16,
            feedforward_dim=8192,
            device=device,
            dtype=dtype,
        )


CLIP_IMAGE_ENCODER_CLASSES: tuple[type[CLIPImageEncoder], ...] = (
    CLIPImageEncoder,
    CLIPImageEncoderH,
    CLIPImageEncoderG,
)
"""The classes a converted file may record (`CLIPImageEncoder.from_safetensors`)."""


def preprocess(images: "Image.Image | Sequence[Image.Image]", size: int = 224) -> Tensor:
    """Images as CLIP takes them, `(batch, 3, size, size)`, as transformers' `CLIPImageProcessor` prepares them.

    The shorter side is resized to `size` pixels (the longer one truncated as transformers computes it), bicubic
    with antialiasing on the 8-bit image, rounded to 8 bits (what the processor's torchvision backend does); the
    centre `size` x `size` square is cropped, then normalized with CLIP's mean and standard deviation.

    Args:
        images: A PIL image or several (each converted to RGB; sizes may differ).
        size: The side of the square the model sees.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    from PIL import Image

    batch = [images] if isinstance(images, Image.Image) else list(images)
    if not batch:
        raise ValueError("preprocess needs at least one image")
    return torch.cat([_preprocess_one(image, size) for image in batch])


def _preprocess_one(image: "Image.Image", size: int) -> Tensor:
    pixels = (image_to_tensor(image.convert("RGB")) * 255).round().to(torch.uint8)
    height, width = pixels.shape[-2:]
    resized = (int(size * height / width), size) if width <= height else (size, int(size * width / height))
    if resized != (height, width):
        # uint8 in, uint8 out (rounded), as torchvision's bicubic resize of an 8-bit image on the CPU.
        pixels = interpolate(pixels, size=resized, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    pixels = pixels[..., top : top + size, left : left + size]
    # The rescaling by 1/255 folded into the statistics, as transformers' fused rescale-and-normalize.
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std
