"""The refiners model a Stable Diffusion 1.x source converts into, sized from the source's configs.

A diffusers folder says how big each component is (`config.json`): Stable Diffusion 1.5 itself, a distilled or toy
model of the same architecture (narrower, fewer layers). The functions here read those configs, check that they
describe the SD1 architecture (same blocks, same layout), and give the constructor call of the refiners model of the
same sizes (a `ModelConfig`, which the converted file records). Sources without configs (single-file checkpoints,
bare weights files) are Stable Diffusion 1.5's sizes.

- `unet_config(source, in_channels)`: `SD1UNet` from diffusers' `UNet2DConditionModel` config, and
  `unet_sample_size(source)`, its native sample size;
- `autoencoder_config(source)`: `LatentDiffusionAutoencoder` (`SD1Autoencoder` at SD1.5's sizes) from `AutoencoderKL`'s;
- `clip_text_config(source)`: `CLIPTextEncoder` (`CLIPTextEncoderL` at SD1.5's sizes) from transformers'
  `CLIPTextConfig`.

`unet_for`, `autoencoder_for` and `clip_text_for` build those models on the "meta" device: only their structure and
shapes are read, nothing is allocated.
"""

from collections.abc import Mapping
from typing import Any, TypeVar

from refiners.converters.engine import ConversionError
from refiners.converters.sources import DiffusersFolder, Source
from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTextEncoderL
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.weights import SD15_SAMPLE_SIZE

__all__ = [
    "unet_config",
    "unet_sample_size",
    "autoencoder_config",
    "clip_text_config",
    "unet_for",
    "autoencoder_for",
    "clip_text_for",
    "describe",
]

# Config entries that the SD1 architecture fixes: the value it needs, assumed when the config omits it (diffusers'
# and transformers' defaults). Entries not listed here (sizes read below, sample_size, ...) are free.
_UNET_FIXED: dict[str, Any] = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "use_linear_projection": False,
    "upcast_attention": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "addition_embed_type": None,
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}
_AUTOENCODER_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_CLIP_TEXT_GELU = {"quick_gelu": "quick", "gelu": "none"}

ModelT = TypeVar("ModelT", SD1UNet, LatentDiffusionAutoencoder, CLIPTextEncoder)


def _differences(config: Mapping[str, Any], fixed: Mapping[str, Any]) -> list[str]:
    def normalized(value: Any) -> Any:
        return list(value) if isinstance(value, tuple | list) else value

    return [
        f"{key}={config[key]!r} (SD1: {expected!r})"
        for key, expected in fixed.items()
        if key in config and normalized(config[key]) != normalized(expected)
    ]


def _check(differences: list[str], what: str, source: Source) -> None:
    if differences:
        raise ConversionError(
            f"the {what} of {source.describe()} is not of the Stable Diffusion 1.x architecture: its config has "
            f"{'; '.join(differences)}. refiners-convert converts SD1.x models (any sizes, same blocks) only."
        )


def _int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if not isinstance(value, int):
        raise ConversionError(f"config.json gives {key}={value!r}: expected an integer")
    return value


