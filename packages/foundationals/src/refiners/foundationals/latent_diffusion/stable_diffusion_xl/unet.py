"""The Stable Diffusion XL UNets: diffusers' `UNet2DConditionModel` with the SDXL base and refiner configurations.

Three resolutions for the base (no attention at the highest one, 2 then 10 transformer layers below), linear
projections around the transformers, and a text-time embedding: the pooled text embedding and the "time ids"
(original size, crop, target size; the aesthetic score for the refiner), each id embedded sinusoidally, go through an
MLP whose output is added to the timestep embedding (diffusers' `addition_embed_type="text_time"`).
"""

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts
from refiners.foundationals.latent_diffusion.range_adapter import (
    RANGE_ADAPTER_CONTEXT,
    TIMESTEP_EMBEDDING_KEY,
    compute_sinusoidal_embedding,
)
from refiners.foundationals.latent_diffusion.unet import UNet, UNetTopology

__all__ = [
    "TEXT_TIME_CONTEXT",
    "POOLED_TEXT_EMBEDDING_KEY",
    "TIME_IDS_KEY",
    "TimeIdsEmbedding",
    "TextTimeEmbedding",
    "SDXLUNet",
    "SDXLRefinerUNet",
]

TEXT_TIME_CONTEXT = "text_time"
POOLED_TEXT_EMBEDDING_KEY = "pooled_text_embedding"
"""`TEXT_TIME_CONTEXT[POOLED_TEXT_EMBEDDING_KEY]`: `(batch, pooled_embedding_dim)`, the second text encoder's pooled output."""
TIME_IDS_KEY = "time_ids"
"""`TEXT_TIME_CONTEXT[TIME_IDS_KEY]`: `(batch, num_time_ids)`, e.g. `[h, w, top, left, target_h, target_w]`."""

Device = torch.device | str | None


class TimeIdsEmbedding(fl.Module):
    """`(batch, n)` time ids to `(batch, n * embedding_dim)`: each id's sinusoidal features, side by side.

    diffusers' `add_time_proj` (flip to cos-first, no frequency shift), on the flattened ids.

    Args:
        embedding_dim: Sinusoidal features per id (diffusers' `addition_time_embed_dim`, 256).
    """

    def __init__(self, embedding_dim: int = 256) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim

    def forward(self, time_ids: Tensor) -> Tensor:
        features = compute_sinusoidal_embedding(time_ids.flatten(), self.embedding_dim)
        return features.reshape(time_ids.shape[0], -1)


