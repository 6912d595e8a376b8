"""StyleAligned (Hertz et al., 2023, https://arxiv.org/abs/2312.02133): a batch of images in the style of its first,
by shared attention, no training.

Each self-attention of the UNet attends to its own image's tokens and to those of the batch's reference image (the
first image of each half of classifier-free guidance's batch: the negative half's and the positive half's). The
queries and keys are first normalised against the reference's statistics (AdaIN over the tokens, each channel apart).
As google/style-aligned's `sa_handler.py` computes it, for an image `x` and its reference `r`:

    AdaIN(f) = (f - mean(f)) / std(f) * std(f_r) + mean(f_r)      over the tokens; std = sqrt(var + 1e-5), var unbiased
    Q = AdaIN(Q_x)    K = [AdaIN(K_x), s K_r]    V = [V_x, V_r]  (AdaIN(V_x) with `adain_values`)
    A = softmax(Q K^T / sqrt(d) + [0, b])                         b: added to the logits of the reference's tokens
    out = A V

with `s = shared_score_scale` (1 for the reference itself) and `b = shared_score_shift`. The reference attends to its
own tokens twice, which changes nothing: it is generated as it would be alone. With `share_group_norm`, each
GroupNorm of the UNet normalises an image's map together with the reference's (concatenated along the height), as
the repository's `register_shared_norm` does; its `share_layer_norm` is not offered, since a LayerNorm normalises each
token alone and sharing it changes nothing. `only_self_level` keeps a share of the self-attentions plain, chosen in
the order of diffusers' `attn_processors` as the repository does. Its `full_attention_share` (each image attending to
all the images of its half, without AdaIN), which its demos leave off, is `FullAttentionShareAdapter`.

AdaIN needs at least two tokens: at a 1x1 map (the middle block of a 64-pixel image) its variance is undefined, as in
the repository.
"""

import math
from collections.abc import Callable
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts
from refiners.foundationals.latent_diffusion.cross_attention import CrossAttentionBlock
from refiners.foundationals.latent_diffusion.model import DENOISING_CONTEXT, GUIDED_KEY
from refiners.foundationals.latent_diffusion.unet import DownBlocks, MiddleBlock, UNet, UpBlocks

__all__ = [
    "StyleAlignedAdapter",
    "FullAttentionShareAdapter",
    "StyleAlignedAttention",
    "FullSharedAttention",
    "SharedGroupNorm",
    "adain",
    "reference_indices",
    "transformer_layers",
]


def reference_indices(batch: int, guided: bool, device: torch.device | None = None) -> Tensor:
    """For each row of a UNet's batch, the row of its reference: 0, or with guidance the first of its half.

    Args:
        batch: The number of rows.
        guided: Whether the batch is classifier-free guidance's negative half, then its positive half.
        device: Where to make the indices.
    """
    halves = 2 if guided else 1
    if batch % halves != 0:
        raise ValueError(f"a guided batch has two halves of equal size, got {batch} rows")
    size = batch // halves
    return torch.arange(batch, device=device) // size * size


