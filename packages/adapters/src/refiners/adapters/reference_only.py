"""Reference-only control (A1111's ControlNet extension `reference_only`, diffusers' community
`stable_diffusion_reference.py` with `reference_attn`): the generation looks at a reference image, no training.

At each step the reference's latents are noised to the step's level with fresh noise and run through the UNet first,
with the generation's conditioning ("write"): each self-attention keeps its input, the LayerNorm'ed tokens `h_r`.
Then the generation's pass ("read"): each self-attention attends to its own tokens and to the reference's,

    ref(h) = Attention(h, keys and values from [h, h_r])
    plain(h) = Attention(h, keys and values from h)
    out = ref(h)                                                 for the positive half of the batch (or all rows)
    out = style_fidelity * plain(h) + (1 - style_fidelity) * ref(h)   for the negative half (classifier-free guidance)

so that `style_fidelity = 1` leaves the negative prediction plain and guidance pushes towards the reference ("control
more important"), and `style_fidelity = 0` looks at it in both halves ("prompt more important"). Diffusers' pipeline
sorts the transformer layers from the widest (a stable sort of the order of its modules: down blocks, up blocks, then
the middle block), and `attention_auto_machine_weight = w` reads in the first `i < w * count` of them: all at 1, none
at 0.

With `reference_adain` (A1111's `reference_adain+attn`), the outputs of the blocks' residual blocks (and their
transformers), and of the middle block, also take the reference's per-channel statistics, blended the same way:

    adain(x) = (x - mean(x)) / std(x) * std(x_r) + mean(x_r)     over the positions, std = sqrt(max(var, 1e-6))

in the blocks whose weight is at most `gn_auto_machine_weight`: 0 for the middle block, `2 (1 - level / levels)` for
the down blocks and `2 level / levels` for the up blocks (levels counted from the highest resolution down, and from
the lowest up, as diffusers' `down_blocks` and `up_blocks`).
"""

from typing import Any, Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.style_aligned import transformer_layers
from refiners.fluxion.context import Contexts
from refiners.foundationals.latent_diffusion.cross_attention import CrossAttentionBlock2d
from refiners.foundationals.latent_diffusion.model import DENOISING_CONTEXT, GUIDED_KEY, LatentDiffusionModel
from refiners.foundationals.latent_diffusion.unet import DownBlocks, MiddleBlock, ResidualBlock, UNet, UpBlocks

__all__ = ["REFERENCE_ONLY_CONTEXT", "WRITING_KEY", "ReferenceAttention", "ReferenceAdaIN", "ReferenceOnlyAdapter"]

REFERENCE_ONLY_CONTEXT = "reference_only"
"""The UNet's context where `ReferenceOnlyAdapter` says which pass runs."""
WRITING_KEY = "writing"
"""`REFERENCE_ONLY_CONTEXT[WRITING_KEY]`: whether the UNet runs on the reference (its self-attentions keep their
inputs), or on the generation (they attend to the kept inputs too)."""


def _writing(module: fl.ContextModule) -> bool:
    return bool(module.use_context(REFERENCE_ONLY_CONTEXT)[WRITING_KEY])


def _guided(module: fl.ContextModule) -> bool:
    return bool(module.use_context(DENOISING_CONTEXT).get(GUIDED_KEY, False))


def _with_negative_half(controlled: Tensor, plain_negative: Tensor, style_fidelity: float) -> Tensor:
    """`controlled`, its negative half (the first) blended with `plain_negative`: `style_fidelity` of the plain."""
    half = controlled.shape[0] // 2
    blended = style_fidelity * plain_negative + (1 - style_fidelity) * controlled[:half]
    return torch.cat([blended, controlled[half:]])


def _check_kept(module: fl.Module, kept: Tensor | None, x: Tensor) -> Tensor:
    if kept is None or kept.shape[0] != x.shape[0]:
        rows = "no" if kept is None else f"{kept.shape[0]} rows of"
        raise ValueError(
            f"{module.get_path()} has {rows} reference features for {x.shape[0]} rows: the reference's pass must run "
            "before each of the UNet's (through the model's steps, once the reference is set)"
        )
    return kept


