"""HQ-SAM (Ke et al., 2023, "Segment Anything in High Quality") as an adapter on a `SegmentAnything`.

HQ-SAM keeps SAM frozen and adds a high-quality output token to the mask decoder. Its mask is made from the
decoder's upscaled image tokens refined by a small convolution stack, plus "HQ features" fused from the image
embedding and from an early ViT feature (the output of the first global-attention layer). The adapter injects, each
as a small adapter on one layer of the tree:

- `EarlyViTFeatures` records the first global layer's output, and `HQImageEmbedding` appends it (channels first) to
  the image embedding: with HQ-SAM injected, `compute_image_embedding` returns
  `(1, prompt_embedding_dim + embedding_dim, h, w)`, which `predict` takes as SAM's;
- `SAMEmbeddingChannels` gives the decoder's image tokens the SAM channels of that embedding;
- `HQTokenAdapter` appends the HQ token after the mask tokens;
- `UpscaledEmbedding` records the upscaled image tokens, and `HQMaskPrediction` appends the HQ mask to the masks;
- `HQMaskSelection` outputs, per prompt, the best SAM mask (by predicted IoU; the single-mask output's mask when
  `multimask_output` is false) plus the HQ mask, or the HQ mask alone (`hq_mask_only`), as
  `segment_anything_hq`'s `MaskDecoderHQ` does.

`eject` removes them all and gives the model back exactly as it was.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts
from refiners.fluxion.utils import load_from_safetensors
from refiners.foundationals.segment_anything import SegmentAnything
from refiners.foundationals.segment_anything.image_encoder import SAMViT, TransformerLayer
from refiners.foundationals.segment_anything.mask_decoder import (
    MASK_DECODER_CONTEXT,
    ImageTokens,
    MaskPrediction,
    MaskSelection,
    MasksToGrid,
    MaskTokens,
    MaskUpscaling,
)

__all__ = [
    "HQ_SAM_CONTEXT",
    "HQSAMAdapter",
    "HQToken",
    "HQTokenAdapter",
    "HQMask",
    "HQMaskPrediction",
    "HQMaskSelection",
    "HQMaskSplit",
    "HQMaskCombination",
    "HQImageEmbedding",
    "EarlyViTFeatures",
    "UpscaledEmbedding",
    "SAMEmbeddingChannels",
    "original_hq_sam_parameters",
]

HQ_SAM_CONTEXT = "hq_sam"
"""The context where HQ-SAM's recorders leave, during a forward, the early ViT feature (`early_vit_embedding`) and
the decoder's upscaled image tokens (`upscaled_embedding`) and the HQ mask (`hq_mask`)."""


def _hq_contexts() -> Contexts:
    return {HQ_SAM_CONTEXT: {"early_vit_embedding": None, "upscaled_embedding": None, "hq_mask": None}}


class EarlyViTFeatures(fl.Chain, fl.Adapter[TransformerLayer]):
    """Record the output of the first global-attention layer of the ViT (`early_vit_embedding`).

    Args:
        target: That layer.
    """

    def __init__(self, target: TransformerLayer) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.SetContext(HQ_SAM_CONTEXT, "early_vit_embedding"))

    def init_context(self) -> Contexts:
        return _hq_contexts()


class HQImageEmbedding(fl.Concatenate, fl.Adapter[SAMViT]):
    """The image embedding with the early ViT feature appended, channels first: `(batch, 256 + vit_dim, h, w)`.

    Args:
        target: The image encoder.
    """

    def __init__(self, target: SAMViT) -> None:
        with self.setup_adapter(target):
            super().__init__(
                target,
                fl.Chain(fl.UseContext(HQ_SAM_CONTEXT, "early_vit_embedding"), fl.Permute(0, 3, 1, 2)),
                dim=1,
            )

    def init_context(self) -> Contexts:
        return _hq_contexts()


class SAMEmbeddingChannels(fl.Chain, fl.Adapter[fl.UseContext]):
    """The SAM channels of the HQ image embedding (the first `channels`).

    Args:
        target: The `UseContext` reading the image embedding.
        channels: SAM's image embedding channels.
    """

    def __init__(self, target: fl.UseContext, channels: int) -> None:
        self.channels = channels
        with self.setup_adapter(target):
            super().__init__(target, fl.Slicing(dim=1, end=channels))


