"""Inpainting for any family: the UNet (9 input channels) also sees the mask and the latents of the masked image.

`Inpainting` comes before the family's pipeline in an inpainting pipeline's bases (`StableDiffusion_1_Inpainting`,
`StableDiffusion_XL_Inpainting`): it sets the UNet's extra input channels, draws pure noise at full strength, and
makes `generate` take an `init_image` and a `mask`, as diffusers' inpainting pipelines do.
"""

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.functional import interpolate

from refiners.fluxion.utils import image_to_tensor
from refiners.foundationals.latent_diffusion.model import LatentDiffusionModel

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Inpainting"]


class Inpainting(LatentDiffusionModel[Any, Any]):
    """The inpainting part of a pipeline: the mask and the masked image's latents, concatenated to the latents.

    Set them with `set_inpainting_conditions` before denoising; they apply to every latent of the batch.
    """

    unet_in_channels: int = 9
    mask_latents: Tensor | None = None
    target_image_latents: Tensor | None = None

    def set_inpainting_conditions(
        self, target_image: "Image.Image", mask: "Image.Image", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Set the image to inpaint and where: the mask and the masked image's latents that the UNet then sees.

        As diffusers: the mask is binarized at 0.5 (white: paint), the image is blanked where the mask is set and
        encoded drawing from the autoencoder's posterior, and the mask is resized (nearest) to the latents' size.

        Args:
            target_image: The image to inpaint (width and height multiples of 8).
            mask: Where to paint (white) and what to keep (black), the size of the image.
            generator: The random generator of the posterior draw (default: torch's global one).

        Returns:
            The mask `(1, 1, h, w)` and the masked image's latents `(1, 4, h, w)`, at the latents' size.
        """
        if mask.size != target_image.size:
            raise ValueError(
                f"the mask must have the size of the image it applies to: got a {mask.width}x{mask.height} mask for "
                f"a {target_image.width}x{target_image.height} image (width x height); resize the mask to the image"
            )
        height, width = self._check_size((target_image.height, target_image.width))
        pixels = image_to_tensor(target_image.convert("RGB"), device=self.lda.device, dtype=self.lda.dtype) * 2 - 1
        mask_tensor = (image_to_tensor(mask.convert("L"), device=self.lda.device, dtype=torch.float32) >= 0.5).to(
            self.lda.dtype
        )
        masked_image = pixels * (mask_tensor < 0.5)
        factor = self.lda.downscale_factor
        self.mask_latents = interpolate(mask_tensor, size=(height // factor, width // factor)).to(
            device=self.device, dtype=self.dtype
        )
        self.target_image_latents = self.lda.encode(masked_image, sample=True, generator=generator).to(
            device=self.device, dtype=self.dtype
        )
        return self.mask_latents, self.target_image_latents

    def init_latents(
        self,
        size: tuple[int, int],
        init_image: "Image.Image | None" = None,
        noise: Tensor | None = None,
        strength: float | None = None,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """As `LatentDiffusionModel.init_latents`, but at full strength (the default here) the init image is not
        used: the latents are pure noise, as in diffusers' inpainting pipeline.

        Args:
            size: `(height, width)` of the image to generate, in pixels.
            init_image: The image to start from, for a strength below 1.
            noise: The noise; drawn when not given.
            strength: The share of the schedule to denoise the image over, in (0, 1] (default 1).
            batch_size: How many latents to draw when `noise` is not given (default 1).
            generator: The random generator of the draws.
        """
        if init_image is not None and (strength is None or strength == 1.0):
            init_image, strength = None, None
        return super().init_latents(size, init_image, noise, strength, batch_size=batch_size, generator=generator)

    def _unet_input(self, latents: Tensor) -> Tensor:
        if self.mask_latents is None or self.target_image_latents is None:
            raise ValueError(
                "the inpainting model needs its conditions: call set_inpainting_conditions(target_image, mask) first"
            )
        if self.mask_latents.shape[2:] != latents.shape[2:]:
            raise ValueError(
                f"the inpainting conditions are for {tuple(self.mask_latents.shape[2:])} latents, got "
                f"{tuple(latents.shape[2:])}: call set_inpainting_conditions with an image of the generation's size"
            )
        batch = latents.shape[0]
        return torch.cat(
            [
                latents,
                self.mask_latents.expand(batch, -1, -1, -1),
                self.target_image_latents.expand(batch, -1, -1, -1),
            ],
            dim=1,
        )

    def _check_generation_images(self, init_image: "Image.Image | None", mask: "Image.Image | None") -> None:
        if init_image is None or mask is None:
            raise ValueError("inpainting needs the image to paint into (init_image) and where to paint (mask)")
        if mask.size != init_image.size:
            raise ValueError(
                f"the mask must have the size of the image it applies to: got a {mask.width}x{mask.height} mask for "
                f"a {init_image.width}x{init_image.height} init_image (width x height); resize the mask to the image"
            )

    def _set_generation_conditions(
        self, init_image: "Image.Image | None", mask: "Image.Image | None", generator: torch.Generator | None
    ) -> None:
        assert init_image is not None and mask is not None, "checked by _check_generation_images"
        self.set_inpainting_conditions(init_image, mask, generator)
