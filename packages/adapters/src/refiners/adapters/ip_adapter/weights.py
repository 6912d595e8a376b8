"""IP-Adapter files: the original (h94) layout read into refiners' layout, the one an `IPAdapter` loads.

The original files (`.bin`: `{"image_proj": {...}, "ip_adapter": {...}}`, or `.safetensors` with flat keys) hold
`image_proj.*`, the image projection, and `ip_adapter.{N}.*`, where N numbers the UNet's attention processors as
diffusers lists them (down blocks, up blocks, then the middle block; in each transformer layer the self-attention,
then the cross-attention): `to_k_ip`/`to_v_ip` of the cross-attentions (odd N) and, in the FaceID files, a LoRA of
every attention (`to_q_lora.down.weight`...), which diffusers' `load_ip_adapter` applies with `load_lora_weights`.

Refiners' layout (`IPAdapterWeights`, what `refiners-convert ip-adapter` writes) names the projection's parameters as
its `state_dict` does, records the projection's constructor call (`ModelConfig`), numbers the cross-attentions
`cross_attention.{i}` (0, 1, 2...) and keeps the LoRA as `lora.{N}.{to_q,to_k,to_v,to_out}.{lora_down,lora_up}.weight`.
"""

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.ip_adapter.image_projection import (
    FaceIDImageProjection,
    ImageProjection,
    PerceiverLayer,
    PerceiverResampler,
)
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors

__all__ = [
    "IPAdapterKind",
    "IPAdapterWeights",
    "PROJECTION_CLASSES",
    "read_ip_adapter_weights",
    "convert_h94_ip_adapter",
    "load_ip_adapter_weights",
]

IPAdapterKind = Literal["base", "plus", "faceid"]
"""Which image projection an IP-Adapter has: `ImageProjection` (base), `PerceiverResampler` (plus),
`FaceIDImageProjection` (FaceID)."""

PROJECTION_CLASSES: dict[str, tuple[IPAdapterKind, type[fl.Chain]]] = {
    "ImageProjection": ("base", ImageProjection),
    "PerceiverResampler": ("plus", PerceiverResampler),
    "FaceIDImageProjection": ("faceid", FaceIDImageProjection),
}
"""The image projections a refiners IP-Adapter file may record, by class name, with their kind."""

