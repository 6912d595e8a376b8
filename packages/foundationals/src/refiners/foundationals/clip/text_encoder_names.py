"""The names transformers gives the layers of `CLIPTextEncoder`: `text_model.encoder.layers.0.self_attn.q_proj`...

Checkpoints and LoRA files name tensors after modules of transformers' `CLIPTextModel`. `transformers_clip_text_modules`
pairs every such module name with the layer of a live `CLIPTextEncoder` that plays its role (found by type, in order),
so it holds for every width and depth. The weight converters (`refiners.converters`) and the LoRA loaders
(`refiners.adapters.lora`) both read it.

Example:
    ```py
    import refiners.fluxion.layers as fl
    from refiners.foundationals.clip import CLIPTextEncoderL
    from refiners.foundationals.clip.text_encoder_names import transformers_clip_text_modules

    modules = transformers_clip_text_modules(CLIPTextEncoderL(device="meta"))
    q_proj = modules["text_model.encoder.layers.11.self_attn.q_proj"]
    assert isinstance(q_proj, fl.Linear) and q_proj.in_features == 768
    ```
"""

from collections.abc import Iterable, Iterator
from typing import TypeVar

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import Lora
from refiners.foundationals.clip.common import FeedForward, PositionalEncoder, TransformerLayer
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, TextEncoderWithPooling, TokenEncoder

__all__ = ["TRANSFORMERS_CLIP_TEXT_PREFIX", "transformers_clip_text_modules"]

TRANSFORMERS_CLIP_TEXT_PREFIX = "text_model."
"""The prefix of the text transformer's modules in transformers' `CLIPTextModel` (Hub checkpoints, LoRA files).
transformers 5 saves a `CLIPTextModel` without it."""

T = TypeVar("T", bound=fl.Module)


def _layers(chain: fl.Chain, layer_type: type[T]) -> Iterator[T]:
    """The layers of `layer_type` in `chain`, depth first, but those of LoRAs: they update the model's layers (which
    stay inside their `LoraAdapter`), they are not layers of the model."""
    for child in chain:
        if isinstance(child, Lora):
            continue
        if isinstance(child, layer_type):
            yield child
        if isinstance(child, fl.Chain):
            yield from _layers(child, layer_type)


def _the(modules: Iterable[T], what: str, count: int) -> list[T]:
    found = list(modules)
    if len(found) != count:
        raise ValueError(f"expected {count} {what}, found {len(found)}: is this a CLIPTextEncoder?")
    return found


def transformers_clip_text_modules(
    encoder: CLIPTextEncoder, prefix: str = TRANSFORMERS_CLIP_TEXT_PREFIX
) -> dict[str, fl.WeightedModule]:
    """Every layer with weights of a `CLIPTextEncoder`, by the name of the module of transformers' CLIP text model
    that plays its role, in transformers' order.

    `text_projection` (of `CLIPTextModelWithProjection`, never prefixed) is named when the encoder has a
    `TextEncoderWithPooling` injected: it is its projection. A layer wrapped in a `LoraAdapter` keeps its name; the
    layers of LoRAs are not the model's and have none.

    Args:
        encoder: The encoder (its weights are not read: it may live on the "meta" device).
        prefix: The prefix of the text transformer's names (`""` for a `CLIPTextModel` of transformers 5).

    Raises:
        ValueError: The model is not laid out like a `CLIPTextEncoder`.
    """
    p = prefix
    (token_encoder,) = _the(_layers(encoder, TokenEncoder), "TokenEncoder", 1)
    (positional_encoder,) = _the(_layers(encoder, PositionalEncoder), "PositionalEncoder", 1)
    pairs: list[tuple[str, fl.WeightedModule]] = [
        (f"{p}embeddings.token_embedding", token_encoder),
        (f"{p}embeddings.position_embedding", positional_encoder),
    ]
    layer_norms_in_layers: set[int] = set()
    for index, layer in enumerate(encoder.layers(TransformerLayer)):
        name = f"{p}encoder.layers.{index}"
        norm1, norm2 = _the(_layers(layer, fl.LayerNorm), "LayerNorms per TransformerLayer", 2)
        layer_norms_in_layers.update((id(norm1), id(norm2)))
        # The query, key and value projections (in the attention's `Distribute`), then the output projection.
        query, key, value, output = _the(_layers(layer.ensure_find(fl.SelfAttention), fl.Linear), "projections", 4)
        fc1, fc2 = _the(_layers(layer.ensure_find(FeedForward), fl.Linear), "Linears per FeedForward", 2)
        pairs += [
            (f"{name}.layer_norm1", norm1),
            (f"{name}.self_attn.q_proj", query),
            (f"{name}.self_attn.k_proj", key),
            (f"{name}.self_attn.v_proj", value),
            (f"{name}.self_attn.out_proj", output),
            (f"{name}.layer_norm2", norm2),
            (f"{name}.mlp.fc1", fc1),
            (f"{name}.mlp.fc2", fc2),
        ]
    final_norms = [norm for norm in _layers(encoder, fl.LayerNorm) if id(norm) not in layer_norms_in_layers]
    if len(final_norms) > 1:
        raise ValueError(f"expected one final LayerNorm, found {len(final_norms)}: is this a CLIPTextEncoder?")
    # None in an encoder cut to its penultimate output (`with_penultimate_output`, SDXL's CLIP-L).
    pairs += [(f"{p}final_layer_norm", norm) for norm in final_norms]
    if (pooling := encoder.find(TextEncoderWithPooling)) is not None:
        pairs.append(("text_projection", pooling.projection))
    return dict(pairs)
