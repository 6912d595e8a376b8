"""The Stable Diffusion autoencoder: a KL-regularized VAE that maps images to latents 8 times smaller, and back.

`LatentDiffusionAutoencoder` is diffusers' `AutoencoderKL` (encoder, `quant_conv`, `post_quant_conv`, decoder) laid out
as a Chain: `Encoder` then `Decoder`. Its methods encode and decode tensors, PIL images, and (tile by tile, for sizes
that do not fit in memory) large images. `SD1Autoencoder` is the Stable Diffusion 1.x variant.
"""

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.utils import images_to_tensor, tensor_to_image, tensor_to_images

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "Resnet",
    "SelfAttentionBlock",
    "MidBlock",
    "EncoderBlock",
    "DecoderBlock",
    "Encoder",
    "Decoder",
    "LatentDiffusionAutoencoder",
    "SD1Autoencoder",
]

# diffusers builds every GroupNorm of the autoencoder with this epsilon (`resnet_eps` in its blocks).
_NORM_EPS = 1e-6


class Resnet(fl.Sum):
    """A residual block: `shortcut(x) + conv(silu(norm(conv(silu(norm(x))))))` (diffusers' `ResnetBlock2D`).

    The shortcut is the identity, or a 1x1 convolution when the number of channels changes.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        num_groups: Groups of the GroupNorms.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_groups = num_groups
        shortcut = (
            fl.Identity()
            if in_channels == out_channels
            else fl.Conv2d(in_channels, out_channels, kernel_size=1, device=device, dtype=dtype)
        )
        super().__init__(
            shortcut,
            fl.Chain(
                fl.GroupNorm(in_channels, num_groups, eps=_NORM_EPS, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
                fl.GroupNorm(out_channels, num_groups, eps=_NORM_EPS, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            ),
        )


class SelfAttentionBlock(fl.Residual):
    """`x + attention(norm(x))`: single-head self-attention over the positions of a group-normed feature map.

    This is diffusers' mid-block `Attention` on NCHW maps (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`, with a
    residual connection).

    Args:
        channels: Channels of the feature map (the attention's embedding size).
        num_groups: Groups of the GroupNorm.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        channels: int,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = channels
        self.num_groups = num_groups
        super().__init__(
            fl.GroupNorm(channels, num_groups, eps=_NORM_EPS, device=device, dtype=dtype),
            fl.SelfAttention2d(channels, device=device, dtype=dtype),
        )


class MidBlock(fl.Chain):
    """The lowest-resolution block of the encoder and of the decoder: a Resnet, self-attention, a Resnet.

    Args:
        channels: Channels of the feature map.
        num_groups: Groups of the GroupNorms.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        channels: int,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = channels
        self.num_groups = num_groups
        super().__init__(
            Resnet(channels, channels, num_groups, device=device, dtype=dtype),
            SelfAttentionBlock(channels, num_groups, device=device, dtype=dtype),
            Resnet(channels, channels, num_groups, device=device, dtype=dtype),
        )


class EncoderBlock(fl.Chain):
    """`num_resnets` Resnets, then (unless it is the last block) a downsampling by 2 (diffusers' `DownEncoderBlock2D`).

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        num_resnets: Number of Resnets.
        downsample: Whether to end with a strided convolution that halves the height and width.
        num_groups: Groups of the GroupNorms.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_resnets: int,
        downsample: bool,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_resnets = num_resnets
        self.downsample = downsample
        super().__init__(
            (
                Resnet(
                    in_channels if index == 0 else out_channels, out_channels, num_groups, device=device, dtype=dtype
                )
                for index in range(num_resnets)
            ),
            # Pad right and bottom by one, then a stride-2 convolution: diffusers' `Downsample2D(padding=0)`. The
            # decoder upsamples by a fixed factor, so the input size is not recorded for it (register_shape=False).
            [fl.Downsample(out_channels, scale_factor=2, register_shape=False, device=device, dtype=dtype)]
            if downsample
            else [],
        )


class DecoderBlock(fl.Chain):
    """`num_resnets` Resnets, then (unless it is the last block) a 2x nearest upsampling and a convolution (diffusers'
    `UpDecoderBlock2D`).

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        num_resnets: Number of Resnets.
        upsample: Whether to end by doubling the height and width.
        num_groups: Groups of the GroupNorms.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_resnets: int,
        upsample: bool,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_resnets = num_resnets
        self.upsample = upsample
        super().__init__(
            (
                Resnet(
                    in_channels if index == 0 else out_channels, out_channels, num_groups, device=device, dtype=dtype
                )
                for index in range(num_resnets)
            ),
            [fl.Upsample(out_channels, upsample_factor=2, device=device, dtype=dtype)] if upsample else [],
        )


class Encoder(fl.Chain):
    """Image `(batch, in_channels, H, W)` in [-1, 1] to the mean of the latent distribution, `(batch, latent_channels,
    H / f, W / f)` with `f = 2 ** (len(block_out_channels) - 1)`; not scaled by the autoencoder's `encoder_scale`.

    The last two layers are diffusers' `quant_conv`, which outputs the mean and log-variance of the diagonal
    Gaussian posterior concatenated on channels, and a slicing that keeps the mean (see
    `LatentDiffusionAutoencoder.encode`).

    Args:
        in_channels: Channels of the image.
        latent_channels: Channels of the latents.
        block_out_channels: Output channels of each EncoderBlock; all but the last halve the height and width.
        layers_per_block: Resnets per EncoderBlock.
        num_groups: Groups of the GroupNorms.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.block_out_channels = tuple(block_out_channels)
        self.layers_per_block = layers_per_block
        self.num_groups = num_groups
        channels = self.block_out_channels
        super().__init__(
            fl.Conv2d(in_channels, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype),
            (
                EncoderBlock(
                    channels[max(index - 1, 0)],
                    channels[index],
                    num_resnets=layers_per_block,
                    downsample=index < len(channels) - 1,
                    num_groups=num_groups,
                    device=device,
                    dtype=dtype,
                )
                for index in range(len(channels))
            ),
            MidBlock(channels[-1], num_groups, device=device, dtype=dtype),
            fl.Chain(
                fl.GroupNorm(channels[-1], num_groups, eps=_NORM_EPS, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(channels[-1], 2 * latent_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            ),
            fl.Conv2d(2 * latent_channels, 2 * latent_channels, kernel_size=1, device=device, dtype=dtype),
            fl.Slicing(dim=1, end=latent_channels),
        )


class Decoder(fl.Chain):
    """Latents `(batch, latent_channels, h, w)` (not scaled by `encoder_scale`) to an image `(batch, out_channels,
    h * f, w * f)` in [-1, 1] (roughly: it is not clamped).

    The first layer is diffusers' `post_quant_conv`.

    Args:
        out_channels: Channels of the image.
        latent_channels: Channels of the latents.
        block_out_channels: The encoder's `block_out_channels`: the DecoderBlocks use them in reverse order.
        layers_per_block: The encoder's; each DecoderBlock has one Resnet more.
        num_groups: Groups of the GroupNorms.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        out_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.block_out_channels = tuple(block_out_channels)
        self.layers_per_block = layers_per_block
        self.num_groups = num_groups
        channels = self.block_out_channels[::-1]
        super().__init__(
            fl.Conv2d(latent_channels, latent_channels, kernel_size=1, device=device, dtype=dtype),
            fl.Conv2d(latent_channels, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype),
            MidBlock(channels[0], num_groups, device=device, dtype=dtype),
            (
                DecoderBlock(
                    channels[max(index - 1, 0)],
                    channels[index],
                    num_resnets=layers_per_block + 1,
                    upsample=index < len(channels) - 1,
                    num_groups=num_groups,
                    device=device,
                    dtype=dtype,
                )
                for index in range(len(channels))
            ),
            fl.Chain(
                fl.GroupNorm(channels[-1], num_groups, eps=_NORM_EPS, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            ),
        )


class LatentDiffusionAutoencoder(fl.Chain):
    """The autoencoder of latent diffusion models (diffusers' `AutoencoderKL`): an `Encoder` and a `Decoder`.

    Called as a Chain, it reconstructs an image in [-1, 1]: `decoder(encoder(x))`. Its methods work at the level the
    diffusion model sees:

    - `encode` / `decode`: tensors in [-1, 1] to latents scaled by `encoder_scale`, and back.
    - `image_to_latents`, `images_to_latents`, `decode_latents`, `latents_to_images`: the same for PIL images, whose
      values in [0, 1] are mapped to [-1, 1] before encoding, and back after decoding.
    - `tiled_encode`, `tiled_decode`, `tiled_image_to_latents`, `tiled_decode_latents`: tile by tile, for images too
      large to go through the model at once.

    Encoding is deterministic: it returns the mean of the diagonal Gaussian posterior, as the original refiners does
    (and as diffusers' `latent_dist.mode()`); `encode(x, sample=True)` draws from it instead. Images must have a
    height and width that are multiples of the downscale factor (8 for Stable Diffusion).

    Args:
        encoder_scale: The factor applied to the encoder's output so that latents have roughly unit variance
            (diffusers' `scaling_factor`).
        in_channels: Channels of the input images.
        out_channels: Channels of the output images.
        latent_channels: Channels of the latents.
        block_out_channels: Output channels of the encoder blocks (the decoder's, reversed).
        layers_per_block: Resnets per encoder block (the decoder has one more per block).
        num_groups: Groups of the GroupNorms.
        device: Where the weights live.
        dtype: The weights' dtype.

    Example:
        ```py
        import torch
        from PIL import Image
        from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder

        # A toy autoencoder of the Stable Diffusion family (SD1Autoencoder is the real one).
        lda = LatentDiffusionAutoencoder(encoder_scale=0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
        with torch.no_grad():
            latents = lda.image_to_latents(Image.new("RGB", (64, 48)))
            assert latents.shape == (1, 4, 6, 8)
            assert lda.decode_latents(latents).size == (64, 48)
            # Tile by tile, as for images too large to decode at once: here 2x2 tiles of 32x32 pixels.
            assert lda.tiled_decode_latents(latents, tile_size=32, overlap=16).size == (64, 48)
        ```
    """

    def __init__(
        self,
        encoder_scale: float,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.encoder_scale = encoder_scale
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.block_out_channels = tuple(block_out_channels)
        self.layers_per_block = layers_per_block
        self.num_groups = num_groups
        super().__init__(
            Encoder(
                in_channels,
                latent_channels,
                block_out_channels,
                layers_per_block,
                num_groups,
                device=device,
                dtype=dtype,
            ),
            Decoder(
                out_channels,
                latent_channels,
                block_out_channels,
                layers_per_block,
                num_groups,
                device=device,
                dtype=dtype,
            ),
        )

    @property
    def encoder(self) -> Encoder:
        return self.layer("Encoder", Encoder)

    @property
    def decoder(self) -> Decoder:
        return self.layer("Decoder", Decoder)

    @property
    def downscale_factor(self) -> int:
        """How many image pixels one latent covers along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    # -- tensors ---------------------------------------------------------------------------------------------------

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] to latents scaled by `encoder_scale`.

        Args:
            x: The images, `(batch, in_channels, height, width)`, height and width multiples of `downscale_factor`.
            sample: Draw the latents from the posterior `N(mean, exp(log_variance))` (as diffusers'
                `latent_dist.sample()`) instead of returning its mean.
            generator: The random generator of the draw (only with `sample=True`).

        Returns:
            The latents, `(batch, latent_channels, height / downscale_factor, width / downscale_factor)`.
        """
        self._check_images(x, "encode")
        if not sample:
            if generator is not None:
                raise ValueError("encode got a generator but sample=False: pass sample=True to draw the latents")
            return self.encoder(x) * self.encoder_scale
        # All but the last layer (the slicing to the mean): the posterior's mean and log-variance.
        mean, log_variance = self.encoder[:-1](x).chunk(2, dim=1)
        # diffusers' `DiagonalGaussianDistribution` clamps the log-variance, and draws the noise with this call, on
        # the generator's device (a CPU generator with a GPU model gives the same draw as on CPU).
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        draw_device = mean.device if generator is None else generator.device
        noise = torch.randn(mean.shape, generator=generator, device=draw_device, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * self.encoder_scale

    def decode(self, latents: Tensor) -> Tensor:
        """Latents scaled by `encoder_scale` to images in [-1, 1] (not clamped).

        Args:
            latents: The latents, `(batch, latent_channels, height, width)`.

        Returns:
            The images, `(batch, out_channels, height * downscale_factor, width * downscale_factor)`.
        """
        self._check_latents(latents, "decode")
        return self.decoder(latents / self.encoder_scale)

    # -- PIL images ------------------------------------------------------------------------------------------------

    def image_to_latents(self, image: "Image.Image") -> Tensor:
        """A PIL image to latents `(1, latent_channels, height / 8, width / 8)` (see `encode`).

        Args:
            image: An RGB image whose width and height are multiples of `downscale_factor`.
        """
        return self.images_to_latents([image])

    def images_to_latents(self, images: Sequence["Image.Image"]) -> Tensor:
        """PIL images of one size to a batch of latents (see `encode`).

        Args:
            images: RGB images whose width and height are multiples of `downscale_factor`.
        """
        return self.encode(self._images_to_tensor(images))

    def decode_latents(self, latents: Tensor) -> "Image.Image":
        """Latents `(1, latent_channels, height, width)` to a PIL image (values clamped to [0, 1], then rounded).

        Args:
            latents: One latent (batch of one); use `latents_to_images` for a batch.
        """
        self._check_single(latents, "decode_latents", "latents_to_images")
        return tensor_to_image((self.decode(latents) + 1) / 2)

    def latents_to_images(self, latents: Tensor) -> "list[Image.Image]":
        """A batch of latents to PIL images (see `decode_latents`).

        Args:
            latents: The latents, `(batch, latent_channels, height, width)`.
        """
        return tensor_to_images((self.decode(latents) + 1) / 2)

    # -- tiles -----------------------------------------------------------------------------------------------------

    def tiled_encode(self, x: Tensor, tile_size: int | tuple[int, int] = 512, overlap: int = 128) -> Tensor:
        """`encode` tile by tile: only one `tile_size` tile goes through the encoder at a time.

        The tiles' latents are blended, MultiDiffusion-style: every latent is the weighted average of the tiles that
        cover it, the weight of a tile ramping linearly from its inner borders over `overlap`. Where two tiles overlap
        by exactly `overlap`, this is the linear cross-fade of diffusers' tiled VAE; unlike diffusers, all tiles have
        the full tile size (they are spread evenly, overlapping by at least `overlap`), so no tile is a thin sliver
        at the right or bottom border whose normalization statistics would be off.

        Tiling is an approximation: each tile is normalized (GroupNorm) and attended over on its own, so the result
        differs from `encode`'s, less so with larger tiles. An image that fits in one tile is encoded exactly as by
        `encode`.

        Args:
            x: The images in [-1, 1], `(batch, in_channels, height, width)` (multiples of `downscale_factor`).
            tile_size: The side of a tile in pixels, or its `(height, width)` (multiples of `downscale_factor`).
            overlap: The minimum overlap of neighbouring tiles, and the length of the blending ramps, in pixels (a
                multiple of `downscale_factor`, smaller than the tile).
        """
        self._check_images(x, "tiled_encode")
        factor = self.downscale_factor
        tile = self._tile_shape(tile_size, overlap)
        latent_tile = (tile[0] // factor, tile[1] // factor)
        height, width = x.shape[2] // factor, x.shape[3] // factor
        blend = _TileBlend(
            output_shape=(x.shape[0], self.latent_channels, height, width),
            tile=latent_tile,
            ramp=overlap // factor,
            device=x.device,
        )
        for top, left in blend.tiles():
            pixels = x[
                :, :, top * factor : (top + latent_tile[0]) * factor, left * factor : (left + latent_tile[1]) * factor
            ]
            blend.add(self.encode(pixels), top, left)
        return blend.result(dtype=x.dtype)

    def tiled_decode(self, latents: Tensor, tile_size: int | tuple[int, int] = 512, overlap: int = 128) -> Tensor:
        """`decode` tile by tile: only one `tile_size` tile goes through the decoder at a time.

        Latent tiles of `tile_size / downscale_factor` are decoded separately and their images blended as in
        `tiled_encode` (weighted average with linear ramps over `overlap` pixels). Latents that fit in one tile are
        decoded exactly as by `decode`.

        Args:
            latents: The latents, `(batch, latent_channels, height, width)`.
            tile_size: The side of a tile in output pixels, or its `(height, width)` (multiples of
                `downscale_factor`).
            overlap: The minimum overlap of neighbouring tiles, and the length of the blending ramps, in output pixels
                (a multiple of `downscale_factor`, smaller than the tile).
        """
        self._check_latents(latents, "tiled_decode")
        factor = self.downscale_factor
        tile = self._tile_shape(tile_size, overlap)
        latent_tile = (tile[0] // factor, tile[1] // factor)
        blend = _TileBlend(
            output_shape=(latents.shape[0], self.out_channels, latents.shape[2] * factor, latents.shape[3] * factor),
            tile=tile,
            ramp=overlap,
            device=latents.device,
            step=factor,
        )
        for top, left in blend.tiles():
            latent_top, latent_left = top // factor, left // factor
            part = latents[:, :, latent_top : latent_top + latent_tile[0], latent_left : latent_left + latent_tile[1]]
            blend.add(self.decode(part), top, left)
        return blend.result(dtype=latents.dtype)

    def tiled_image_to_latents(
        self, image: "Image.Image", tile_size: int | tuple[int, int] = 512, overlap: int = 128
    ) -> Tensor:
        """A PIL image to latents, tile by tile (see `tiled_encode`).

        Args:
            image: An RGB image whose width and height are multiples of `downscale_factor`.
            tile_size: The side of a tile in pixels, or its `(height, width)`.
            overlap: The minimum overlap of neighbouring tiles, in pixels.
        """
        return self.tiled_encode(self._images_to_tensor([image]), tile_size=tile_size, overlap=overlap)

    def tiled_decode_latents(
        self, latents: Tensor, tile_size: int | tuple[int, int] = 512, overlap: int = 128
    ) -> "Image.Image":
        """Latents `(1, latent_channels, height, width)` to a PIL image, tile by tile (see `tiled_decode`).

        Args:
            latents: One latent (batch of one).
            tile_size: The side of a tile in output pixels, or its `(height, width)`.
            overlap: The minimum overlap of neighbouring tiles, in output pixels.
        """
        self._check_single(latents, "tiled_decode_latents", "tiled_decode")
        return tensor_to_image((self.tiled_decode(latents, tile_size=tile_size, overlap=overlap) + 1) / 2)

    # -- checks ----------------------------------------------------------------------------------------------------

    def _images_to_tensor(self, images: Sequence["Image.Image"]) -> Tensor:
        for image in images:
            if len(image.getbands()) != self.in_channels:
                raise ValueError(
                    f"the autoencoder encodes images with {self.in_channels} channels, got a {image.mode!r} image: "
                    f"convert it first (e.g. `image.convert('RGB')`)"
                )
        return images_to_tensor(images, device=self.device, dtype=self.dtype) * 2 - 1

    def _check_images(self, x: Tensor, method: str) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{method} takes images (batch, {self.in_channels}, height, width) in [-1, 1], got shape "
                f"{tuple(x.shape)}"
            )
        height, width = x.shape[2:]
        factor = self.downscale_factor
        if height % factor != 0 or width % factor != 0:
            fixed_width, fixed_height = max(width // factor, 1) * factor, max(height // factor, 1) * factor
            raise ValueError(
                f"the autoencoder needs images whose width and height are multiples of {factor}, got {width}x{height} "
                f"(width x height): resize or crop the image to a multiple of {factor}, e.g. to "
                f"{fixed_width}x{fixed_height} (`image.resize(({fixed_width}, {fixed_height}))` for a PIL image, "
                f"`x[..., :{fixed_height}, :{fixed_width}]` for a tensor)"
            )

    def _check_latents(self, latents: Tensor, method: str) -> None:
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{method} takes latents (batch, {self.latent_channels}, height, width), got shape "
                f"{tuple(latents.shape)}"
            )

    def _check_single(self, latents: Tensor, method: str, batch_method: str) -> None:
        self._check_latents(latents, method)
        if latents.shape[0] != 1:
            raise ValueError(
                f"{method} makes one image from latents with a batch of one, got a batch of {latents.shape[0]}: use "
                f"{batch_method} for a batch"
            )

    def _tile_shape(self, tile_size: int | tuple[int, int], overlap: int) -> tuple[int, int]:
        tile = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        factor = self.downscale_factor
        if any(side % factor != 0 or side <= 0 for side in tile) or overlap % factor != 0 or overlap < 0:
            raise ValueError(
                f"tile_size and overlap are in pixels and must be multiples of {factor} (one latent covers "
                f"{factor}x{factor} pixels), got tile_size={tile_size}, overlap={overlap}"
            )
        if overlap >= min(tile):
            raise ValueError(
                f"overlap must be smaller than the tile, got overlap={overlap} for tile_size={tile_size}: tiles that "
                f"overlap entirely never advance"
            )
        return tile


class SD1Autoencoder(LatentDiffusionAutoencoder):
    """The autoencoder of Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5's `vae`): latents 8 times smaller than
    the image, with 4 channels, scaled by 0.18215.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            encoder_scale=0.18215,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            num_groups=32,
            device=device,
            dtype=dtype,
        )


class _TileBlend:
    """Accumulates overlapping tiles of an output into their weighted average (MultiDiffusion-style).

    A tile's weight is 1 inside and ramps linearly over `ramp` samples from each side that borders another tile,
    so weights of two tiles overlapping by `ramp` sum to 1 (a linear cross-fade). Tiles are spread evenly along
    each axis, overlapping by at least `ramp`; the image borders get weight 1 (no neighbour to blend with).
    """

    def __init__(
        self,
        output_shape: tuple[int, int, int, int],
        tile: tuple[int, int],
        ramp: int,
        device: torch.device,
        step: int = 1,
    ) -> None:
        self.tile = (min(tile[0], output_shape[2]), min(tile[1], output_shape[3]))
        self.ramp = ramp
        self.device = device
        # Float32 accumulators: averaging in half precision would lose the low bits of each tile.
        self.total = torch.zeros(output_shape, device=device, dtype=torch.float32)
        self.weights = torch.zeros(output_shape[2:], device=device, dtype=torch.float32)
        self.starts = (
            _tile_starts(output_shape[2], self.tile[0], ramp, step),
            _tile_starts(output_shape[3], self.tile[1], ramp, step),
        )

    def tiles(self) -> list[tuple[int, int]]:
        """The `(top, left)` corner of every tile, in output samples."""
        return [(top, left) for top in self.starts[0] for left in self.starts[1]]

    def add(self, values: Tensor, top: int, left: int) -> None:
        height, width = self.tile
        weight = torch.outer(
            self._axis_weights(top, height, self.starts[0][-1]),
            self._axis_weights(left, width, self.starts[1][-1]),
        )
        self.total[:, :, top : top + height, left : left + width] += values.float() * weight
        self.weights[top : top + height, left : left + width] += weight

    def result(self, dtype: torch.dtype) -> Tensor:
        return (self.total / self.weights).to(dtype)

    def _axis_weights(self, start: int, size: int, last_start: int) -> Tensor:
        weights = torch.ones(size, device=self.device, dtype=torch.float32)
        if self.ramp == 0:
            return weights
        # Half-sample offsets: the weights are never 0, and two mirrored ramps sum to exactly 1.
        ramp = (torch.arange(size, device=self.device, dtype=torch.float32) + 0.5) / self.ramp
        if start > 0:
            weights = torch.minimum(weights, ramp)
        if start < last_start:
            weights = torch.minimum(weights, ramp.flip(0))
        return weights


def _tile_starts(length: int, tile: int, overlap: int, step: int) -> list[int]:
    """Starts of tiles of size `tile` covering `[0, length)`, evenly spread, overlapping by at least `overlap`, on
    multiples of `step` (tiles of a decoded image start on latent boundaries)."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    spacing = (length - tile) / (count - 1)
    return [math.floor(index * spacing / step) * step if index < count - 1 else length - tile for index in range(count)]