def adain(x: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """`x` normalised over its tokens, then given the mean and std of `reference` (each channel apart).

    Args:
        x: `(batch, tokens, channels)`.
        reference: `(batch, tokens, channels)`: the reference of each row.
        eps: Added to the (unbiased) variances.
    """
    mean, std = x.mean(dim=1, keepdim=True), (x.var(dim=1, keepdim=True) + eps).sqrt()
    reference_mean, reference_std = (
        reference.mean(dim=1, keepdim=True),
        (reference.var(dim=1, keepdim=True) + eps).sqrt(),
    )
    return (x - mean) / std * reference_std + reference_mean


def _guided(module: fl.ContextModule) -> bool:
    return bool(module.use_context(DENOISING_CONTEXT).get(GUIDED_KEY, False))


class StyleAlignedAttention(fl.Chain, fl.Adapter[fl.ScaledDotProductAttention]):
    """A self-attention's attention shared with the reference of its row (see the module's docstring).

    The attention is computed here, with the target's heads: it holds the target, and ejecting puts it back.

    Args:
        target: The self-attention's `ScaledDotProductAttention`.
        adain_queries: Normalise the queries against the reference's.
        adain_keys: Normalise the keys against the reference's.
        adain_values: Normalise the values against the reference's.
        shared_score_scale: `s`: the factor of the reference's keys (of the logits of its tokens).
        shared_score_shift: `b`: added to the logits of the reference's tokens.
    """

    def __init__(
        self,
        target: fl.ScaledDotProductAttention,
        adain_queries: bool = True,
        adain_keys: bool = True,
        adain_values: bool = False,
        shared_score_scale: float = 1.0,
        shared_score_shift: float = 0.0,
    ) -> None:
        self.adain_queries = adain_queries
        self.adain_keys = adain_keys
        self.adain_values = adain_values
        self.shared_score_scale = shared_score_scale
        self.shared_score_shift = shared_score_shift
        with self.setup_adapter(target):
            super().__init__(target)

    def init_context(self) -> Contexts:
        return {DENOISING_CONTEXT: {GUIDED_KEY: False}}

    def forward(self, *args: Tensor) -> Tensor:
        query, key, value = args
        references = reference_indices(query.shape[0], _guided(self), device=query.device)
        if self.adain_queries:
            query = adain(query, query[references])
        if self.adain_keys:
            key = adain(key, key[references])
        if self.adain_values:
            value = adain(value, value[references])
        # The reference's keys scaled for the other rows only: the reference attends to itself as it would alone.
        is_reference = (references == torch.arange(len(references), device=query.device))[:, None, None]
        scale = torch.where(is_reference, 1.0, self.shared_score_scale).to(dtype=key.dtype)
        key = torch.cat([key, key[references] * scale], dim=1)
        value = torch.cat([value, value[references]], dim=1)
        bias = None
        if self.shared_score_shift != 0:
            tokens = key.shape[1] // 2
            bias = torch.cat([query.new_zeros(1, tokens), query.new_full((1, tokens), self.shared_score_shift)], dim=1)
        attention = self.target
        output = F.scaled_dot_product_attention(
            attention.split_heads(query), attention.split_heads(key), attention.split_heads(value), attn_mask=bias
        )
        return attention.merge_heads(output)


class FullSharedAttention(fl.Chain, fl.Adapter[fl.ScaledDotProductAttention]):
    """A self-attention's attention over the tokens of all the images of its row's half of the batch (all the
    batch without guidance): `sa_handler.py`'s `full_attention_share`, its batch rearranged `(k b) n d -> k (b n) d`.

    Args:
        target: The self-attention's `ScaledDotProductAttention`.
    """

    def __init__(self, target: fl.ScaledDotProductAttention) -> None:
        with self.setup_adapter(target):
            super().__init__(target)

    def init_context(self) -> Contexts:
        return {DENOISING_CONTEXT: {GUIDED_KEY: False}}

    def forward(self, *args: Tensor) -> Tensor:
        query, key, value = args
        batch, tokens, _ = query.shape
        halves = 2 if _guided(self) else 1
        if batch % halves != 0:
            raise ValueError(f"a guided batch has two halves of equal size, got {batch} rows")

        def joined(x: Tensor) -> Tensor:
            return x.reshape(halves, batch // halves * tokens, x.shape[-1])

        output: Tensor = super().forward(joined(query), joined(key), joined(value))
        return output.reshape(batch, tokens, output.shape[-1])


class SharedGroupNorm(fl.Chain, fl.Adapter[fl.GroupNorm]):
    """A GroupNorm whose statistics are those of each map and its reference's together (concatenated along the
    height, as `sa_handler.py`'s `register_shared_norm`).

    Args:
        target: A GroupNorm of the UNet (on `(batch, channels, height, width)` maps).
    """

    def __init__(self, target: fl.GroupNorm) -> None:
        with self.setup_adapter(target):
            super().__init__(target)

    def init_context(self) -> Contexts:
        return {DENOISING_CONTEXT: {GUIDED_KEY: False}}

    def forward(self, *args: Tensor) -> Tensor:
        (x,) = args
        references = reference_indices(x.shape[0], _guided(self), device=x.device)
        height = x.shape[-2]
        return super().forward(torch.cat([x, x[references]], dim=-2))[..., :height, :]


def transformer_layers(unet: UNet) -> list[CrossAttentionBlock]:
    """The UNet's transformer layers in the order of diffusers' `attn_processors`: the down blocks', the up blocks',
    then the middle block's (`UNet2DConditionModel` registers `up_blocks` before `mid_block`)."""
    return [
        *unet.layer("DownBlocks", DownBlocks).layers(CrossAttentionBlock),
        *unet.layer("UpBlocks", UpBlocks).layers(CrossAttentionBlock),
        *unet.layer("MiddleBlock", MiddleBlock).layers(CrossAttentionBlock),
    ]


def _plain_layers(count: int, level: float) -> list[bool]:
    """Which of `count` self-attentions `only_self_level` keeps plain (`sa_handler.py`'s `_get_switch_vec`): none at
    0, all at 1, else every `count // int(level * count)`-th from the first (the complement above 0.5)."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"only_self_level is the share of self-attentions kept plain, in [0, 1], got {level}")
    if level in (0.0, 1.0):
        return [level == 1.0] * count
    flip = level > 0.5
    switched = int((1 - level if flip else level) * count)
    if switched == 0:
        raise ValueError(f"only_self_level={level} of {count} self-attentions switches none: use 0, or a larger share")
    return [(index % (count // switched) == 0) != flip for index in range(count)]


class _SharedUNet:
    """The adapters of a UNet's chosen self-attentions (made by `shared_attention`) and, with `share_group_norm`, of
    its GroupNorms; injected and ejected together."""

    def __init__(
        self,
        target: UNet,
        shared_attention: Callable[[fl.ScaledDotProductAttention], fl.Adapter[fl.ScaledDotProductAttention]],
        share_group_norm: bool,
        only_self_level: float,
    ) -> None:
        layers = transformer_layers(target)
        self.target = target
        self.attentions = [
            shared_attention(layer.ensure_find(fl.SelfAttention).ensure_find(fl.ScaledDotProductAttention))
            for layer, plain in zip(layers, _plain_layers(len(layers), only_self_level), strict=True)
            if not plain
        ]
        self.group_norms = [SharedGroupNorm(norm) for norm in target.layers(fl.GroupNorm)] if share_group_norm else []
        self._injected = False

    def inject(self) -> Self:
        """Share the self-attentions (and the GroupNorms) with the reference."""
        if self._injected:
            raise ValueError(f"this {type(self).__name__} is already injected; eject it first")
        for adapter in [*self.attentions, *self.group_norms]:
            adapter.inject()
        self._injected = True
        return self

    def eject(self) -> None:
        """Stop sharing: the UNet is as it was before `inject`."""
        if not self._injected:
            raise ValueError(f"this {type(self).__name__} is not injected: nothing to eject")
        for adapter in [*self.attentions, *self.group_norms]:
            adapter.eject()
        self._injected = False


class StyleAlignedAdapter(_SharedUNet):
    """StyleAligned on a Stable Diffusion UNet (SD1, SDXL, any `UNet`): the images of a batch take the style of the
    first (of each half, with classifier-free guidance). `inject` shares the attentions, `eject` undoes it.

    Example:
        ```py
        import math

        from refiners.adapters.style_aligned import StyleAlignedAdapter
        from refiners.foundationals.latent_diffusion import SD1UNet
        from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY

        unet = TINY.unet.build((SD1UNet,))
        style_aligned = StyleAlignedAdapter(target=unet, shared_score_shift=math.log(2)).inject()
        style_aligned.eject()
        ```

    Args:
        target: The UNet.
        adain_queries: Normalise the queries against the reference's.
        adain_keys: Normalise the keys against the reference's.
        adain_values: Normalise the values against the reference's.
        shared_score_scale: The factor of the logits of the reference's tokens.
        shared_score_shift: Added to the logits of the reference's tokens (`log(2)` in the repository's demos
            weighs the reference twice).
        share_group_norm: Normalise each map with its reference's in every GroupNorm (the repository's notebooks:
            True for SD1, False for SDXL).
        only_self_level: The share of self-attentions left plain, in [0, 1].
    """

    def __init__(
        self,
        target: UNet,
        adain_queries: bool = True,
        adain_keys: bool = True,
        adain_values: bool = False,
        shared_score_scale: float = 1.0,
        shared_score_shift: float = 0.0,
        share_group_norm: bool = True,
        only_self_level: float = 0.0,
    ) -> None:
        if not math.isfinite(shared_score_scale):
            raise ValueError(f"shared_score_scale must be finite, got {shared_score_scale}")

        def shared_attention(attention: fl.ScaledDotProductAttention) -> StyleAlignedAttention:
            return StyleAlignedAttention(
                attention,
                adain_queries=adain_queries,
                adain_keys=adain_keys,
                adain_values=adain_values,
                shared_score_scale=shared_score_scale,
                shared_score_shift=shared_score_shift,
            )

        super().__init__(target, shared_attention, share_group_norm, only_self_level)


class FullAttentionShareAdapter(_SharedUNet):
    """The repository's `full_attention_share`: each self-attention attends to the tokens of all the images of its
    half of the batch (`FullSharedAttention`), without AdaIN.

    Args:
        target: The UNet.
        share_group_norm: Normalise each map with its reference's in every GroupNorm.
        only_self_level: The share of self-attentions left plain, in [0, 1].
    """

    def __init__(self, target: UNet, share_group_norm: bool = True, only_self_level: float = 0.0) -> None:
        super().__init__(target, FullSharedAttention, share_group_norm, only_self_level)
