"""Self-attention guidance (Hong et al., 2022, https://arxiv.org/abs/2210.00939), as diffusers'
`StableDiffusionSAGPipeline` computes it.

At each step, the UNet's middle block's first self-attention map tells where the model looks: the positions that the
queries attend to more than once in total (averaged over the heads) form a mask. The predicted clean latents are
blurred inside that mask, noised back to the step's level with the predicted noise, and denoised again without the
text (the negative prompt's rows). The difference steers away from the degraded prediction:

    x0 = (x_t - sqrt(1 - a_t) eps_u) / sqrt(a_t)                 eps_u: the unconditional (negative) prediction
    mask = mean_heads(sum_queries(A)) > 1                        A: the negative rows' attention map
    x0' = blur(x0) * mask + x0 * (1 - mask)                      Gaussian blur, kernel 9, sigma 1, reflected edges
    eps = eps_cfg + scale * (eps_u - UNet(sqrt(a_t) x0' + sqrt(1 - a_t) eps_u, negative prompt))

Without classifier-free guidance, the prediction and the prompt's rows play the unconditional part. Here this is an
adapter that records the attention map (`AttentionMapRecorder`), and a `GuidanceTerm` of the
`LatentDiffusionModel` that adds the last line's term.
"""

import math
from collections.abc import Mapping
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.foundationals.latent_diffusion.cross_attention import TOKENS_SHAPE_CONTEXT
from refiners.foundationals.latent_diffusion.model import DENOISING_CONTEXT, GUIDED_KEY, LatentDiffusionModel
from refiners.foundationals.latent_diffusion.solvers.solver import ModelPredictionType
from refiners.foundationals.latent_diffusion.unet import MiddleBlock, UNet

__all__ = ["AttentionMap", "AttentionMapRecorder", "SelfAttentionGuidance", "gaussian_blur"]


