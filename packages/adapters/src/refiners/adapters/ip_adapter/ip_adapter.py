"""IP-Adapter: an image prompt for Stable Diffusion, by decoupled cross-attention (Ye et al., 2023).

Each cross-attention of the UNet gets a second attention, on image tokens, with its own key and value projections
(`to_k_ip`, `to_v_ip`) and the text attention's queries; its output, times `scale`, is added to the text attention's
before the output projection (the paper's equation 5; diffusers' `IPAdapterAttnProcessor2_0`). The image tokens come
from a CLIP image embedding through the adapter's projection: `ImageProjection` for the base files, the
`PerceiverResampler` over the penultimate hidden states for the plus files (`fine_grained=True`); or, for the FaceID
files, from a face recognition embedding through `FaceIDImageProjection`.

The weights are the original files (h94 layout, `.bin` or `.safetensors`) or refiners' (see
`refiners.adapters.ip_adapter.weights`).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.ip_adapter.weights import (
    IPAdapterKind,
    IPAdapterWeights,
    load_ip_adapter_weights,
    read_ip_adapter_weights,
)
from refiners.foundationals.clip.image_encoder import CLIPImageEncoder, CLIPImageEncoderG, CLIPImageEncoderH
from refiners.foundationals.clip.image_encoder import preprocess as clip_preprocess
from refiners.foundationals.latent_diffusion.unet import UNet
from refiners.foundationals.latent_diffusion.unet_names import diffusers_unet_modules

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IP_ADAPTER_CONTEXT",
    "ImageTokens",
    "ImageCrossAttention",
    "DecoupledCrossAttention",
    "IPAdapter",
    "SD1IPAdapter",
    "SDXLIPAdapter",
    "read_ip_adapter_weights",
]

IP_ADAPTER_CONTEXT = "ip_adapter"
"""The context holding the image tokens the decoupled cross-attentions attend to: under each IP-Adapter's name,
`(batch, tokens, context_embedding_dim)`, set by its `set_clip_image_embedding` (`set_face_embedding` for FaceID)."""


class ImageTokens(fl.ContextModule):
    """The image tokens of `IP_ADAPTER_CONTEXT[name]`, one row per row of the query (the attention's first input).

    Tokens set for `(negative, positive)` serve a batch of `2 * n` latents as `batch_conditioning` lays it out (the
    negative rows first): each row is repeated `n` times, as diffusers repeats the embeddings per image.

    Args:
        name: The IP-Adapter's name: its key in `IP_ADAPTER_CONTEXT`.
    """

    def __init__(self, name: str = "default") -> None:
        super().__init__()
        self.name = name

    def forward(self, query: Tensor, *_: Tensor) -> Tensor:
        tokens = self.use_context(IP_ADAPTER_CONTEXT).get(self.name)
        if tokens is None:
            raise ValueError(
                f"the IP-Adapter {self.name!r} has no image tokens: call `ip_adapter.set_clip_image_embedding(embedding)` (with "
                "`embedding = ip_adapter.compute_clip_image_embedding(image)`), or for FaceID "
                "`ip_adapter.set_face_embedding(face)`, before running the UNet"
            )
        assert isinstance(tokens, Tensor)
        batch = query.shape[0]
        if tokens.shape[0] != batch:
            if batch % tokens.shape[0] != 0:
                raise ValueError(
                    f"the image tokens have {tokens.shape[0]} rows but the UNet runs {batch} latents: set an "
                    "embedding with one row per latent, or with rows that divide them (negative then positive)"
                )
            tokens = tokens.repeat_interleave(batch // tokens.shape[0], dim=0)
        return tokens


class ImageCrossAttention(fl.Chain):
    """The attention of the text attention's queries to the image tokens, times `scale`.

    Takes the text attention's `(query, key, value)` (it uses the query only) and reads the image tokens from
    `IP_ADAPTER_CONTEXT` (see `ImageTokens`).

    Args:
        context_embedding_dim: Size of the image tokens.
        inner_dim: Size of the projected keys and values (the text attention's).
        num_heads: Number of heads (the text attention's).
        scale: The weight of the image prompt.
        device: Where the weights live.
        dtype: The weights' dtype.
        name: The IP-Adapter's name (see `ImageTokens`).
    """

    def __init__(
        self,
        context_embedding_dim: int,
        inner_dim: int,
        num_heads: int,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        name: str = "default",
    ) -> None:
        super().__init__(
            fl.Parallel(
                fl.GetArg(0),
                fl.Chain(
                    ImageTokens(name),
                    fl.Linear(context_embedding_dim, inner_dim, bias=False, device=device, dtype=dtype),
                ),
                fl.Chain(
                    ImageTokens(name),
                    fl.Linear(context_embedding_dim, inner_dim, bias=False, device=device, dtype=dtype),
                ),
            ),
            fl.ScaledDotProductAttention(num_heads=num_heads),
            fl.Multiply(scale),
        )

    @property
    def to_k_ip(self) -> fl.Linear:
        return self.layer("Parallel.Chain_1.Linear", fl.Linear)

    @property
    def to_v_ip(self) -> fl.Linear:
        return self.layer("Parallel.Chain_2.Linear", fl.Linear)

    @property
    def scale(self) -> float:
        return self.layer("Multiply", fl.Multiply).scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.layer("Multiply", fl.Multiply).scale = value


class DecoupledCrossAttention(fl.Sum, fl.Adapter[fl.ScaledDotProductAttention]):
    """The text attention plus an `ImageCrossAttention`, in place of a cross-attention's `ScaledDotProductAttention`.

    Args:
        target: The cross-attention's attention (inside an `fl.Attention`).
        context_embedding_dim: Size of the image tokens.
        inner_dim: Size of the attention's projected keys and values.
        scale: The weight of the image prompt.
        device: Where the weights live.
        dtype: The weights' dtype.
        name: The IP-Adapter's name (see `ImageTokens`).
    """

    def __init__(
        self,
        target: fl.ScaledDotProductAttention,
        context_embedding_dim: int,
        inner_dim: int,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        name: str = "default",
    ) -> None:
        with self.setup_adapter(target):
            super().__init__(
                target,
                ImageCrossAttention(
                    context_embedding_dim,
                    inner_dim,
                    target.num_heads,
                    scale=scale,
                    device=device,
                    dtype=dtype,
                    name=name,
                ),
            )

    @property
    def image_attention(self) -> ImageCrossAttention:
        return self.layer("ImageCrossAttention", ImageCrossAttention)


_CROSS_ATTENTIONS: "WeakKeyDictionary[UNet, list[tuple[str, fl.Attention]]]" = WeakKeyDictionary()
"""Each UNet's cross-attentions, found once: the names are derived from the blocks' layers, which the injected
IP-Adapters add to (their attentions stay the same objects)."""


def _cross_attentions(unet: UNet) -> list[tuple[str, fl.Attention]]:
    """The UNet's cross-attentions, by diffusers' name (`down_blocks.1.attentions.0.transformer_blocks.0.attn2`), in
    the order of diffusers' `attn_processors`: down blocks, up blocks, then the middle block (`UNet2DConditionModel`
    registers `up_blocks` before `mid_block`)."""
    if (cached := _CROSS_ATTENTIONS.get(unet)) is not None:
        return cached
    found: list[tuple[str, fl.Attention]] = []
    for name, module in diffusers_unet_modules(unet).items():
        if not name.endswith(".attn2.to_k"):
            continue
        attention = module.parent
        while attention is not None and not isinstance(attention, fl.Attention):
            attention = attention.parent  # through the Distribute, and a LoraAdapter if a LoRA is on `to_k`
        assert attention is not None
        found.append((name.removesuffix(".to_k"), attention))
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

    def order(item: tuple[str, fl.Attention]) -> tuple[int, ...]:
        head, *rest = item[0].split(".")
        return (group[head], *(int(part) for part in rest if part.isdigit()))

    _CROSS_ATTENTIONS[unet] = sorted(found, key=order)
    return _CROSS_ATTENTIONS[unet]


class IPAdapter:
    """An IP-Adapter on a UNet: `inject` adds the decoupled cross-attentions, `eject` removes them exactly.

    Use a family's subclass (`SD1IPAdapter`, `SDXLIPAdapter`). It holds the CLIP image encoder (`clip_image_encoder`)
    and the image projection (`image_proj`).

    A FaceID file (`ip-adapter-faceid_sd15.bin`) takes a face recognition embedding instead of a CLIP one (see
    `set_face_embedding`; no image encoder), and holds a LoRA of the UNet's attentions that it was trained with,
    which diffusers' `load_ip_adapter` applies with it: add `lora` to the model as any LoRA
    (`SDLoraManager(sd).add_loras("faceid", ip_adapter.lora)`).

    Args:
        target: The UNet.
        clip_image_encoder: The CLIP image encoder the weights were trained with (None for FaceID).
        weights: The original file (h94 layout) or its tensors, or a file `refiners-convert ip-adapter` wrote.
        scale: The weight of the image prompt.
        fine_grained: IP-Adapter plus: the `PerceiverResampler` over the encoder's penultimate hidden states.
        device: Where the adapter's weights live (default: the UNet's device).
        dtype: The adapter's dtype (default: the UNet's).
        name: Tells several IP-Adapters on one UNet apart (each image prompt is set under its adapter's name).

    Raises:
        ValueError: The weights do not fit this UNet (another family's IP-Adapter) or this image encoder, or are of
            the other kind (plus / base) than `fine_grained` says; the message names both sizes.
    """

    def __init__(
        self,
        target: UNet,
        clip_image_encoder: CLIPImageEncoder | None,
        weights: "str | Path | Mapping[str, Tensor] | IPAdapterWeights",
        scale: float = 1.0,
        fine_grained: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        name: str = "default",
    ) -> None:
        device = device if device is not None else target.device
        dtype = dtype if dtype is not None else target.dtype
        self.target = target
        self.name = name
        self.fine_grained = fine_grained
        loaded = load_ip_adapter_weights(weights)
        cross_attentions = _cross_attentions(target)
        context_dim = cross_attentions[0][1].key_embedding_dim
        self._check(loaded, clip_image_encoder, context_dim, len(cross_attentions))
        self.kind: IPAdapterKind = loaded.kind
        """`base`, `plus` or `faceid`: which image projection the weights have."""
        self._clip_image_encoder = [clip_image_encoder]
        self._image_proj = [loaded.build_projection(device=device, dtype=dtype)]
        self._names = [name for name, _ in cross_attentions]
        self._adapters = [
            DecoupledCrossAttention(
                attention.ensure_find(fl.ScaledDotProductAttention),
                context_dim,
                attention.inner_dim,
                scale=scale,
                device=device,
                dtype=dtype,
                name=name,
            )
            for _, attention in cross_attentions
        ]
        with torch.no_grad():
            for index, adapter in enumerate(self._adapters):
                attention = adapter.image_attention
                attention.to_k_ip.weight.copy_(loaded.tensors[f"cross_attention.{index}.to_k_ip.weight"])
                attention.to_v_ip.weight.copy_(loaded.tensors[f"cross_attention.{index}.to_v_ip.weight"])
        self._lora = self._lora_state_dict(loaded)

    def _check(self, weights: IPAdapterWeights, encoder: CLIPImageEncoder | None, context_dim: int, count: int) -> None:
        file_dim, file_count = weights.context_embedding_dim, weights.cross_attention_count
        if file_dim != context_dim or file_count != count:
            raise ValueError(
                f"this IP-Adapter is for a UNet whose cross-attentions take {file_dim}-wide context ({file_count} "
                f"cross-attentions), but this UNet's take {context_dim} ({count} cross-attentions): use the "
                "IP-Adapter file of this model's family (SD1IPAdapter for SD 1.5, SDXLIPAdapter for SDXL)"
            )
        if (weights.kind == "plus") != self.fine_grained:
            kind = {"plus": "plus (a PerceiverResampler)", "base": "base (a linear projection)", "faceid": "FaceID"}
            raise ValueError(
                f"the weights are of an IP-Adapter {kind[weights.kind]}: pass fine_grained={weights.kind == 'plus'}"
            )
        arguments = weights.projection.arguments
        if weights.kind == "faceid":
            if encoder is not None:
                raise ValueError(
                    "a FaceID IP-Adapter takes a face embedding, not a CLIP image embedding: build it without "
                    "clip_image_encoder"
                )
            return
        if encoder is None:
            raise ValueError(f"a {weights.kind} IP-Adapter needs the CLIP image encoder it was trained with")
        if weights.kind == "base":
            wanted, have, what = arguments["clip_image_embedding_dim"], encoder.output_dim, "embedding"
        else:
            wanted, have, what = arguments["input_dim"], encoder.embedding_dim, "width"
        if wanted != have:
            raise ValueError(
                f"this IP-Adapter takes a {wanted}-wide CLIP image {what} but the image encoder "
                f"{type(encoder).__name__} gives {have}: pair it with the image encoder it was trained with "
                "(CLIPImageEncoderH: output 1024, width 1280; CLIPImageEncoderG: output 1280, width 1664)"
            )

    def _lora_state_dict(self, weights: IPAdapterWeights) -> dict[str, Tensor]:
        """The FaceID LoRA as diffusers gives it to `load_lora_weights`: by attention processor, in its old layout.

        Processor N is the self-attention (even N) or the cross-attention (odd N) of the (N // 2)-th transformer
        layer, in diffusers' order: that of the cross-attentions.
        """
        state: dict[str, Tensor] = {}
        for (number, projection), (down, up) in weights.lora_tensors().items():
            attention = self._names[number // 2].removesuffix("attn2") + ("attn1" if number % 2 == 0 else "attn2")
            prefix = f"unet.{attention}.processor.{projection}_lora"
            state[f"{prefix}.down.weight"], state[f"{prefix}.up.weight"] = down, up
        return state

    @property
    def lora(self) -> dict[str, Tensor]:
        """The LoRA of the UNet's attentions that a FaceID file holds (empty for other files), as diffusers'
        `load_ip_adapter` applies it: add it as any LoRA (`SDLoraManager(sd).add_loras("faceid", ip_adapter.lora)`).

        Keys in diffusers' attention-processor layout (`unet.{attention}.processor.to_q_lora.down.weight`).
        """
        return dict(self._lora)

    @property
    def clip_image_encoder(self) -> CLIPImageEncoder:
        """The CLIP image encoder the adapter's weights were trained with."""
        encoder = self._clip_image_encoder[0]
        if encoder is None:
            raise ValueError(
                "a FaceID IP-Adapter has no CLIP image encoder: give it a face embedding with `set_face_embedding`"
            )
        return encoder

    @property
    def image_proj(self) -> fl.Chain:
        """The image projection: `ImageProjection` (base), `PerceiverResampler` (plus) or `FaceIDImageProjection`."""
        return self._image_proj[0]

    @property
    def cross_attention_names(self) -> list[str]:
        """diffusers' names of the adapted cross-attentions, in the file's order."""
        return list(self._names)

    @property
    def scale(self) -> float:
        """The weight of the image prompt (that of the first cross-attention when they differ)."""
        return self._adapters[0].image_attention.scale

    @scale.setter
    def scale(self, value: float) -> None:
        for adapter in self._adapters:
            adapter.image_attention.scale = value

    def set_block_scales(self, scales: Mapping[str, float | Mapping[str, float | Sequence[float]]]) -> None:
        """Per-block scales, as diffusers' `set_ip_adapter_scale` takes a dict (InstantStyle).

        `{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`: a block's scale for all its
        transformers, or one per transformer (`attentions.N`); `"mid"` a number. Blocks not listed get 0.

        Raises:
            ValueError: A block or transformer that the UNet does not have.
        """
        per_name: dict[str, float] = {}
        for part, value in scales.items():
            prefix = {"down": "down_blocks", "up": "up_blocks", "mid": "mid_block"}.get(part)
            if prefix is None:
                raise ValueError(f"unknown part {part!r}: use 'down', 'mid' and 'up'")
            if isinstance(value, int | float):
                per_name[prefix] = float(value)
                continue
            for block, block_scale in value.items():
                name = f"{prefix}.{block.removeprefix('block_')}"
                if not any(n.startswith(name + ".") for n in self._names):
                    raise ValueError(f"the UNet has no cross-attention in {name} (from {part}.{block})")
                if isinstance(block_scale, int | float):
                    per_name[name] = float(block_scale)
                else:
                    for index, transformer_scale in enumerate(block_scale):
                        per_name[f"{name}.attentions.{index}"] = float(transformer_scale)
        for name, adapter in zip(self._names, self._adapters, strict=True):
            matches = [prefix for prefix in per_name if name.startswith(prefix + ".")]
            adapter.image_attention.scale = per_name[max(matches, key=len)] if matches else 0.0

    @property
    def is_injected(self) -> bool:
        return self._adapters[0].parent is not None

    def inject(self) -> Self:
        """Add the decoupled cross-attentions to the UNet."""
        if self.is_injected:
            raise ValueError(f"{type(self).__name__} is already injected; eject it first")
        if any(isinstance(module, ImageTokens) and module.name == self.name for module in self.target.modules()):
            raise ValueError(
                f"the UNet already has an IP-Adapter named {self.name!r}: give each IP-Adapter its own name "
                f"(`name=` when building it)"
            )
        for adapter in self._adapters:
            adapter.inject()
        return self

    def eject(self) -> None:
        """Remove them: the UNet is exactly as it was before `inject`, and keeps no tensor of this adapter."""
        self.target.set_context(IP_ADAPTER_CONTEXT, {self.name: None})
        for adapter in reversed(self._adapters):
            adapter.eject()

    def preprocess_image(self, images: "Image.Image | Sequence[Image.Image]") -> Tensor:
        """Images as the CLIP image encoder takes them (transformers' `CLIPImageProcessor`)."""
        return clip_preprocess(images, size=self.clip_image_encoder.image_size)

    def compute_clip_image_embedding(self, images: "Image.Image | Sequence[Image.Image] | Tensor") -> Tensor:
        """The (negative, positive) CLIP embeddings of one image prompt (several images: their tokens side by side).

        As diffusers' `prepare_ip_adapter_image_embeds` builds them: `(2, images, output_dim)` for the base
        adapter, zeros for the negative; `(2, images, sequence, width)` for plus, the encoder's penultimate hidden
        states of the images and of an all-zero (preprocessed) image for the negative.

        Args:
            images: PIL images, or a batch of preprocessed ones (see `preprocess_image`).
        """
        pixels = images if isinstance(images, Tensor) else self.preprocess_image(images)
        if self.fine_grained:
            # Cut here rather than once: the encoder's weights may have been loaded since the adapter was built.
            encoder = self.clip_image_encoder.with_penultimate_output()
            positive, negative = encoder(pixels), encoder(torch.zeros_like(pixels))
        else:
            positive = self.clip_image_encoder(pixels)
            negative = torch.zeros_like(positive)
        return torch.stack([negative, positive])

    def set_face_embedding(self, face: Tensor) -> None:
        """Give a FaceID IP-Adapter its face prompt: a face recognition embedding (insightface's `normed_embedding`).

        Args:
            face: `(face_embedding_dim,)` for one face, `(faces, face_embedding_dim)` for several (their tokens side
                by side; the negative, zeros, is added as diffusers' FaceID example builds it), or
                `(batch, faces, face_embedding_dim)` as diffusers' `ip_adapter_image_embeds` entries, batched as the
                UNet runs (negative rows first when guided).
        """
        if self.kind != "faceid":
            raise ValueError(f"a {self.kind} IP-Adapter takes a CLIP image embedding: use `set_clip_image_embedding`")
        width = self.image_proj.layer("Linear_1", fl.Linear).in_features
        if face.shape[-1] != width or not 1 <= face.dim() <= 3:
            raise ValueError(
                f"expected face embeddings of shape ({width},), (faces, {width}) or (batch, faces, {width}), got "
                f"{tuple(face.shape)}"
            )
        if face.dim() < 3:
            faces = face.reshape(1, -1, width)
            face = torch.cat([torch.zeros_like(faces), faces])
        self.set_clip_image_embedding(face)

    def set_clip_image_embedding(self, embedding: Tensor) -> None:
        """Project `embedding` (from `compute_clip_image_embedding`) to image tokens and give them to the UNet.

        Args:
            embedding: `(batch, images, ...)`, batched as the UNet runs (negative rows first when guided).
        """
        batch, images = embedding.shape[:2]
        proj = self.image_proj
        tokens = proj(embedding.reshape(batch * images, *embedding.shape[2:]).to(device=proj.device, dtype=proj.dtype))
        self.target.set_context(IP_ADAPTER_CONTEXT, {self.name: tokens.reshape(batch, -1, tokens.shape[-1])})


class SD1IPAdapter(IPAdapter):
    """IP-Adapter for Stable Diffusion 1.5 (`ip-adapter_sd15.bin`, `ip-adapter-plus_sd15.bin`,
    `ip-adapter-faceid_sd15.bin`...).

    Args:
        target: The UNet (`sd.unet`).
        weights: The original file or its tensors, or a file `refiners-convert ip-adapter` wrote.
        scale: The weight of the image prompt.
        fine_grained: IP-Adapter plus.
        clip_image_encoder: The image encoder (default: a `CLIPImageEncoderH` on the UNet's device, to load; none
            for FaceID).
        device: Where the adapter's weights live (default: the UNet's device).
        dtype: The adapter's dtype (default: the UNet's).
        name: Tells several IP-Adapters on one UNet apart.
    """

    def __init__(
        self,
        target: UNet,
        weights: "str | Path | Mapping[str, Tensor] | IPAdapterWeights",
        scale: float = 1.0,
        fine_grained: bool = False,
        clip_image_encoder: CLIPImageEncoder | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        name: str = "default",
    ) -> None:
        loaded = load_ip_adapter_weights(weights)
        if clip_image_encoder is None and loaded.kind != "faceid":
            clip_image_encoder = CLIPImageEncoderH(device=target.device, dtype=target.dtype)
        super().__init__(target, clip_image_encoder, loaded, scale, fine_grained, device, dtype, name=name)


class SDXLIPAdapter(IPAdapter):
    """IP-Adapter for SDXL (`ip-adapter_sdxl.bin` with ViT-bigG, `ip-adapter-plus_sdxl_vit-h.bin` with ViT-H,
    `ip-adapter-faceid_sdxl.bin`...).

    Args:
        target: The UNet (`sdxl.unet`).
        weights: The original file or its tensors, or a file `refiners-convert ip-adapter` wrote.
        scale: The weight of the image prompt.
        fine_grained: IP-Adapter plus.
        clip_image_encoder: The image encoder (default: the one the file's sizes name, `CLIPImageEncoderG` or
            `CLIPImageEncoderH`, on the UNet's device, to load; none for FaceID).
        device: Where the adapter's weights live (default: the UNet's device).
        dtype: The adapter's dtype (default: the UNet's).
        name: Tells several IP-Adapters on one UNet apart.
    """

    def __init__(
        self,
        target: UNet,
        weights: "str | Path | Mapping[str, Tensor] | IPAdapterWeights",
        scale: float = 1.0,
        fine_grained: bool = False,
        clip_image_encoder: CLIPImageEncoder | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        name: str = "default",
    ) -> None:
        loaded = load_ip_adapter_weights(weights)
        if clip_image_encoder is None and loaded.kind != "faceid":
            arguments = loaded.projection.arguments
            wide = arguments.get("clip_image_embedding_dim") == 1280 or arguments.get("input_dim") == 1664
            encoder_class = CLIPImageEncoderG if wide else CLIPImageEncoderH
            clip_image_encoder = encoder_class(device=target.device, dtype=target.dtype)
        super().__init__(target, clip_image_encoder, loaded, scale, fine_grained, device, dtype, name=name)
