"""Stable Diffusion XL checkpoints to refiners weights: `refiners-convert sdxl --from SOURCE --to FOLDER`.

Writes the three files `refiners-convert sd1` writes (`clip_text.safetensors`, `autoencoder.safetensors`,
`unet.safetensors`), each recording the constructor call of its model (`refiners.fluxion.model_config`), so that
`StableDiffusion_XL.from_folder` builds every component at its sizes: the base, the refiner (OpenCLIP-G alone, 5 time
ids), an inpainting UNet (9 input channels), or any size of the architecture. The text file holds both encoders (a
`DoubleTextEncoder`), the tokenizer's vocabulary, and not CLIP-L's last layer and final norm: SDXL conditions on the
penultimate hidden state, so those tensors are left out on purpose (and said so).

SOURCE is a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer/`),
a Hugging Face Hub id, or an original single-file checkpoint in Stability's SGM layout (`model.diffusion_model.*`,
`first_stage_model.*`, `conditioner.embedders.0.transformer.*` for CLIP-L, `conditioner.embedders.1.model.*` for
OpenCLIP-G with its fused attention projections): a community fine-tune. A single file has no configs: it is SDXL
base's sizes, or those of the diffusers folder given as `config` (as diffusers' `from_single_file(config=...)`),
which also gives the tokenizer.
"""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from refiners.converters.architecture import autoencoder_config
from refiners.converters.autoencoder import diffusers_autoencoder_key_map
from refiners.converters.clip_text import transformers_clip_text_key_map
from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.converters.reference_check import (
    SD15_TEXT_ENCODER_CONFIG,
    SDXL_REFINER_UNET_CONFIG,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    Comparison,
    compare_outputs,
)
from refiners.converters.single_file import (
    SGM_PREFIXES,
    SGM_REFINER_TEXT_ENCODER_2_PREFIX,
    ldm_autoencoder_renaming,
    ldm_to_diffusers,
    openclip_to_transformers,
)
from refiners.converters.sources import (
    DiffusersFolder,
    SingleFile,
    Source,
    SourceError,
    locate_tokenizer,
    open_source,
    read_tokenizer,
)
from refiners.converters.unet import diffusers_unet_key_map
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder
from refiners.foundationals.latent_diffusion.range_adapter import compute_guidance_scale_embedding
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
    DoubleTextEncoder,
    RefinerTextEncoder,
    SDXLAutoencoder,
    SDXLTextEncoder,
    SDXLUNet,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.model import (
    SDXL_AUTOENCODER_CLASSES,
    SDXL_TEXT_ENCODER_CLASSES,
    SDXL_UNET_CLASSES,
)
from refiners.foundationals.latent_diffusion.unet_names import unet_renaming
from refiners.foundationals.latent_diffusion.weights import (
    AUTOENCODER_FILE,
    CLIP_TEXT_FILE,
    UNET_FILE,
    ConvertedWeights,
    unet_metadata,
)

__all__ = [
    "SGMCheckpoint",
    "sdxl_unet_config",
    "sdxl_text_encoder_config",
    "convert_stable_diffusion_xl_weights",
    "convert_stable_diffusion_xl",
    "compare_stable_diffusion_xl",
    "is_refiner",
    "SDXL_TEXT_ENCODER_CLASSES",
    "SDXL_UNET_CLASSES",
    "SDXL_AUTOENCODER_CLASSES",
]

Progress = Callable[[str], None]

_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_GELU = {"quick_gelu": "quick", "gelu": "none"}


def _quiet(line: str) -> None:
    pass