class AttentionMap(fl.ContextModule):
    """Keep `softmax(Q K^T / sqrt(d))` per head, the keys laid out on the map, as `attention_map`; the inputs pass.

    The map is kept on the layer, not in a context: the guidance reads it after the UNet's forward, when the
    contexts set during the forward are gone. `attention_map` is `(batch, heads, queries, height, width)`: the
    attention of each query to each position of the map (its height and width are those of the transformer's input).

    Args:
        num_heads: The attention's number of heads.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_map: Tensor | None = None

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, queries, embedding = query.shape
        head_dim = embedding // self.num_heads
        q = query.reshape(batch, queries, self.num_heads, head_dim).transpose(1, 2)
        k = key.reshape(batch, key.shape[1], self.num_heads, head_dim).transpose(1, 2)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1)
        shape = self.use_context(TOKENS_SHAPE_CONTEXT)
        self.attention_map = attention.reshape(*attention.shape[:3], shape["height"], shape["width"])
        return query, key, value


class AttentionMapRecorder(fl.Chain, fl.Adapter[fl.ScaledDotProductAttention]):
    """Record the attention map of a self-attention of a UNet (see `AttentionMap`), then attend as before.

    Args:
        target: The self-attention's `ScaledDotProductAttention`.
    """

    def __init__(self, target: fl.ScaledDotProductAttention) -> None:
        with self.setup_adapter(target):
            super().__init__(AttentionMap(target.num_heads), target)

    @property
    def attention_map(self) -> Tensor:
        """The map of the last forward (see `AttentionMap`)."""
        attention_map = self.layer("AttentionMap", AttentionMap).attention_map
        if attention_map is None:
            raise ValueError("no attention map was recorded yet: run the UNet first")
        return attention_map


def gaussian_blur(x: Tensor, kernel_size: int = 9, sigma: float = 1.0) -> Tensor:
    """Each channel of `(batch, channels, height, width)` maps convolved with a normalised Gaussian, edges reflected.

    Args:
        x: The maps.
        kernel_size: The side of the kernel.
        sigma: The Gaussian's standard deviation, in pixels.
    """
    half = (kernel_size - 1) / 2
    density = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size) / sigma) ** 2)
    kernel_1d = (density / density.sum()).to(device=x.device, dtype=x.dtype)
    kernel = (kernel_1d[:, None] @ kernel_1d[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)
    padded = F.pad(x, [kernel_size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=x.shape[1])


class SelfAttentionGuidance:
    """Self-attention guidance on a Stable Diffusion model (SD1, SDXL): `inject` adds its term to each step.

    One more UNet pass per step, on the degraded latents with the negative prompt's rows. Needs a UNet that predicts
    the noise (the solver's `model_prediction_type`), and not an inpainting one.

    Example:
        ```py
        from refiners.adapters.sag import SelfAttentionGuidance
        from refiners.foundationals.latent_diffusion import StableDiffusion_1

        sd = StableDiffusion_1(device="meta")
        sag = SelfAttentionGuidance(target=sd, scale=0.75).inject()
        assert sd.guidance_terms == [sag]
        sag.eject()
        ```

    Args:
        target: The model.
        scale: diffusers' `sag_scale`: 0 leaves the generation as it is.
        kernel_size: The side of the blur's Gaussian kernel.
        sigma: The blur's standard deviation, in latent pixels.
    """

    def __init__(
        self, target: LatentDiffusionModel[Any, Any], scale: float = 0.75, kernel_size: int = 9, sigma: float = 1.0
    ) -> None:
        if not isinstance(target.unet, UNet) or target.unet.in_channels != target.lda.latent_channels:
            raise ValueError(
                "self-attention guidance runs the UNet on degraded latents alone: it needs a text-to-image UNet "
                "(not an inpainting one)"
            )
        middle = target.unet.layer("MiddleBlock", MiddleBlock)
        self.target = target
        self.scale = scale
        self.kernel_size = kernel_size
        self.sigma = sigma
        self.recorder = AttentionMapRecorder(
            middle.ensure_find(fl.SelfAttention).ensure_find(fl.ScaledDotProductAttention)
        )

    @property
    def unet(self) -> UNet:
        unet = self.target.unet
        assert isinstance(unet, UNet)
        return unet

    def inject(self) -> Self:
        """Record the middle block's self-attention map, and add the guidance term to each step."""
        if self in self.target.guidance_terms:
            raise ValueError("this SelfAttentionGuidance is already injected; eject it first")
        self.recorder.inject()
        self.target.guidance_terms.append(self)
        return self

    def eject(self) -> None:
        """Stop guiding: the model is as it was before `inject`."""
        if self not in self.target.guidance_terms:
            raise ValueError("this SelfAttentionGuidance is not injected: nothing to eject")
        self.target.guidance_terms.remove(self)
        self.recorder.eject()

    def __call__(self, x: Tensor, step: int, predictions: Tensor, conditioning: Mapping[str, Tensor]) -> Tensor:
        """The term `scale * (eps_u - UNet(degraded latents))` (see the module's docstring)."""
        solver = self.target.solver
        if solver.params.model_prediction_type != ModelPredictionType.NOISE:
            raise ValueError(
                f"self-attention guidance needs a UNet that predicts the noise, this solver's model predicts "
                f"{solver.params.model_prediction_type}"
            )
        guided = predictions.shape[0] != x.shape[0]
        if self.scale == 0:
            return torch.zeros_like(x)
        attention = self.recorder.attention_map

        def first_half(t: Tensor) -> Tensor:
            return t.chunk(2)[0] if guided else t

        noise, attention = first_half(predictions), first_half(attention)
        latents = solver.scale_model_input(x, step=step)
        clean = solver.remove_noise(latents, noise, step)
        mask = (attention.mean(dim=1).sum(dim=1) > 1.0).to(dtype=x.dtype)  # where the queries look more than once
        mask = F.interpolate(mask[:, None], size=x.shape[-2:], mode="nearest")
        degraded = gaussian_blur(clean, self.kernel_size, self.sigma) * mask + clean * (1 - mask)
        degraded = solver.add_noise(degraded, noise, step)
        rows = {name: first_half(tensor) for name, tensor in conditioning.items()}
        self.target.set_unet_context(timestep=solver.timesteps[step], **rows)  # pyright: ignore[reportArgumentType]
        self.unet.set_context(DENOISING_CONTEXT, {GUIDED_KEY: False})  # one half of the batch
        return self.scale * (noise - self.unet(degraded))
