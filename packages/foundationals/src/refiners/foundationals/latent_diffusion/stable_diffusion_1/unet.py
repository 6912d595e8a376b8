"""The Stable Diffusion 1.x UNet: the generic `UNet` with SD1.5's topology (four resolutions, attention at the first
three, one transformer layer per block, 1x1 convolutions around them)."""

import torch

from refiners.foundationals.latent_diffusion.unet import UNet, UNetTopology

__all__ = ["SD1_CHANNELS", "SD1UNet"]

SD1_CHANNELS = (320, 640, 1280, 1280)
"""The widths of the four resolutions of the SD1 UNet (diffusers' `block_out_channels`)."""

Channels = tuple[int, int, int, int]
Device = torch.device | str | None


class SD1UNet(UNet):
    """The Stable Diffusion 1.x UNet: predicts the noise of `(batch, in_channels, height, width)` latents.

    Set the side inputs, then call it on the latents:

    - `set_timestep(timestep)`: a scalar or one timestep per batch element;
    - `set_clip_text_embedding(embedding)`: `(batch, 77, 768)`, the CLIP ViT-L text encoder's output.

    They stay set until changed. Any height and width are accepted (odd sizes too: each upsampling restores the
    exact size of its mirror downsampling's input).

    Args:
        in_channels: Channels of the latents: 4, or 9 for the inpainting UNet (latents, mask, masked-image latents).
        channels: The widths of the four resolutions: SD1's. Smaller ones build the same architecture at toy size
            (each must be a multiple of 32, the GroupNorms' groups, and of `num_attention_heads`).
        context_embedding_dim: Size of the text embedding.
        num_attention_heads: Number of heads of the transformers (diffusers' `attention_head_dim`, 8 in SD1).
        device: Where the weights live (`"meta"` builds the model without allocating nor initializing them, to
            load weights into it).
        dtype: The weights' dtype.

    Example:
        ```py
        import torch
        from refiners.foundationals.latent_diffusion.stable_diffusion_1 import SD1UNet

        unet = SD1UNet(in_channels=4, channels=(32, 32, 64, 64), context_embedding_dim=16)
        unet.set_timestep(torch.tensor([999, 500]))
        unet.set_clip_text_embedding(torch.randn(2, 77, 16))
        with torch.no_grad():
            noise = unet(torch.randn(2, 4, 8, 8))
        assert noise.shape == (2, 4, 8, 8)
        ```
    """

    def __init__(
        self,
        in_channels: int = 4,
        *,
        channels: Channels = SD1_CHANNELS,
        context_embedding_dim: int = 768,
        num_attention_heads: int = 8,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = tuple(channels)
        self.num_attention_heads = num_attention_heads
        if len(self.channels) != 4:
            raise ValueError(f"the SD1 UNet has four resolutions: channels must have 4 widths, got {channels}")
        topology = UNetTopology(
            channels=self.channels,
            attention_levels=(True, True, True, False),
            transformer_depths=(1, 1, 1, 1),
            num_attention_heads=(num_attention_heads,) * 4,
            context_embedding_dim=context_embedding_dim,
        )
        super().__init__(in_channels, topology, device=device, dtype=dtype)