class SGMCheckpoint:
    """An SDXL single-file checkpoint (SGM layout), read as the components of a diffusers folder.

    Args:
        file: The checkpoint.
        config: A diffusers folder whose configs (and tokenizer) size the model; None for SDXL base's.
        tokenizer: A folder holding the CLIP tokenizer (`vocab.json`, `merges.txt`), if `config` has none.
    """

    def __init__(self, file: SingleFile, config: DiffusersFolder | None, tokenizer: Path | None) -> None:
        self.file = file
        self.config_folder = config
        self.tokenizer = tokenizer
        keys = list(file.tensors)
        self.prefixes = dict(SGM_PREFIXES)
        if not any(key.startswith(SGM_PREFIXES["text_encoder_2"]) for key in keys):
            if not any(key.startswith(SGM_REFINER_TEXT_ENCODER_2_PREFIX) for key in keys):
                raise ConversionError(
                    f"{file.describe()} is not an SDXL checkpoint: it has no {SGM_PREFIXES['text_encoder_2']}* "
                    "(OpenCLIP-G). For Stable Diffusion 1.x, use refiners-convert sd1."
                )
            # The refiner: OpenCLIP-G is its only text embedder.
            del self.prefixes["text_encoder"]
            self.prefixes["text_encoder_2"] = SGM_REFINER_TEXT_ENCODER_2_PREFIX

    @property
    def is_refiner(self) -> bool:
        return "text_encoder" not in self.prefixes

    def has_component(self, component: str) -> bool:
        return component in self.prefixes

    def config(self, component: str) -> dict[str, Any]:
        if self.config_folder is not None:
            return self.config_folder.config(component)
        if component == "unet":
            in_channels = self.file.tensors.shape(f"{SGM_PREFIXES['unet']}input_blocks.0.0.weight")[1]
            return (SDXL_REFINER_UNET_CONFIG if self.is_refiner else SDXL_UNET_CONFIG) | {"in_channels": in_channels}
        defaults = {"vae": SDXL_VAE_CONFIG, "text_encoder": SD15_TEXT_ENCODER_CONFIG}
        return dict(defaults.get(component, SDXL_TEXT_ENCODER_2_CONFIG))

    def tensors(self, component: str) -> Mapping[str, Tensor]:
        checkpoint, prefix = self.file.tensors, self.prefixes[component]
        match component:
            case "unet":
                unet = sdxl_unet_config(self).build(SDXL_UNET_CLASSES, device="meta")
                return ldm_to_diffusers(checkpoint, unet_renaming(unet), prefix)
            case "vae":
                config = self.config("vae")
                renaming = ldm_autoencoder_renaming(len(config["block_out_channels"]), config["layers_per_block"])
                return ldm_to_diffusers(checkpoint, renaming, prefix)
            case "text_encoder":
                return {key.removeprefix(prefix): checkpoint[key] for key in checkpoint if key.startswith(prefix)}
            case _:
                return openclip_to_transformers(checkpoint, prefix)

    def tokenizer_folder(self) -> Path | None:
        if self.tokenizer is not None:
            return self.tokenizer
        return self.config_folder.tokenizer_folder() if self.config_folder is not None else None

    def describe(self) -> str:
        return self.file.describe()


class ReplacedComponents:
    """An SDXL model with components from other sources (`refiners-convert sdxl --unet`, `--vae`): a distilled UNet
    published alone, as LCM's folder (latent-consistency/lcm-sdxl, with its config) or SDXL-Lightning's file
    (diffusers' keys, or SGM's `model.diffusion_model.*`; sized as the base's UNet), or another autoencoder
    (madebyollin/sdxl-vae-fp16-fix: SDXL's architecture, other weights).

    Args:
        base: The model the other components come from.
        replacements: By component (`unet`, `vae`): its folder (or a model folder with that subfolder), or file.
    """

    def __init__(
        self, base: "DiffusersFolder | SGMCheckpoint", replacements: Mapping[str, DiffusersFolder | SingleFile]
    ) -> None:
        self.base = base
        self.replacements = dict(replacements)

    def has_component(self, component: str) -> bool:
        return self.base.has_component(component)

    def config(self, component: str) -> dict[str, Any]:
        if isinstance(replacement := self.replacements.get(component), DiffusersFolder):
            return replacement.config(component)
        return self.base.config(component)

    def tensors(self, component: str) -> Mapping[str, Tensor]:
        replacement = self.replacements.get(component)
        if replacement is None:
            return self.base.tensors(component)
        if isinstance(replacement, DiffusersFolder):
            return replacement.tensors(component)
        checkpoint, prefix = replacement.tensors, SGM_PREFIXES["unet"]
        if component == "unet" and any(key.startswith(prefix) for key in checkpoint):
            unet = sdxl_unet_config(self).build(SDXL_UNET_CLASSES, device="meta")
            return ldm_to_diffusers(checkpoint, unet_renaming(unet), prefix)
        return checkpoint

    def tokenizer_folder(self) -> Path | None:
        return self.base.tokenizer_folder()

    def describe(self) -> str:
        replaced = ", ".join(f"{name}: {source.describe()}" for name, source in self.replacements.items())
        return f"{self.base.describe()} ({replaced})"