class TextTimeEmbedding(fl.Passthrough):
    """Add `MLP(cat(pooled_text_embedding, time_ids_features))` to the timestep embedding; pass the input through.

    Reads `TEXT_TIME_CONTEXT` and updates `RANGE_ADAPTER_CONTEXT[TIMESTEP_EMBEDDING_KEY]` (written just before by
    the `TimestepEncoder`), which every residual block then reads.

    Args:
        pooled_embedding_dim: Size of the pooled text embedding (1280 for OpenCLIP ViT-bigG).
        num_time_ids: Number of time ids (6 for the base, 5 for the refiner).
        time_embedding_dim: Sinusoidal features per time id (256).
        embedding_dim: Size of the timestep embedding (4 times the UNet's first width).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        pooled_embedding_dim: int = 1280,
        num_time_ids: int = 6,
        time_embedding_dim: int = 256,
        embedding_dim: int = 1280,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.pooled_embedding_dim = pooled_embedding_dim
        self.num_time_ids = num_time_ids
        self.time_embedding_dim = time_embedding_dim
        self.embedding_dim = embedding_dim
        input_dim = pooled_embedding_dim + num_time_ids * time_embedding_dim
        super().__init__(
            fl.Sum(
                fl.UseContext(RANGE_ADAPTER_CONTEXT, TIMESTEP_EMBEDDING_KEY),
                fl.Chain(
                    fl.Concatenate(
                        fl.Chain(fl.UseContext(TEXT_TIME_CONTEXT, POOLED_TEXT_EMBEDDING_KEY), fl.Converter()),
                        fl.Chain(
                            fl.UseContext(TEXT_TIME_CONTEXT, TIME_IDS_KEY),
                            TimeIdsEmbedding(time_embedding_dim),
                            fl.Converter(),
                        ),
                        dim=-1,
                    ),
                    fl.Linear(input_dim, embedding_dim, device=device, dtype=dtype),
                    fl.SiLU(),
                    fl.Linear(embedding_dim, embedding_dim, device=device, dtype=dtype),
                ),
            ),
            fl.SetContext(RANGE_ADAPTER_CONTEXT, TIMESTEP_EMBEDDING_KEY),
        )


class SDXLUNet(UNet):
    """The Stable Diffusion XL UNet: predicts the noise of `(batch, in_channels, height, width)` latents.

    Set the side inputs, then call it on the latents:

    - `set_timestep(timestep)`: a scalar or one timestep per batch element;
    - `set_clip_text_embedding(embedding)`: `(batch, 77, 2048)`, the two text encoders' hidden states side by side;
    - `set_pooled_text_embedding(pooled)`: `(batch, 1280)`;
    - `set_time_ids(time_ids)`: `(batch, 6)`, `[original_h, original_w, crop_top, crop_left, target_h, target_w]`.

    The defaults are the SDXL base's sizes (diffusers' config names in brackets); smaller ones build the same
    architecture at toy size.

    Args:
        in_channels: Channels of the latents: 4, or 9 for the inpainting UNet.
        channels: The widths of the resolutions (`block_out_channels`).
        attention_levels: Which resolutions have transformers (`CrossAttn*Block2D` block types).
        transformer_depths: Transformer layers per block, per resolution (`transformer_layers_per_block`).
        num_attention_heads: Heads per resolution (`attention_head_dim`, which SDXL uses as the number of heads).
        context_embedding_dim: Size of the text embedding (`cross_attention_dim`).
        pooled_embedding_dim: Size of the pooled text embedding.
        num_time_ids: Number of time ids (6; the refiner's 5).
        time_embedding_dim: Sinusoidal features per time id (`addition_time_embed_dim`).
        layers_per_block: Residual blocks per down block (`layers_per_block`).
        guidance_embedding_dim: The LCM SDXL UNet's guidance scale features (`time_cond_proj_dim`, 256): it takes
            the guidance scale as an input (`set_guidance_scale`) instead of running a negative batch.
        device: Where the weights live (`"meta"` builds it without allocating them, to load weights into it).
        dtype: The weights' dtype.

    Example:
        ```py
        import torch
        from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLUNet

        unet = SDXLUNet(channels=(32, 64, 64), num_attention_heads=(1, 2, 2), transformer_depths=(1, 1, 2),
                        context_embedding_dim=32, pooled_embedding_dim=16, time_embedding_dim=8)
        unet.set_timestep(torch.tensor([999]))
        unet.set_clip_text_embedding(torch.randn(1, 77, 32))
        unet.set_pooled_text_embedding(torch.randn(1, 16))
        unet.set_time_ids(torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]))
        with torch.no_grad():
            noise = unet(torch.randn(1, 4, 8, 8))
        assert noise.shape == (1, 4, 8, 8)
        ```
    """

    def __init__(
        self,
        in_channels: int = 4,
        *,
        channels: tuple[int, ...] = (320, 640, 1280),
        attention_levels: tuple[bool, ...] = (False, True, True),
        transformer_depths: tuple[int, ...] = (1, 2, 10),
        num_attention_heads: tuple[int, ...] = (5, 10, 20),
        context_embedding_dim: int = 2048,
        pooled_embedding_dim: int = 1280,
        num_time_ids: int = 6,
        time_embedding_dim: int = 256,
        layers_per_block: int = 2,
        guidance_embedding_dim: int | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.channels = tuple(channels)
        self.attention_levels = tuple(attention_levels)
        self.transformer_depths = tuple(transformer_depths)
        self.num_attention_heads = tuple(num_attention_heads)
        self.pooled_embedding_dim = pooled_embedding_dim
        self.num_time_ids = num_time_ids
        self.time_embedding_dim = time_embedding_dim
        self.layers_per_block = layers_per_block
        topology = UNetTopology(
            channels=self.channels,
            attention_levels=self.attention_levels,
            transformer_depths=self.transformer_depths,
            num_attention_heads=self.num_attention_heads,
            context_embedding_dim=context_embedding_dim,
            layers_per_block=layers_per_block,
            use_linear_projection=True,
        )
        super().__init__(
            in_channels, topology, device=device, dtype=dtype, guidance_embedding_dim=guidance_embedding_dim
        )
        self.insert(
            1,
            TextTimeEmbedding(
                pooled_embedding_dim,
                num_time_ids,
                time_embedding_dim,
                embedding_dim=4 * self.channels[0],
                device=device,
                dtype=dtype,
            ),
        )

    def init_context(self) -> Contexts:
        return super().init_context() | {TEXT_TIME_CONTEXT: {}}

    def extra_diffusers_modules(self) -> list[tuple[str, fl.WeightedModule]]:
        text_time = self.layer("TextTimeEmbedding", TextTimeEmbedding)
        linear_1, linear_2 = text_time.layers(fl.Linear)
        return [("add_embedding.linear_1", linear_1), ("add_embedding.linear_2", linear_2)]

    def extra_original_modules(self) -> list[tuple[str, str]]:
        return [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]

    def set_pooled_text_embedding(self, pooled_text_embedding: Tensor) -> None:
        """Set the pooled text embedding of the next forwards.

        Args:
            pooled_text_embedding: `(batch, pooled_embedding_dim)`, e.g. `(2, 1280)` under classifier-free guidance.
        """
        if pooled_text_embedding.dim() != 2 or pooled_text_embedding.shape[1] != self.pooled_embedding_dim:
            raise ValueError(
                f"the pooled text embedding must be (batch, {self.pooled_embedding_dim}), got shape "
                f"{tuple(pooled_text_embedding.shape)}. Pass the second output of compute_clip_text_embedding."
            )
        self.set_context(TEXT_TIME_CONTEXT, {POOLED_TEXT_EMBEDDING_KEY: pooled_text_embedding})

    def set_time_ids(self, time_ids: Tensor) -> None:
        """Set the time ids of the next forwards.

        Args:
            time_ids: `(batch, num_time_ids)`: `[original_h, original_w, crop_top, crop_left, target_h, target_w]`
                for the base, `[original_h, original_w, crop_top, crop_left, aesthetic_score]` for the refiner.
        """
        if time_ids.dim() != 2 or time_ids.shape[1] != self.num_time_ids:
            raise ValueError(
                f"the time ids must be (batch, {self.num_time_ids}), got shape {tuple(time_ids.shape)}"
                + (
                    ": [original_h, original_w, crop_top, crop_left, target_h, target_w] per image"
                    if self.num_time_ids == 6
                    else ""
                )
            )
        self.set_context(TEXT_TIME_CONTEXT, {TIME_IDS_KEY: time_ids})


class SDXLRefinerUNet(SDXLUNet):
    """The SDXL refiner's UNet: four resolutions, attention at the middle two, 4 transformer layers everywhere, the
    OpenCLIP-G embedding alone (1280 wide) and 5 time ids (`[h, w, top, left, aesthetic_score]`).

    Args:
        in_channels: Channels of the latents.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, in_channels: int = 4, *, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            in_channels,
            channels=(384, 768, 1536, 1536),
            attention_levels=(False, True, True, False),
            transformer_depths=(4, 4, 4, 4),
            num_attention_heads=(6, 12, 24, 24),
            context_embedding_dim=1280,
            pooled_embedding_dim=1280,
            num_time_ids=5,
            device=device,
            dtype=dtype,
        )