def _ints(config: Mapping[str, Any], key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = config.get(key, default)
    if not isinstance(value, list | tuple) or not all(isinstance(item, int) for item in value):  # pyright: ignore[reportUnknownVariableType]
        raise ConversionError(f"config.json gives {key}={value!r}: expected a list of integers")
    return tuple(value)  # pyright: ignore[reportUnknownArgumentType]


def unet_config(source: Source, in_channels: int) -> ModelConfig:
    """The constructor call of the `SD1UNet` that the source's UNet converts into.

    Raises:
        ConversionError: The UNet's config describes another architecture; the message lists what differs.
    """
    if not isinstance(source, DiffusersFolder) or not source.has_component("unet"):
        return ModelConfig.of(SD1UNet, in_channels=in_channels)
    config = source.config("unet")
    differences = _differences(config, _UNET_FIXED)
    heads: Any = config.get("attention_head_dim", 8)  # diffusers' name for SD1's number of heads
    if isinstance(heads, list) and len(set(heads)) == 1:  # pyright: ignore[reportUnknownArgumentType]
        heads = heads[0]  # pyright: ignore[reportUnknownVariableType]
    if not isinstance(heads, int):
        differences.append(f"attention_head_dim={heads!r} (SD1: one number of heads for every block)")
    _check(differences, "UNet", source)
    assert isinstance(heads, int)
    channels = _ints(config, "block_out_channels", (320, 640, 1280, 1280))
    if len(channels) != 4:
        _check([f"block_out_channels={list(channels)} (SD1: four resolutions)"], "UNet", source)
    return ModelConfig.of(
        SD1UNet,
        in_channels=in_channels,
        channels=channels,
        context_embedding_dim=_int(config, "cross_attention_dim", 1280),  # diffusers' default
        num_attention_heads=heads,
    )


def unet_sample_size(source: Source) -> int:
    """The side of the latents the source's UNet was trained on (diffusers' `sample_size`; SD1.5's 64 without a
    config): `generate` draws images of this size times 8 by default."""
    if not isinstance(source, DiffusersFolder) or not source.has_component("unet"):
        return SD15_SAMPLE_SIZE
    return _int(source.config("unet"), "sample_size", SD15_SAMPLE_SIZE)


def autoencoder_config(source: Source) -> ModelConfig:
    """The constructor call of the autoencoder that the source's converts into: `SD1Autoencoder` at SD1.5's sizes.

    Raises:
        ConversionError: The autoencoder's config describes another architecture.
    """
    if not isinstance(source, DiffusersFolder) or not source.has_component("vae"):
        return ModelConfig.of(SD1Autoencoder)
    config = source.config("vae")
    blocks = _ints(config, "block_out_channels", (64,))
    differences = _differences(config, _AUTOENCODER_FIXED)
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if key in config and list(config[key]) != [block] * len(blocks):
            differences.append(f"{key}={config[key]!r} (SD1: {block} for each of block_out_channels)")
    _check(differences, "autoencoder", source)
    scale = config.get("scaling_factor", 0.18215)
    if not isinstance(scale, int | float):
        raise ConversionError(f"the autoencoder's config gives scaling_factor={scale!r}: expected a number")
    return _variant(
        ModelConfig.of(
            LatentDiffusionAutoencoder,
            encoder_scale=float(scale),
            in_channels=_int(config, "in_channels", 3),
            out_channels=_int(config, "out_channels", 3),
            latent_channels=_int(config, "latent_channels", 4),
            block_out_channels=blocks,
            layers_per_block=_int(config, "layers_per_block", 1),
            num_groups=_int(config, "norm_num_groups", 32),
        ),
        SD1Autoencoder,
    )


def clip_text_config(source: Source) -> ModelConfig:
    """The constructor call of the text encoder that the source's converts into: `CLIPTextEncoderL` at SD1.5's sizes.

    Raises:
        ConversionError: The text encoder's config describes another architecture.
    """
    if not isinstance(source, DiffusersFolder) or not source.has_component("text_encoder"):
        return ModelConfig.of(CLIPTextEncoderL)
    config = source.config("text_encoder")
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in _CLIP_TEXT_GELU:
        _check([f"hidden_act={activation!r} (SD1: 'quick_gelu')"], "text encoder", source)
    epsilon = config.get("layer_norm_eps", 1e-5)
    if not isinstance(epsilon, int | float):
        raise ConversionError(f"the text encoder's config gives layer_norm_eps={epsilon!r}: expected a number")
    return _variant(
        ModelConfig.of(
            CLIPTextEncoder,
            embedding_dim=_int(config, "hidden_size", 512),
            max_sequence_length=_int(config, "max_position_embeddings", 77),
            vocabulary_size=_int(config, "vocab_size", 49408),
            num_layers=_int(config, "num_hidden_layers", 12),
            num_attention_heads=_int(config, "num_attention_heads", 8),
            feedforward_dim=_int(config, "intermediate_size", 2048),
            layer_norm_eps=float(epsilon),
            gelu_approximation=_CLIP_TEXT_GELU[activation],
        ),
        CLIPTextEncoderL,
    )


def _variant(config: ModelConfig, variant: type[SD1Autoencoder] | type[CLIPTextEncoderL]) -> ModelConfig:
    """`variant`'s config if `config` builds a model of `variant`'s sizes (SD1.5's component), else `config`."""
    built = variant(device="meta")
    if all(getattr(built, name) == value for name, value in config.arguments.items()):
        return ModelConfig.of(variant)
    return config


def _built(config: ModelConfig, classes: tuple[type[ModelT], ...], what: str, source: Source) -> ModelT:
    try:
        return config.build(classes, device="meta")
    except ValueError as error:
        raise ConversionError(f"the {what} of {source.describe()} cannot be built: {error}") from error


def unet_for(source: Source, in_channels: int) -> SD1UNet:
    """The `SD1UNet` (on the meta device) that the source's UNet converts into (see `unet_config`)."""
    return _built(unet_config(source, in_channels), (SD1UNet,), "UNet", source)


def autoencoder_for(source: Source) -> LatentDiffusionAutoencoder:
    """The autoencoder (on the meta device) that the source's converts into (see `autoencoder_config`)."""
    return _built(autoencoder_config(source), (LatentDiffusionAutoencoder, SD1Autoencoder), "autoencoder", source)


def clip_text_for(source: Source) -> CLIPTextEncoder:
    """The text encoder (on the meta device) that the source's converts into (see `clip_text_config`)."""
    return _built(clip_text_config(source), (CLIPTextEncoder, CLIPTextEncoderL), "text encoder", source)


def describe(model: SD1UNet | LatentDiffusionAutoencoder | CLIPTextEncoder) -> str:
    """How to build `model` in Python: `SD1UNet(in_channels=4)` at SD1.5's sizes, every size otherwise."""
    if isinstance(model, SD1UNet):
        names = ("channels", "context_embedding_dim", "num_attention_heads")
        return _call("SD1UNet", "SD1UNet", model, SD1UNet(device="meta"), names, f"in_channels={model.in_channels}")
    if isinstance(model, LatentDiffusionAutoencoder):
        names = ("encoder_scale", "in_channels", "out_channels", "latent_channels", "block_out_channels")
        names += ("layers_per_block", "num_groups")
        return _call("LatentDiffusionAutoencoder", "SD1Autoencoder", model, SD1Autoencoder(device="meta"), names)
    names = ("embedding_dim", "max_sequence_length", "vocabulary_size", "num_layers", "num_attention_heads")
    names += ("feedforward_dim", "layer_norm_eps", "gelu_approximation")
    return _call("CLIPTextEncoder", "CLIPTextEncoderL", model, CLIPTextEncoderL(device="meta"), names)


def _call(name: str, default_name: str, model: Any, default: Any, attributes: tuple[str, ...], first: str = "") -> str:
    """`default_name(first)` if `model` has `default`'s `attributes`, else `name(first, attribute=value, ...)`."""
    values = {attribute: getattr(model, attribute) for attribute in attributes}
    if values == {attribute: getattr(default, attribute) for attribute in attributes}:
        return f"{default_name}({first})"
    return f"{name}({', '.join([*filter(None, [first]), *(f'{key}={value!r}' for key, value in values.items())])})"