_LORA_KEY = re.compile(r"ip_adapter\.(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_IP_KEY = re.compile(r"ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight")
_REFINERS_LORA_KEY = re.compile(r"lora\.(\d+)\.(to_q|to_k|to_v|to_out)\.(lora_down|lora_up)\.weight")

Transform = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class IPAdapterWeights:
    """An IP-Adapter's weights in refiners' layout (see the module's documentation).

    Args:
        projection: The image projection's constructor call.
        tensors: `image_proj.*`, `cross_attention.{i}.to_k_ip.weight` / `to_v_ip.weight` and, for FaceID,
            `lora.{N}.*`.
    """

    projection: ModelConfig
    tensors: Mapping[str, Tensor]

    @property
    def kind(self) -> IPAdapterKind:
        return PROJECTION_CLASSES[self.projection.class_name][0]

    @property
    def cross_attention_count(self) -> int:
        return sum(1 for key in self.tensors if key.startswith("cross_attention.") and key.endswith(".to_k_ip.weight"))

    @property
    def context_embedding_dim(self) -> int:
        """The width of the context the UNet's cross-attentions take (that of the image tokens)."""
        return self.tensors["cross_attention.0.to_k_ip.weight"].shape[1]

    def build_projection(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> fl.Chain:
        """The image projection with these weights."""
        projection = self.projection.build([cls for _, cls in PROJECTION_CLASSES.values()], device="meta")
        state = {
            key.removeprefix("image_proj."): tensor.to(device=device, dtype=dtype, copy=True)
            for key, tensor in self.tensors.items()
            if key.startswith("image_proj.")
        }
        projection.load_state_dict(state, strict=True, assign=True)
        return projection

    def lora_tensors(self) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """The FaceID LoRA: for each attention processor number and projection (`to_q`...), `(down, up)`."""
        pairs: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        for key, down in self.tensors.items():
            if (match := _REFINERS_LORA_KEY.fullmatch(key)) and match[3] == "lora_down":
                up = self.tensors[key.replace(".lora_down.", ".lora_up.")]
                pairs[(int(match[1]), match[2])] = (down, up)
        return pairs


def read_ip_adapter_weights(weights: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """An IP-Adapter file's tensors, flat (`image_proj.proj.weight`, `ip_adapter.1.to_k_ip.weight`...).

    Reads `.safetensors` (flat keys) and `.bin` (`{"image_proj": {...}, "ip_adapter": {...}}`, read with
    `torch.load(weights_only=True)`), or a mapping of either form.
    """
    loaded: Any
    if isinstance(weights, str | Path):
        path = Path(weights)
        if path.suffix == ".safetensors":
            loaded = load_from_safetensors(path)
        else:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:
                raise ValueError(f"{path} cannot be loaded safely (it pickles more than tensors): {error}") from None
    else:
        loaded = weights
    flat: dict[str, Tensor] = {}
    for key, value in dict(loaded).items():
        if isinstance(value, Mapping):
            for inner, tensor in value.items():  # pyright: ignore[reportUnknownVariableType]
                flat[f"{key}.{inner}"] = tensor
        else:
            flat[str(key)] = value
    return flat


def _h94_kind(tensors: Mapping[str, Tensor]) -> IPAdapterKind:
    if "image_proj.perceiver_resampler.proj_in.weight" in tensors:
        raise ValueError(
            "this is an IP-Adapter FaceID-Plus file (image_proj.perceiver_resampler.*), which is not supported: use "
            "the FaceID file (ip-adapter-faceid_sd15.bin, ip-adapter-faceid_sdxl.bin)"
        )
    if "image_proj.proj.3.weight" in tensors:
        raise ValueError("this is an IP-Adapter full-face file (image_proj.proj.3.*), which is not supported")
    if "image_proj.proj.weight" in tensors:
        return "base"
    if "image_proj.latents" in tensors:
        return "plus"
    if "image_proj.proj.0.weight" in tensors and "image_proj.norm.weight" in tensors:
        return "faceid"
    raise ValueError(
        "not an IP-Adapter file: expected image_proj.proj.weight (base), image_proj.latents (plus) or "
        f"image_proj.proj.0.weight (FaceID), got {', '.join(sorted(tensors)[:6])}"
    )


def _h94_projection(tensors: Mapping[str, Tensor], kind: IPAdapterKind) -> ModelConfig:
    """The constructor call of the projection the original file's `image_proj.*` shapes describe."""
    match kind:
        case "base":
            weight, width = tensors["image_proj.proj.weight"], tensors["image_proj.norm.weight"].shape[0]
            return ModelConfig.of(
                ImageProjection,
                clip_image_embedding_dim=weight.shape[1],
                clip_text_embedding_dim=width,
                num_tokens=weight.shape[0] // width,
            )
        case "plus":
            latents = tensors["image_proj.latents"]
            layers = {key.split(".")[2] for key in tensors if key.startswith("image_proj.layers.")}
            return ModelConfig.of(
                PerceiverResampler,
                embedding_dim=latents.shape[-1],
                input_dim=tensors["image_proj.proj_in.weight"].shape[1],
                output_dim=tensors["image_proj.proj_out.weight"].shape[0],
                num_layers=len(layers),
                num_heads=tensors["image_proj.layers.0.0.to_q.weight"].shape[0] // 64,
                num_tokens=latents.shape[-2],
            )
        case "faceid":
            first, width = tensors["image_proj.proj.0.weight"], tensors["image_proj.norm.weight"].shape[0]
            return ModelConfig.of(
                FaceIDImageProjection,
                face_embedding_dim=first.shape[1],
                clip_text_embedding_dim=width,
                num_tokens=tensors["image_proj.proj.2.weight"].shape[0] // width,
                hidden_dim=first.shape[0],
            )


def _h94_projection_keys(projection: fl.Chain) -> list[tuple[str, str, Transform | None]]:
    """`(original key, refiners key, transform)` for each parameter of `projection`."""
    names = {id(parameter): f"image_proj.{name}" for name, parameter in projection.named_parameters()}
    pairs: list[tuple[str, str, Transform | None]] = []

    def add(prefix: str, module: fl.Module, transform: Transform | None = None) -> None:
        for name, parameter in module.named_parameters(recurse=False):
            pairs.append((f"image_proj.{prefix}.{name}", names[id(parameter)], transform))

    if isinstance(projection, ImageProjection):
        add("proj", projection.layer("Linear", fl.Linear))
        add("norm", projection.layer("LayerNorm", fl.LayerNorm))
    elif isinstance(projection, FaceIDImageProjection):
        first, second = projection.layers(fl.Linear)
        add("proj.0", first)
        add("proj.2", second)
        add("norm", projection.layer("LayerNorm", fl.LayerNorm))
    else:
        latents = projection.layer("LatentTokens", fl.Parameter).weight
        pairs.append(("image_proj.latents", names[id(latents)], lambda t: t.reshape(t.shape[-2:])))
        add("proj_in", projection.layer("Linear_1", fl.Linear))
        add("proj_out", projection.layer("Linear_2", fl.Linear))
        add("norm_out", projection.layer("LayerNorm", fl.LayerNorm))
        for index, layer in enumerate(projection.layers(PerceiverLayer)):
            prefix = f"layers.{index}"
            norm1, norm2, ff_norm = layer.layers(fl.LayerNorm)
            to_q, to_k, to_v, to_out, ff1, ff2 = layer.layers(fl.Linear)
            for name, module in [
                ("0.norm1", norm1),  # the image features' norm
                ("0.norm2", norm2),  # the latent tokens'
                ("0.to_q", to_q),
                ("0.to_out", to_out),
                ("1.0", ff_norm),
                ("1.1", ff1),
                ("1.3", ff2),
            ]:
                add(f"{prefix}.{name}", module)
            # One `to_kv` in the file: the keys' projection, then the values'.
            kv = f"image_proj.{prefix}.0.to_kv.weight"
            pairs.append((kv, names[id(to_k.weight)], lambda t: t.chunk(2)[0]))
            pairs.append((kv, names[id(to_v.weight)], lambda t: t.chunk(2)[1]))
    return pairs


def convert_h94_ip_adapter(tensors: Mapping[str, Tensor]) -> IPAdapterWeights:
    """An original (h94) IP-Adapter file's tensors (see `read_ip_adapter_weights`) in refiners' layout.

    Raises:
        ValueError: A kind that is not supported, or tensors that are missing, left unused or of the wrong shape
            (each listed).
    """
    kind = _h94_kind(tensors)
    config = _h94_projection(tensors, kind)
    projection = config.build([cls for _, cls in PROJECTION_CLASSES.values()], device="meta")
    shapes = dict(projection.state_dict())
    converted: dict[str, Tensor] = {}
    used: set[str] = set()
    misshaped: list[str] = []
    missing: list[str] = []
    for source, target, transform in _h94_projection_keys(projection):
        if source not in tensors:
            missing.append(source)
            continue
        used.add(source)
        tensor = tensors[source] if transform is None else transform(tensors[source])
        expected = shapes[target.removeprefix("image_proj.")].shape
        if tensor.shape != expected:
            misshaped.append(f"{source} {tuple(tensor.shape)} (expected {tuple(expected)})")
        converted[target] = tensor.contiguous()
    cross_attentions = sorted({int(match[1]) for key in tensors if (match := _IP_KEY.fullmatch(key))})
    if not cross_attentions:
        raise ValueError("not an IP-Adapter file: it has no ip_adapter.N.to_k_ip.weight")
    for index, number in enumerate(range(1, 2 * len(cross_attentions), 2)):
        for name in ("to_k_ip", "to_v_ip"):
            source = f"ip_adapter.{number}.{name}.weight"
            if source in tensors:
                used.add(source)
                converted[f"cross_attention.{index}.{name}.weight"] = tensors[source]
            else:
                missing.append(source)
    for key in tensors:
        # The FaceID LoRA, of every attention processor of the UNet (two per cross-attention).
        if (match := _LORA_KEY.fullmatch(key)) and int(match[1]) < 2 * len(cross_attentions):
            used.add(key)
            converted[f"lora.{match[1]}.{match[2]}.lora_{match[3]}.weight"] = tensors[key]
    if unused := sorted(set(tensors) - used):
        raise ValueError(f"{len(unused)} tensors of the IP-Adapter file are not used: {', '.join(unused)}")
    if missing:
        raise ValueError(f"the IP-Adapter file lacks {len(missing)} tensors: {', '.join(missing)}")
    if misshaped:
        raise ValueError(f"IP-Adapter tensors of the wrong shape: {', '.join(misshaped)}")
    return IPAdapterWeights(config, converted)


def load_ip_adapter_weights(weights: "str | Path | Mapping[str, Any] | IPAdapterWeights") -> IPAdapterWeights:
    """An IP-Adapter's weights in refiners' layout: a file `refiners-convert ip-adapter` wrote (its metadata
    records the projection), or an original file or its tensors, converted in memory (`convert_h94_ip_adapter`).
    """
    if isinstance(weights, IPAdapterWeights):
        return weights
    if isinstance(weights, str | Path) and Path(weights).suffix == ".safetensors":
        config = ModelConfig.from_metadata(load_metadata_from_safetensors(weights))
        if config is not None:
            if config.class_name not in PROJECTION_CLASSES:
                raise ValueError(
                    f"{weights} holds the weights of a {config.class_name}, not of an IP-Adapter: load it with its "
                    "own class"
                )
            return _checked(IPAdapterWeights(config, load_from_safetensors(weights)), str(weights))
    return convert_h94_ip_adapter(read_ip_adapter_weights(weights))


def _checked(weights: IPAdapterWeights, origin: str) -> IPAdapterWeights:
    """`weights`, if they hold exactly the tensors of refiners' layout for their projection (else an error listing
    what is missing or unused)."""
    projection = weights.projection.build([cls for _, cls in PROJECTION_CLASSES.values()], device="meta")
    expected = {f"image_proj.{key}" for key in projection.state_dict()}
    count = weights.cross_attention_count
    expected |= {f"cross_attention.{i}.{name}.weight" for i in range(count) for name in ("to_k_ip", "to_v_ip")}
    tensors = weights.tensors
    if missing := sorted(expected - set(tensors)):
        raise ValueError(f"{origin} lacks {len(missing)} tensors of an IP-Adapter: {', '.join(missing)}")
    if unused := sorted(key for key in tensors if key not in expected and not _REFINERS_LORA_KEY.fullmatch(key)):
        raise ValueError(f"{len(unused)} tensors of {origin} are not used: {', '.join(unused)}")
    return weights
