"""transformers' CLIP text models (`CLIPTextModel`, `CLIPTextModelWithProjection`) to `CLIPTextEncoder` weights.

The key map is derived from the encoder's structure: each transformers module is matched with the refiners layer
that plays its role (found by type, in order), so it holds for every width and depth, and for encoders with adapters
injected (e.g. `TextEncoderWithPooling`, which receives `text_projection`).
"""

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.converters.engine import KeyMap, convert_state_dict
from refiners.foundationals.clip.common import FeedForward, PositionalEncoder, TransformerLayer
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, TextEncoderWithPooling, TokenEncoder

__all__ = ["TRANSFORMERS_CLIP_TEXT_PREFIX", "transformers_clip_text_key_map", "convert_transformers_clip_text"]

TRANSFORMERS_CLIP_TEXT_PREFIX = "text_model."
"""The prefix of the text transformer's keys in transformers checkpoints (Hugging Face Hub files of `CLIPTextModel`
and `CLIPTextModelWithProjection`). transformers 5 saves a `CLIPTextModel` without it."""


def _path(root: fl.Chain, module: fl.Module) -> str:
    """The state-dict prefix of `module` in `root` (e.g. `TransformerLayer_3.Residual_1.LayerNorm`)."""
    parts: list[str] = []
    while module is not root:
        parent = module.parent
        if parent is None:
            raise ValueError(f"{type(module).__name__} is not inside {type(root).__name__}")
        parts.append(parent.key_of(module))
        module = parent
    return ".".join(reversed(parts))


def _add_module(key_map: KeyMap, source: str, root: fl.Chain, module: fl.Module) -> None:
    """Map the source module's tensors (`{source}.weight`, `{source}.bias`) to the same tensors of `module`."""
    target = _path(root, module)
    for name, _ in module.named_parameters(recurse=False):
        key_map.add(f"{source}.{name}", f"{target}.{name}")


def _the(modules: Iterable[fl.Module], what: str, count: int) -> list[fl.Module]:
    found = list(modules)
    if len(found) != count:
        raise ValueError(f"expected {count} {what}, found {len(found)}: is this a CLIPTextEncoder?")
    return found


def transformers_clip_text_key_map(
    encoder: CLIPTextEncoder, source_prefix: str = TRANSFORMERS_CLIP_TEXT_PREFIX
) -> KeyMap:
    """The key map from a transformers CLIP text model's state dict to `encoder`'s.

    `embeddings.position_ids` (a buffer of `0..76` that older transformers versions saved) is ignored on purpose.
    `text_projection.weight` (of `CLIPTextModelWithProjection`) is mapped when the encoder has a
    `TextEncoderWithPooling` injected, to its projection.

    Args:
        encoder: The target encoder (its weights are not read: it may live on the "meta" device).
        source_prefix: The prefix of the text transformer's keys in the source (`""` for a `CLIPTextModel` saved by
            transformers 5).
    """
    key_map = KeyMap(ignored=[lambda key: key == f"{source_prefix}embeddings.position_ids"])
    p = source_prefix
    token_encoder = _the(encoder.layers(TokenEncoder), "TokenEncoder", 1)[0]
    positional_encoder = _the(encoder.layers(PositionalEncoder), "PositionalEncoder", 1)[0]
    _add_module(key_map, f"{p}embeddings.token_embedding", encoder, token_encoder)
    _add_module(key_map, f"{p}embeddings.position_embedding", encoder, positional_encoder)

    layers = list(encoder.layers(TransformerLayer))
    layer_norms_in_layers: set[int] = set()
    for index, layer in enumerate(layers):
        source = f"{p}encoder.layers.{index}"
        norm1, norm2 = _the(layer.layers(fl.LayerNorm), "LayerNorms per TransformerLayer", 2)
        layer_norms_in_layers.update((id(norm1), id(norm2)))
        attention = layer.ensure_find(fl.SelfAttention)
        query, key, value = _the(attention.layer("Distribute", fl.Distribute).layers(fl.Linear), "projections", 3)
        output = attention.layer("Linear", fl.Linear)
        fc1, fc2 = _the(layer.ensure_find(FeedForward).layers(fl.Linear), "Linears per FeedForward", 2)
        for name, module in (
            ("layer_norm1", norm1),
            ("self_attn.q_proj", query),
            ("self_attn.k_proj", key),
            ("self_attn.v_proj", value),
            ("self_attn.out_proj", output),
            ("layer_norm2", norm2),
            ("mlp.fc1", fc1),
            ("mlp.fc2", fc2),
        ):
            _add_module(key_map, f"{source}.{name}", encoder, module)

    final_norm = _the(
        (norm for norm in encoder.layers(fl.LayerNorm) if id(norm) not in layer_norms_in_layers),
        "final LayerNorm",
        1,
    )[0]
    _add_module(key_map, f"{p}final_layer_norm", encoder, final_norm)

    if (pooling := encoder.find(TextEncoderWithPooling)) is not None:
        _add_module(key_map, "text_projection", encoder, pooling.projection)
    return key_map


def convert_transformers_clip_text(
    source: Mapping[str, Tensor], encoder: CLIPTextEncoder, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Convert a transformers CLIP text model's state dict into `encoder`'s (see `transformers_clip_text_key_map`).

    Both layouts of the keys are accepted: `text_model.*` (Hub checkpoints, `CLIPTextModelWithProjection`) and
    unprefixed (a `CLIPTextModel` saved by transformers 5).

    Args:
        source: The source tensors, e.g. `load_from_safetensors("text_encoder/model.safetensors")`.
        encoder: The target encoder (only its state-dict shapes are read: it may live on the "meta" device).
        dtype: Cast floating-point tensors to this dtype (default: keep the source's).

    Raises:
        ConversionError: The source is not a CLIP text model that fits `encoder`; the message lists the keys.
    """
    prefix = TRANSFORMERS_CLIP_TEXT_PREFIX if any(k.startswith(TRANSFORMERS_CLIP_TEXT_PREFIX) for k in source) else ""
    return convert_state_dict(
        source,
        transformers_clip_text_key_map(encoder, source_prefix=prefix),
        {key: tensor.shape for key, tensor in encoder.state_dict().items()},
        what=f"transformers CLIP text model (for {type(encoder).__name__})",
        dtype=dtype,
    )