class ReferenceAttention(fl.Chain, fl.Adapter[fl.SelfAttention]):
    """A self-attention that keeps its input on the reference's pass, and attends to it on the generation's (see the
    module's docstring).

    Args:
        target: The self-attention of a transformer layer.
        style_fidelity: The share of the plain attention in the negative half of a guided batch.
    """

    def __init__(self, target: fl.SelfAttention, style_fidelity: float = 0.5) -> None:
        self.style_fidelity = style_fidelity
        self.reference: Tensor | None = None
        with self.setup_adapter(target):
            super().__init__(target)

    def init_context(self) -> Contexts:
        return {REFERENCE_ONLY_CONTEXT: {WRITING_KEY: False}, DENOISING_CONTEXT: {GUIDED_KEY: False}}

    def forward(self, *args: Tensor) -> Tensor:
        (x,) = args
        if _writing(self):
            self.reference = x.detach()
            return super().forward(x)
        reference = _check_kept(self, self.reference, x)
        shared = torch.cat([x, reference], dim=1)
        output = self._attend(x, shared)
        if self.style_fidelity > 0 and _guided(self):
            output = _with_negative_half(output, super().forward(x[: x.shape[0] // 2]), self.style_fidelity)
        return output

    def _attend(self, query: Tensor, key_value: Tensor) -> Tensor:
        """The target's attention, its queries from `query` and its keys and values from `key_value`."""
        result: Any = (query, key_value, key_value)
        for layer in list(self.target)[1:]:  # after its Parallel, which repeats its input
            result = layer(*result) if isinstance(result, tuple) else layer(result)
        return result


class ReferenceAdaIN(fl.Chain, fl.Adapter[fl.Chain]):
    """A block whose output keeps its per-channel statistics on the reference's pass, and takes them on the
    generation's (see the module's docstring).

    Args:
        target: A residual block, a transformer, or the middle block.
        style_fidelity: The share of the plain output in the negative half of a guided batch.
    """

    def __init__(self, target: fl.Chain, style_fidelity: float = 0.5) -> None:
        self.style_fidelity = style_fidelity
        self.reference: Tensor | None = None  # the reference's per-channel means, then variances: (batch, 2 C, 1, 1)
        with self.setup_adapter(target):
            super().__init__(target)

    def init_context(self) -> Contexts:
        return {REFERENCE_ONLY_CONTEXT: {WRITING_KEY: False}, DENOISING_CONTEXT: {GUIDED_KEY: False}}

    def forward(self, *args: Tensor) -> Tensor:
        x: Tensor = super().forward(*args)
        variance, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        if _writing(self):
            self.reference = torch.cat([mean, variance], dim=1).detach()
            return x
        reference_mean, reference_variance = _check_kept(self, self.reference, x).chunk(2, dim=1)
        std, reference_std = variance.clamp(min=1e-6).sqrt(), reference_variance.clamp(min=1e-6).sqrt()
        output = (x - mean) / std * reference_std + reference_mean
        if self.style_fidelity > 0 and _guided(self):
            output = _with_negative_half(output, x[: x.shape[0] // 2], self.style_fidelity)
        return output


def _adain_blocks(unet: UNet, gn_auto_machine_weight: float) -> list[fl.Chain]:
    """The blocks whose outputs take the reference's statistics (see the module's docstring), each residual block's
    transformer or, without one, the residual block itself."""
    levels = len(unet.topology.channels)

    def output_layer(block: fl.Chain) -> fl.Chain:
        transformer = block.find(CrossAttentionBlock2d)
        return transformer if transformer is not None else block.ensure_find(ResidualBlock)

    chosen: list[fl.Chain] = []
    # After the input convolution's, each Chain of the down blocks is a residual block (and transformer), or a
    # downsampling.
    down_blocks = list(unet.layer("DownBlocks", DownBlocks).layers(fl.Chain))[1:]
    down = [block for block in down_blocks if block.find(fl.Downsample) is None]
    for index, block in enumerate(down):
        if gn_auto_machine_weight >= 2 * (1 - index // unet.topology.layers_per_block / levels):
            chosen.append(output_layer(block))
    for index, block in enumerate(unet.layer("UpBlocks", UpBlocks).layers(fl.Chain)):
        if gn_auto_machine_weight >= 2 * (index // (unet.topology.layers_per_block + 1)) / levels:
            chosen.append(output_layer(block))
    return [*chosen, unet.layer("MiddleBlock", MiddleBlock)]  # of weight 0: always


class ReferenceOnlyAdapter:
    """Reference-only control on a Stable Diffusion model (SD1, SDXL): `set_reference`, then generate.

    One more UNet pass per step, on the reference noised to the step's level, drawn with the step's generator before
    the solver's draws (as diffusers' pipeline). Needs a text-to-image UNet (not an inpainting one).

    Example:
        ```py
        import torch

        from refiners.adapters.reference_only import ReferenceOnlyAdapter
        from refiners.foundationals.latent_diffusion import StableDiffusion_1
        from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY

        sd = StableDiffusion_1(**TINY.build())
        reference_only = ReferenceOnlyAdapter(target=sd, style_fidelity=0.5).inject()
        reference_only.set_reference(torch.zeros(1, 4, 8, 8))
        assert sd.step_preparations == [reference_only]
        reference_only.eject()
        ```

    Args:
        target: The model.
        style_fidelity: The share of the plain attention in the negative half (see the module's docstring), in [0, 1].
        attention_auto_machine_weight: The share of the transformer layers, from the widest, that attend to the
            reference, in [0, 1] (0: none, diffusers' `reference_attn=False`).
        reference_adain: Also give the blocks' outputs the reference's statistics (diffusers' `reference_adain`).
        gn_auto_machine_weight: With `reference_adain`, the largest weight of the blocks that do, in [0, 2].
    """

    def __init__(
        self,
        target: LatentDiffusionModel[Any, Any],
        style_fidelity: float = 0.5,
        attention_auto_machine_weight: float = 1.0,
        reference_adain: bool = False,
        gn_auto_machine_weight: float = 1.0,
    ) -> None:
        if not isinstance(target.unet, UNet) or target.unet.in_channels != target.lda.latent_channels:
            raise ValueError(
                "reference-only control runs the UNet on the reference's latents alone: it needs a text-to-image UNet "
                "(not an inpainting one)"
            )
        if not 0.0 <= style_fidelity <= 1.0 or not 0.0 <= attention_auto_machine_weight <= 1.0:
            raise ValueError(
                f"style_fidelity and attention_auto_machine_weight are shares in [0, 1], got {style_fidelity} and "
                f"{attention_auto_machine_weight}"
            )
        if not 0.0 <= gn_auto_machine_weight <= 2.0:
            raise ValueError(f"gn_auto_machine_weight is in [0, 2], got {gn_auto_machine_weight}")
        self.target = target
        self.style_fidelity = style_fidelity
        self.attention_auto_machine_weight = attention_auto_machine_weight
        layers = sorted(transformer_layers(target.unet), key=lambda layer: -layer.embedding_dim)
        self.attentions = [
            ReferenceAttention(layer.ensure_find(fl.SelfAttention), style_fidelity)
            for index, layer in enumerate(layers)
            if attention_auto_machine_weight > index / len(layers)
        ]
        self.adains = (
            [ReferenceAdaIN(block, style_fidelity) for block in _adain_blocks(target.unet, gn_auto_machine_weight)]
            if reference_adain
            else []
        )
        if not self.attentions and not self.adains:
            raise ValueError(
                "with attention_auto_machine_weight=0 and no reference_adain, nothing looks at the reference: raise "
                "the weight, or set reference_adain=True"
            )
        self.reference: Tensor | None = None

    @property
    def unet(self) -> UNet:
        unet = self.target.unet
        assert isinstance(unet, UNet)
        return unet

    def set_reference(self, latents: Tensor) -> None:
        """Set the reference image's latents (`lda.image_to_latents(image)`), `(1, latent_channels, h, w)` for all the
        images of the batch, or one per image. They must be of the generation's size."""
        if latents.dim() != 4 or latents.shape[1] != self.target.lda.latent_channels:
            raise ValueError(
                f"the reference's latents must be (1 or batch, {self.target.lda.latent_channels}, height, width), got "
                f"{tuple(latents.shape)}: encode the image with lda.image_to_latents"
            )
        self.reference = latents.to(device=self.target.device, dtype=self.target.dtype)

    def inject(self) -> Self:
        """Run the reference's pass before each step's, and let the self-attentions (and blocks) look at it."""
        if self in self.target.step_preparations:
            raise ValueError("this ReferenceOnlyAdapter is already injected; eject it first")
        for adapter in [*self.attentions, *self.adains]:
            adapter.inject()
        self.target.step_preparations.append(self)
        return self

    def eject(self) -> None:
        """Stop: the model is as it was before `inject`."""
        if self not in self.target.step_preparations:
            raise ValueError("this ReferenceOnlyAdapter is not injected: nothing to eject")
        self.target.step_preparations.remove(self)
        for adapter in [*self.adains[::-1], *self.attentions[::-1]]:
            adapter.eject()
            adapter.reference = None

    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None) -> None:
        """The reference's pass at `step`: its latents noised with fresh noise (diffusers' `ref_xt`), through the UNet
        with the step's contexts, once per latent of the batch (and per half of a guided batch)."""
        if self.reference is None:
            raise ValueError("reference-only control has no reference: call set_reference(latents) first")
        if self.reference.shape[0] not in (1, x.shape[0]) or self.reference.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"the reference's latents {tuple(self.reference.shape)} do not fit the generation's "
                f"{tuple(x.shape)}: give one row, or one per latent, of the generation's size"
            )
        reference = self.reference.expand(x.shape[0], *x.shape[1:])
        draw_device = x.device if generator is None else generator.device
        noise = torch.randn(reference.shape, generator=generator, device=draw_device, dtype=x.dtype).to(x.device)
        solver = self.target.solver
        noised = solver.scale_model_input(solver.add_noise(reference, noise, step), step=step)
        if bool(self.unet.use_context(DENOISING_CONTEXT).get(GUIDED_KEY, False)):
            noised = torch.cat([noised, noised])
        self.unet.set_context(REFERENCE_ONLY_CONTEXT, {WRITING_KEY: True})
        try:
            self.unet(noised)
        finally:
            self.unet.set_context(REFERENCE_ONLY_CONTEXT, {WRITING_KEY: False})