class HQToken(fl.Parameter):
    """HQ-SAM's learned output token, `(batch, 1, dim)` (`hf_token`).

    Args:
        embedding_dim: Width of the token.
        device: Where the weight lives.
        dtype: The weight's dtype.
    """

    def __init__(
        self, embedding_dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(1, embedding_dim, device=device, dtype=dtype)


class HQTokenAdapter(fl.Concatenate, fl.Adapter[MaskTokens]):
    """The mask tokens, then the HQ token.

    Args:
        target: The mask tokens.
        device: Where the weight lives.
        dtype: The weight's dtype.
    """

    def __init__(
        self, target: MaskTokens, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        with self.setup_adapter(target):
            super().__init__(target, HQToken(target.dims[-1], device=device, dtype=dtype), dim=1)


class UpscaledEmbedding(fl.Chain, fl.Adapter[MaskUpscaling]):
    """Record the decoder's upscaled image tokens (`upscaled_embedding`).

    Args:
        target: The mask decoder's upscaling.
    """

    def __init__(self, target: MaskUpscaling) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.SetContext(HQ_SAM_CONTEXT, "upscaled_embedding"))

    def init_context(self) -> Contexts:
        return _hq_contexts()


def _upscaling(
    in_channels: int, embedding_dim: int, hidden: int, device: torch.device | str | None, dtype: torch.dtype | None
) -> list[fl.Module]:
    return [
        fl.ConvTranspose2d(in_channels, hidden, 2, stride=2, device=device, dtype=dtype),
        fl.LayerNorm2d(hidden, device=device, dtype=dtype),
        fl.GeLU(),
        fl.ConvTranspose2d(hidden, embedding_dim // 8, 2, stride=2, device=device, dtype=dtype),
    ]


class HQMask(fl.Chain):
    """`(queries, keys)` to the HQ mask's logits `(batch, 1, 4h, 4w)`: the HQ token's MLP applied to the HQ
    features (the upscaled image tokens, refined, plus the image embedding and the early ViT feature, upscaled).

    Args:
        embedding_dim: Width of the decoder.
        vit_dim: Width of the ViT (of the early feature).
        hq_token_index: The HQ token's index among the decoder's tokens.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        embedding_dim: int,
        vit_dim: int,
        hq_token_index: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.vit_dim = vit_dim
        self.hq_token_index = hq_token_index
        eighth, quarter = embedding_dim // 8, embedding_dim // 4
        image_embedding = (MASK_DECODER_CONTEXT, "image_embedding")
        super().__init__(
            fl.Matmul(
                fl.Chain(
                    fl.GetArg(0),
                    fl.Slicing(dim=1, start=hq_token_index, end=hq_token_index + 1),
                    fl.MultiLinear(embedding_dim, eighth, embedding_dim, 3, device=device, dtype=dtype),
                ),
                fl.Chain(
                    fl.Sum(
                        fl.Chain(  # SAM's upscaled tokens, refined (`embedding_maskfeature`)
                            fl.UseContext(HQ_SAM_CONTEXT, "upscaled_embedding"),
                            fl.Conv2d(eighth, quarter, 3, padding=1, device=device, dtype=dtype),
                            fl.LayerNorm2d(quarter, device=device, dtype=dtype),
                            fl.GeLU(),
                            fl.Conv2d(quarter, eighth, 3, padding=1, device=device, dtype=dtype),
                        ),
                        fl.Sum(
                            fl.Chain(  # `embedding_encoder`
                                fl.UseContext(*image_embedding),
                                fl.Slicing(dim=1, end=embedding_dim),
                                *_upscaling(embedding_dim, embedding_dim, quarter, device, dtype),
                            ),
                            fl.Chain(  # `compress_vit_feat`
                                fl.UseContext(*image_embedding),
                                fl.Slicing(dim=1, start=embedding_dim),
                                *_upscaling(vit_dim, embedding_dim, embedding_dim, device, dtype),
                            ),
                        ),
                    ),
                    fl.Flatten(start_dim=2),
                ),
            ),
            MasksToGrid(),
        )


class HQMaskPrediction(fl.Concatenate, fl.Adapter[MaskPrediction]):
    """SAM's masks, then the HQ mask: `(batch, num_mask_tokens + 1, 4h, 4w)`.

    Args:
        target: SAM's mask prediction.
        vit_dim: Width of the ViT.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        target: MaskPrediction,
        vit_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        with self.setup_adapter(target):
            super().__init__(
                target,
                HQMask(target.embedding_dim, vit_dim, 1 + target.num_mask_tokens, device=device, dtype=dtype),
                dim=1,
            )


class HQMaskSplit(fl.ContextModule):
    """`(masks, iou_predictions)` to SAM's masks (as many as IoU predictions) and the IoU predictions; the HQ mask,
    the last, is left in the context (`hq_mask`)."""

    def forward(self, masks: Tensor, iou_predictions: Tensor) -> tuple[Tensor, Tensor]:
        self.set_context(HQ_SAM_CONTEXT, {"hq_mask": masks[:, iou_predictions.shape[1] :]})
        return masks[:, : iou_predictions.shape[1]], iou_predictions


class HQMaskCombination(fl.ContextModule):
    """`(sam_masks, iou_predictions)` selected by SAM to one mask per prompt and its predicted IoU: the best SAM
    mask (the first of ties) plus the HQ mask (read from the context), or the HQ mask alone.

    Args:
        hq_mask_only: Output the HQ mask alone.
    """

    def __init__(self, hq_mask_only: bool = False) -> None:
        super().__init__()
        self.hq_mask_only = hq_mask_only

    def forward(self, masks: Tensor, iou_predictions: Tensor) -> tuple[Tensor, Tensor]:
        hq_mask: Tensor = self.use_context(HQ_SAM_CONTEXT)["hq_mask"]
        best_iou, best = iou_predictions.max(dim=1)
        if self.hq_mask_only:
            return hq_mask, best_iou[:, None]
        best_mask = masks[torch.arange(masks.shape[0], device=masks.device), best][:, None]
        return best_mask + hq_mask, best_iou[:, None]


class HQMaskSelection(fl.Chain, fl.Adapter[MaskSelection]):
    """SAM's selection (multimask or single) among SAM's masks, then `HQMaskCombination` with the HQ mask.

    Args:
        target: SAM's mask selection.
        hq_mask_only: Output the HQ mask alone.
    """

    def __init__(self, target: MaskSelection, hq_mask_only: bool = False) -> None:
        with self.setup_adapter(target):
            super().__init__(HQMaskSplit(), target, HQMaskCombination(hq_mask_only))

    def init_context(self) -> Contexts:
        return _hq_contexts()


class HQSAMAdapter:
    """HQ-SAM on a `SegmentAnything`: `inject` puts its layers in, `eject` takes them out (see the module's
    documentation). Its weights are `refiners-convert hq-sam`'s output.

    Args:
        target: The model.
        weights: The HQ weights: a `.safetensors` file or a state dict (see `state_dict`). None: random weights.
        hq_mask_only: Output the HQ mask alone, instead of the best SAM mask plus the HQ mask.
        device: Where the weights live (default: the model's device).
        dtype: The weights' dtype (default: the model's dtype).

    Example:
        ```py
        import torch
        from PIL import Image
        from refiners.adapters.hq_sam import HQSAMAdapter
        from refiners.foundationals.segment_anything import SegmentAnything
        from refiners.foundationals.segment_anything.presets import TINY

        sam = TINY.build([SegmentAnything])  # toy sizes, random weights
        hq_sam = HQSAMAdapter(target=sam, hq_mask_only=True).inject()
        with torch.no_grad():
            masks, scores, _ = sam.predict(Image.new("RGB", (64, 64)), foreground_points=[(20, 30)])
        assert masks.shape == (1, 1, 64, 64) and scores.shape == (1, 1)
        hq_sam.eject()
        ```
    """

    def __init__(
        self,
        target: SegmentAnything,
        weights: str | Path | Mapping[str, Tensor] | None = None,
        hq_mask_only: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        device = device if device is not None else target.device
        dtype = dtype if dtype is not None else target.dtype
        encoder = target.image_encoder
        first_global = next((layer for layer in encoder.layers(TransformerLayer) if layer.is_global), None)
        if first_global is None:
            raise ValueError("HQ-SAM reads the first global-attention layer of the ViT, but this SAM has none")
        image_tokens = target.mask_decoder.ensure_find(ImageTokens)
        embedding_reader = next(
            reader for reader in image_tokens.layers(fl.UseContext) if reader.key == "image_embedding"
        )
        self.target = target
        self._token = HQTokenAdapter(target.mask_decoder.ensure_find(MaskTokens), device=device, dtype=dtype)
        self._prediction = HQMaskPrediction(
            target.mask_decoder.ensure_find(MaskPrediction), encoder.embedding_dim, device=device, dtype=dtype
        )
        self._selection = HQMaskSelection(target.mask_decoder.ensure_find(MaskSelection), hq_mask_only)
        self._adapters: list[fl.Adapter[Any]] = [
            EarlyViTFeatures(first_global),
            HQImageEmbedding(encoder),
            SAMEmbeddingChannels(embedding_reader, target.prompt_embedding_dim),
            self._token,
            UpscaledEmbedding(target.mask_decoder.ensure_find(MaskUpscaling)),
            self._prediction,
            self._selection,
        ]
        if weights is not None:
            self.load_state_dict(load_from_safetensors(weights) if isinstance(weights, str | Path) else weights)

    @property
    def hq_mask_only(self) -> bool:
        """Whether the output is the HQ mask alone (else the best SAM mask plus the HQ mask)."""
        return self._selection.ensure_find(HQMaskCombination).hq_mask_only

    @hq_mask_only.setter
    def hq_mask_only(self, value: bool) -> None:
        self._selection.ensure_find(HQMaskCombination).hq_mask_only = value

    @property
    def is_injected(self) -> bool:
        return self._token.parent is not None

    def inject(self) -> Self:
        """Put HQ-SAM's layers in the model."""
        if self.is_injected:
            raise ValueError("HQSAMAdapter is already injected; eject it first")
        for adapter in self._adapters:
            adapter.inject()
        return self

    def eject(self) -> None:
        """Take HQ-SAM's layers out: the model is exactly as it was before `inject`."""
        for adapter in reversed(self._adapters):
            adapter.eject()

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """HQ-SAM's own weights (not SAM's), by name: `HQTokenAdapter.HQToken.weight`, `HQMaskPrediction.HQMask...`."""
        parameters: dict[str, torch.nn.Parameter] = {}
        for adapter in (self._token, self._prediction):
            own = adapter.layer(-1, fl.Module)  # the target comes first; HQ-SAM's layer last
            for name, parameter in own.named_parameters():
                parameters[f"{type(adapter).__name__}.{adapter.key_of(own)}.{name}"] = parameter
        return parameters

    def state_dict(self) -> dict[str, Tensor]:
        """HQ-SAM's weights, as `refiners-convert hq-sam` writes them."""
        return {name: parameter.detach() for name, parameter in self.named_parameters().items()}

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Load HQ-SAM's weights; the keys and shapes must be exactly those of `state_dict`.

        Raises:
            ValueError: Listing the missing, unexpected and misshaped keys.
        """
        parameters = self.named_parameters()
        missing = sorted(set(parameters) - set(tensors))
        unexpected = sorted(set(tensors) - set(parameters))
        misshaped = [
            f"{name} {tuple(tensors[name].shape)} (expected {tuple(parameter.shape)})"
            for name, parameter in parameters.items()
            if name in tensors and tensors[name].shape != parameter.shape
        ]
        if missing or unexpected or misshaped:
            raise ValueError(
                f"the HQ-SAM weights do not fit this SAM (ViT width {self.target.image_encoder.embedding_dim}, "
                f"decoder width {self.target.prompt_embedding_dim}): missing {missing}, unexpected {unexpected}, "
                f"misshaped {misshaped}. Convert them with `refiners-convert hq-sam`."
            )
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(tensors[name])


def original_hq_sam_parameters(adapter: HQSAMAdapter) -> dict[str, str]:
    """The keys of an original HQ-SAM checkpoint (`sam_hq_vit_b.pth`, ...) that HQ-SAM adds to SAM's, paired with
    the names of `adapter.state_dict()`, derived from the adapter's layers."""
    names: dict[Tensor, str] = {parameter: name for name, parameter in adapter.named_parameters().items()}
    hq_mask = adapter._prediction.ensure_find(HQMask)
    token = adapter._token.ensure_find(HQToken)
    matmul = hq_mask.layer("Matmul", fl.Matmul)
    mlp = matmul.ensure_find(fl.MultiLinear)
    refine, features = matmul.layer(("Chain_2", "Sum"), fl.Sum)
    assert isinstance(refine, fl.Chain) and isinstance(features, fl.Sum)
    embedding_encoder, compress_vit_feat = features
    assert isinstance(embedding_encoder, fl.Chain) and isinstance(compress_vit_feat, fl.Chain)
    keys: dict[str, str] = {"mask_decoder.hf_token.weight": names[token.weight]}
    for index, linear in enumerate(mlp.layers(fl.Linear)):
        keys |= {f"mask_decoder.hf_mlp.layers.{index}.{n}": names[p] for n, p in linear.named_parameters()}
    for prefix, chain in (
        ("embedding_maskfeature", refine),
        ("embedding_encoder", embedding_encoder),
        ("compress_vit_feat", compress_vit_feat),
    ):
        # The original Sequentials number the GELU too: skip the readers and slicers ours start with.
        layers = [module for module in chain if not isinstance(module, fl.UseContext | fl.Slicing)]
        for index, module in enumerate(layers):
            for name, parameter in module.named_parameters():
                keys[f"mask_decoder.{prefix}.{index}.{name}"] = names[parameter]
    return keys