SDXLSource = DiffusersFolder | SGMCheckpoint | ReplacedComponents


def _config(source: SDXLSource, component: str) -> dict[str, Any]:
    if not source.has_component(component):
        raise SourceError(
            f"{source.describe()} has no {component}/: an SDXL diffusers folder has {', '.join(_COMPONENTS)}"
        )
    return source.config(component)


def sdxl_unet_config(source: SDXLSource) -> ModelConfig:
    """The constructor call of the `SDXLUNet` that the folder's UNet converts into, from its `config.json`.

    Raises:
        ConversionError: The UNet is not of SDXL's architecture (no text-time embedding: an SD1 or SD2 UNet).
    """
    config = _config(source, "unet")
    if config.get("addition_embed_type") != "text_time":
        raise ConversionError(
            f"the UNet of {source.describe()} is not an SDXL UNet: its config has addition_embed_type="
            f"{config.get('addition_embed_type')!r} (SDXL: 'text_time'). For Stable Diffusion 1.x, use refiners-convert sd1."
        )
    channels = tuple(config["block_out_channels"])
    levels = len(channels)
    attention = tuple(kind.startswith("CrossAttn") for kind in config["down_block_types"])

    def per_level(key: str, default: Any) -> tuple[int, ...]:
        value = config.get(key, default)
        return tuple(value) if isinstance(value, list | tuple) else (value,) * levels  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]

    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = tuple(heads) if isinstance(heads, list | tuple) else (heads,) * levels  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]
    time_dim = int(config.get("addition_time_embed_dim", 256))
    pooled = int(_config(source, "text_encoder_2").get("projection_dim", 1280))
    num_time_ids, remainder = divmod(int(config["projection_class_embeddings_input_dim"]) - pooled, time_dim)
    if remainder:
        raise ConversionError(
            f"the UNet of {source.describe()} takes {config['projection_class_embeddings_input_dim']} text-time features, "
            f"which is not the pooled embedding ({pooled}) plus a whole number of {time_dim}-wide time ids"
        )
    return ModelConfig.of(
        SDXLUNet,
        in_channels=int(config.get("in_channels", 4)),
        channels=channels,
        attention_levels=attention,
        transformer_depths=per_level("transformer_layers_per_block", 1),
        num_attention_heads=heads,  # pyright: ignore[reportUnknownArgumentType]
        context_embedding_dim=int(config["cross_attention_dim"]),
        pooled_embedding_dim=pooled,
        num_time_ids=num_time_ids,
        time_embedding_dim=time_dim,
        layers_per_block=int(config.get("layers_per_block", 2)),
        guidance_embedding_dim=config.get("time_cond_proj_dim"),  # LCM's guidance embedding
    )


def _clip_config(config: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig.of(
        CLIPTextEncoder,
        embedding_dim=int(config["hidden_size"]),
        max_sequence_length=int(config.get("max_position_embeddings", 77)),
        vocabulary_size=int(config["vocab_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        feedforward_dim=int(config["intermediate_size"]),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        gelu_approximation=_GELU[config.get("hidden_act", "quick_gelu")],
    )


def sdxl_text_encoder_config(source: SDXLSource) -> ModelConfig:
    """The constructor call of the `DoubleTextEncoder` that the folder's text encoders convert into, or of the
    `RefinerTextEncoder` of a refiner (which has only `text_encoder_2`: OpenCLIP-G alone)."""
    config_g = _config(source, "text_encoder_2")
    if not source.has_component("text_encoder"):
        return ModelConfig.of(
            RefinerTextEncoder,
            text_encoder_g=_clip_config(config_g),
            projection_dim=int(config_g.get("projection_dim", config_g["hidden_size"])),
        )
    return ModelConfig.of(
        DoubleTextEncoder,
        text_encoder_l=_clip_config(_config(source, "text_encoder")),
        text_encoder_g=_clip_config(config_g),
        projection_dim=int(config_g.get("projection_dim", config_g["hidden_size"])),
    )


def _path(root: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in root.named_modules() if candidate is module)


def _text_encoder_key_map(encoder: SDXLTextEncoder, source: SDXLSource) -> KeyMap:
    """transformers' CLIP text models (keys prefixed by their component) to the `SDXLTextEncoder`'s."""
    key_map = KeyMap()
    for component, sub_encoder in encoder.components().items():
        prefix = "text_model." if any(k.startswith("text_model.") for k in source.tensors(component)) else ""
        sub_map = transformers_clip_text_key_map(sub_encoder, source_prefix=prefix).with_prefix(
            f"{component}.", f"{_path(encoder, sub_encoder)}."
        )
        key_map.mapping |= sub_map.mapping
        key_map.ignored += sub_map.ignored
        if component == "text_encoder":
            # SDXL conditions on CLIP-L's penultimate hidden state: its last layer and final norm compute nothing used.
            num_layers_l = _config(source, "text_encoder")["num_hidden_layers"]
            unused = (
                f"{component}.{prefix}encoder.layers.{num_layers_l - 1}.",
                f"{component}.{prefix}final_layer_norm.",
            )
            key_map.ignored.append(lambda key, unused=unused: key.startswith(unused))
    return key_map


def _text_encoder(source: SDXLSource, dtype: torch.dtype | None, progress: Progress) -> ConvertedWeights:
    config = sdxl_text_encoder_config(source)
    encoder = config.build(SDXL_TEXT_ENCODER_CLASSES, device="meta")
    assert isinstance(encoder, SDXLTextEncoder)
    tensors: dict[str, Tensor] = {}
    for component in encoder.components():
        files = source.tensors(component)
        tensors |= {f"{component}.{key}": files[key] for key in files}
    key_map = _text_encoder_key_map(encoder, source)
    skipped = [key for key in tensors if key_map.is_ignored(key) and key.startswith("text_encoder.")]
    encoders = "OpenCLIP-G (a refiner)" if isinstance(encoder, RefinerTextEncoder) else "CLIP-L and OpenCLIP-G"
    progress(f"clip-text: {encoders} of {source.describe()} for {config}")
    if skipped:
        progress(
            f"clip-text: left out CLIP-L's last layer and final norm ({len(skipped)} tensors): SDXL reads the penultimate"
        )
    shapes = {key: tensor.shape for key, tensor in encoder.state_dict().items()}
    converted = convert_state_dict(tensors, key_map, shapes, what=f"text encoders of {source.describe()}", dtype=dtype)
    metadata = config.to_metadata()
    if (folder := source.tokenizer_folder()) is not None:
        metadata |= read_tokenizer(folder).to_metadata()
    return ConvertedWeights({k: v.contiguous() for k, v in converted.items()}, metadata)


def _converted(
    source: SDXLSource,
    component: str,
    config: ModelConfig,
    classes: tuple[type[Any], ...],
    key_map_of: Callable[[Any], KeyMap],
    dtype: torch.dtype | None,
    progress: Progress,
    metadata: dict[str, str],
) -> ConvertedWeights:
    """One diffusers component converted for the model `config` builds (on the meta device)."""
    model = config.build(classes, device="meta")
    progress(f"{component}: {source.describe()} for {config}")
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    tensors = convert_state_dict(source.tensors(component), key_map_of(model), shapes, what=component, dtype=dtype)
    return ConvertedWeights({k: v.contiguous() for k, v in tensors.items()}, metadata)


def _autoencoder(source: SDXLSource, dtype: torch.dtype | None, progress: Progress) -> ConvertedWeights:
    base = source.base if isinstance(source, ReplacedComponents) else source
    replacement = source.replacements.get("vae") if isinstance(source, ReplacedComponents) else None
    if isinstance(replacement, DiffusersFolder):
        config = autoencoder_config(replacement)
    elif isinstance(base, SGMCheckpoint):
        # Sized by the config folder, else SDXL's (SD1's architecture, SDXL's scaling factor).
        folder = base.config_folder
        config = autoencoder_config(folder) if folder is not None else ModelConfig.of(SDXLAutoencoder)
    else:
        config = autoencoder_config(base)
    key_map = diffusers_autoencoder_key_map
    return _converted(source, "vae", config, SDXL_AUTOENCODER_CLASSES, key_map, dtype, progress, config.to_metadata())


def _unet(source: SDXLSource, dtype: torch.dtype | None, progress: Progress) -> ConvertedWeights:
    config = sdxl_unet_config(source)
    metadata = unet_metadata(config, int(_config(source, "unet").get("sample_size", 128)))
    return _converted(source, "unet", config, SDXL_UNET_CLASSES, diffusers_unet_key_map, dtype, progress, metadata)


def _open(
    source: str | Path | Source,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    unet: str | Path | None = None,
    vae: str | Path | None = None,
) -> SDXLSource:
    opened = _open_base(source, config, tokenizer)
    replacements: dict[str, DiffusersFolder | SingleFile] = {}
    for component, given in (("unet", unet), ("vae", vae)):
        if given is None:
            continue
        replacement = open_source(given, components=(component,))
        if isinstance(replacement, DiffusersFolder) and not replacement.has_component(component):
            raise SourceError(
                f"--{component} {given} has no {component}: pass a diffusers {component} folder (config.json) or a "
                "model folder"
            )
        replacements[component] = replacement
    return ReplacedComponents(opened, replacements) if replacements else opened


def _open_base(
    source: str | Path | Source, config: str | Path | None = None, tokenizer: str | Path | None = None
) -> DiffusersFolder | SGMCheckpoint:
    opened = open_source(source, components=_COMPONENTS)
    if isinstance(opened, SingleFile):
        folder = open_source(config, components=_COMPONENTS) if config is not None else None
        if folder is not None and not isinstance(folder, DiffusersFolder):
            raise SourceError(f"the config {config} must be a diffusers folder (its configs size the model)")
        return SGMCheckpoint(opened, folder, locate_tokenizer(tokenizer) if tokenizer is not None else None)
    if not opened.has_component("text_encoder_2"):
        raise ConversionError(
            f"{opened.describe()} is not a Stable Diffusion XL model: it has no text_encoder_2/ (OpenCLIP-G). For "
            "Stable Diffusion 1.x, use refiners-convert sd1."
        )
    return opened


def is_refiner(clip_text_file: Path) -> bool:
    """Whether a converted `clip_text.safetensors` holds a refiner's text encoder (OpenCLIP-G alone)."""
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(clip_text_file))
    return config is not None and config.class_name == RefinerTextEncoder.__name__


def convert_stable_diffusion_xl_weights(
    source: str | Path | Source,
    dtype: torch.dtype | None = None,
    *,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    unet: str | Path | None = None,
    vae: str | Path | None = None,
    progress: Progress = _quiet,
) -> dict[str, ConvertedWeights]:
    """Convert an SDXL model in memory: the tensors and metadata `convert_stable_diffusion_xl` writes.

    Args:
        source: A diffusers folder, a Hub id, or an SGM single file.
        dtype: Cast the weights to this dtype (default: keep the source's).
        config: For a single file: the diffusers folder whose configs size the model (default: SDXL base's sizes).
        tokenizer: For a single file: where to read the CLIP tokenizer if `config` has none (a folder or a Hub id).
        unet: The UNet of a distilled model published alone, instead of the source's (see `ReplacedComponents`).
        vae: Another autoencoder of SDXL's architecture (the fp16-fix VAE), instead of the source's.
        progress: Receives a line per step.

    Returns:
        The converted weights by component: `"clip_text"`, `"autoencoder"`, `"unet"`.
    """
    opened = _open(source, config, tokenizer, unet, vae)
    return {
        "clip_text": _text_encoder(opened, dtype, progress),
        "autoencoder": _autoencoder(opened, dtype, progress),
        "unet": _unet(opened, dtype, progress),
    }


def convert_stable_diffusion_xl(
    source: str | Path | Source,
    out_folder: str | Path,
    dtype: torch.dtype | None = None,
    *,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    unet: str | Path | None = None,
    vae: str | Path | None = None,
    progress: Progress = _quiet,
) -> dict[str, Path]:
    """Convert an SDXL model into `CLIP_TEXT_FILE`, `AUTOENCODER_FILE` and `UNET_FILE` in a folder, which
    `StableDiffusion_XL.from_folder` loads.

    Args:
        source: A diffusers folder, a Hub id, or an SGM single file.
        out_folder: The folder to write the three files in (created if needed).
        dtype: Cast the weights to this dtype (default: keep the source's).
        config: For a single file: the diffusers folder whose configs size the model (default: SDXL base's sizes).
        tokenizer: For a single file: where to read the CLIP tokenizer if `config` has none (a folder or a Hub id).
        unet: The UNet of a distilled model published alone, instead of the source's (see `ReplacedComponents`).
        vae: Another autoencoder of SDXL's architecture (the fp16-fix VAE), instead of the source's.
        progress: Receives a line per step.

    Returns:
        The written files by component.
    """
    opened = _open(source, config, tokenizer, unet, vae)
    folder = Path(out_folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SourceError(f"the destination {folder} is a file: pass a folder (created if needed)")
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    # One component in memory at a time.
    for name, file, convert in (
        ("clip_text", CLIP_TEXT_FILE, _text_encoder),
        ("autoencoder", AUTOENCODER_FILE, _autoencoder),
        ("unet", UNET_FILE, _unet),
    ):
        weights = convert(opened, dtype, progress)
        save_to_safetensors(folder / file, dict(weights.tensors), dict(weights.metadata))
        progress(f"{name}: wrote {len(weights.tensors)} tensors to {folder / file}")
        written[name] = folder / file
    return written


def compare_stable_diffusion_xl(
    source: str | Path | Source,
    converted: str | Path,
    *,
    config: str | Path | None = None,
    unet: str | Path | None = None,
    vae: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Comparison]:
    """Compare each converted component with diffusers' and transformers' (the `reference` extra) on random inputs.

    The reference pipeline is diffusers' `StableDiffusionXLPipeline` read from the source (`from_pretrained`, or
    `from_single_file` with the `config` folder); ours is `StableDiffusion_XL.from_folder(converted)`.

    Args:
        source: What was converted: a diffusers folder, a Hub id, or an SGM single file.
        converted: The folder `convert_stable_diffusion_xl` wrote.
        config: For a single file: the diffusers folder it was converted with (default: SDXL base's sizes).
        unet: The UNet it was converted with instead of the source's (`--unet`).
        vae: The autoencoder it was converted with instead of the source's (`--vae`).
        seed: Seed of the random inputs.

    Returns:
        `"clip_text"` (the concatenated hidden states and the pooled embedding of random token ids),
        `"autoencoder"` (the reconstruction of a random 64x64 image, posterior mean) and `"unet"` (the noise prediction
        of random 8x8 latents with random conditioning, timestep 500).
    """
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
        StableDiffusionXLImg2ImgPipeline,
    )

    from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
        StableDiffusion_XL,
        StableDiffusion_XL_Inpainting,
        StableDiffusion_XL_Refiner,
    )

    opened = _open(source, config, unet=unet, vae=vae)
    base = opened.base if isinstance(opened, ReplacedComponents) else opened
    refiner = not opened.has_component("text_encoder")
    reference_class: Any = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    if isinstance(base, SGMCheckpoint):
        reference: Any = reference_class.from_single_file(
            str(base.file.path), config=str(base.config_folder.root) if base.config_folder else None
        )
    else:
        reference = reference_class.from_pretrained(base.root)
    if isinstance(opened, ReplacedComponents):
        for component in opened.replacements:
            model_class: Any = UNet2DConditionModel if component == "unet" else AutoencoderKL
            replaced: Any = model_class.from_config(opened.config(component))
            replaced.load_state_dict(dict(opened.tensors(component)))
            setattr(reference, component, replaced)
    reference = reference.to(torch.float32)
    in_channels = reference.unet.config.in_channels
    pipeline = (
        StableDiffusion_XL_Refiner
        if refiner
        else StableDiffusion_XL_Inpainting
        if in_channels == 9
        else StableDiffusion_XL
    )
    ours = pipeline.from_folder(converted, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    encoder = ours.clip_text_encoder
    vocabulary_size = encoder.text_encoder_g.vocabulary_size
    ids = torch.randint(0, vocabulary_size, (1, 77), generator=generator)
    ids[0, -1] = vocabulary_size - 1  # an end token, for the pooling to find
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    latents = torch.randn(1, in_channels, 8, 8, generator=generator)
    text = torch.randn(1, 77, ours.unet.context_embedding_dim, generator=generator)
    pooled = torch.randn(1, ours.unet.pooled_embedding_dim, generator=generator)
    time_ids = torch.tensor(
        [[1024.0, 1024.0, 0.0, 0.0, 6.0] if refiner else [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]
    )
    with torch.no_grad():
        output_g = reference.text_encoder_2(ids, output_hidden_states=True)
        hidden = [] if refiner else [reference.text_encoder(ids, output_hidden_states=True).hidden_states[-2]]
        expected_text = torch.cat([*hidden, output_g.hidden_states[-2]], dim=-1)
        actual_text, actual_pooled = encoder(ids)  # the tokenizers pass token ids through
        expected_image = reference.vae(image, sample_posterior=False).sample
        conditions = {"text_embeds": pooled, "time_ids": time_ids}
        guidance = None  # LCM's guidance embedding, at guidance scale 8
        if (guidance_dim := ours.unet.guidance_embedding_dim) is not None:
            guidance = compute_guidance_scale_embedding(torch.tensor([8.0]), guidance_dim)
            ours.unet.set_guidance_scale(8.0)
        expected_noise = reference.unet(
            latents, 500, encoder_hidden_states=text, timestep_cond=guidance, added_cond_kwargs=conditions
        ).sample
        ours.set_unet_context(
            timestep=torch.tensor([500]), clip_text_embedding=text, pooled_text_embedding=pooled, time_ids=time_ids
        )
        actual_noise = ours.unet(latents)
        actual_image = ours.lda(image)
    text_comparison = compare_outputs(expected_text, actual_text)
    pooled_comparison = compare_outputs(output_g.text_embeds, actual_pooled)
    worse = max(text_comparison, pooled_comparison, key=lambda comparison: comparison.relative)
    return {
        "clip_text": worse,
        "autoencoder": compare_outputs(expected_image, actual_image),
        "unet": compare_outputs(expected_noise, actual_noise),
    }
