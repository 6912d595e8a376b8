"""Stable Diffusion 1.x checkpoints to refiners weights: the conversions behind `refiners-convert` and the loaders.

Each function reads one source (see `refiners.converters.sources`: a diffusers folder or component folder, a
single-file original checkpoint, one component's weights file, or a Hugging Face Hub id), checks that it is a
Stable Diffusion 1.x model, converts it in memory and writes it atomically to a `.safetensors` file:

- `convert_clip_text` -> `CLIP_TEXT_FILE` (`clip_text.safetensors`): `CLIPTextEncoderL` weights, the tokenizer's
  vocabulary and merges in the file's metadata (`CLIPTokenizer.to_metadata`), so that
  `CLIPTextEncoderL().load_from_safetensors(path)` encodes text;
- `convert_autoencoder` -> `AUTOENCODER_FILE` (`autoencoder.safetensors`): `SD1Autoencoder` weights;
- `convert_unet` -> `UNET_FILE` (`unet.safetensors`): `SD1UNet` weights, for `SD1UNet(in_channels=4)` or, from an
  inpainting model, `SD1UNet(in_channels=9)` (the shape of the first convolution tells which);
- `convert_stable_diffusion_1` writes the three into a folder, which `StableDiffusion_1.from_folder` loads;
  `convert_stable_diffusion_1_weights` gives the same tensors and metadata in memory (`refiners.converters.loading`
  builds the model from them).

The target models are sized from the source's configs (`refiners.converters.architecture`): Stable Diffusion 1.5,
or a model of the same architecture at other sizes (a diffusers folder's `config.json` says which; the result's
`target` and the progress lines say how to build it, e.g. `SD1UNet(in_channels=4, channels=(32, 32, 64, 64), ...)`).
They are built on the "meta" device: only their shapes are read, nothing is allocated. Each file records the
constructor call of its model (`refiners.fluxion.model_config`), and the UNet's its native sample size, so that
loading needs no sizes written by hand.
"""

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from refiners.converters.architecture import (
    autoencoder_config,
    clip_text_config,
    describe,
    unet_config,
    unet_sample_size,
)
from refiners.converters.autoencoder import diffusers_autoencoder_key_map
from refiners.converters.clip_text import TRANSFORMERS_CLIP_TEXT_PREFIX, transformers_clip_text_key_map
from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.converters.single_file import (
    LDM_PREFIXES,
    ModuleRenaming,
    is_ldm_checkpoint,
    ldm_autoencoder_renaming,
    ldm_clip_text_renaming,
    ldm_component_prefix,
    ldm_ema_keys,
    ldm_unet_renaming,
    ldm_unknown_keys,
    original_key_map,
)
from refiners.converters.sources import (
    DiffusersFolder,
    SingleFile,
    Source,
    SourceError,
    TensorFile,
    locate_tokenizer,
    open_source,
    read_tokenizer,
)
from refiners.converters.unet import diffusers_unet_key_map
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, CLIPTextEncoderL
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.weights import (
    AUTOENCODER_FILE,
    CLIP_TEXT_FILE,
    UNET_FILE,
    ConvertedWeights,
    unet_metadata,
)

__all__ = [
    "CLIP_TEXT_FILE",
    "AUTOENCODER_FILE",
    "UNET_FILE",
    "UNET_IN_CHANNELS",
    "Progress",
    "ConversionResult",
    "convert_clip_text",
    "convert_autoencoder",
    "convert_unet",
    "convert_stable_diffusion_1",
    "convert_stable_diffusion_1_weights",
    "check_stable_diffusion_1",
]

UNET_IN_CHANNELS = {4: "text-to-image", 9: "inpainting"}
"""The UNets of Stable Diffusion 1.x by input channels: latents; latents, mask and masked-image latents."""

Progress = Callable[[str], None]
"""Receives one line per step of a conversion (e.g. to print it)."""

_NAMES = {"text_encoder": "CLIP text encoder", "vae": "autoencoder", "unet": "UNet"}
# One key per component that only this component's diffusers/transformers weights have.
_MARKERS = {
    "unet": "time_embedding.linear_1.weight",
    "vae": "encoder.conv_in.weight",
    "text_encoder": "embeddings.token_embedding.weight",
}


def _quiet(line: str) -> None:
    pass


@dataclass(frozen=True)
class ConversionResult:
    """A written conversion.

    Attributes:
        path: The `.safetensors` file.
        target: The refiners model the weights are for (e.g. `SD1UNet(in_channels=9)`).
        source_dtype: The dtype of the source's weights.
        dtype: The dtype of the written weights.
    """

    path: Path
    target: str
    source_dtype: torch.dtype
    dtype: torch.dtype


class _Prefixed(Mapping[str, Tensor]):
    """The keys of a checkpoint that start with a prefix (one component of a single-file checkpoint), unchanged."""

    def __init__(self, tensors: TensorFile, prefix: str) -> None:
        self._tensors = tensors
        self._keys = dict.fromkeys(key for key in tensors if key.startswith(prefix))

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors.shape(key)


@dataclass(frozen=True)
class _Component:
    name: str
    tensors: TensorFile | _Prefixed
    origin: str
    original_prefix: str | None  # None: diffusers/transformers layout; else the original layout, keys under it


def _width(tensors: TensorFile | _Prefixed, keys: tuple[str, ...], dim: int) -> int | None:
    """Dimension `dim` of the first of `keys` that `tensors` has (read from the header, not the data)."""
    key = next((key for key in keys if key in tensors), None)
    shape = tensors.shape(key) if key is not None else None
    return shape[dim] if shape is not None and len(shape) > dim else None


# Widths that tell another known model. A folder's configs may give other sizes (an SD1 model at toy or distilled
# sizes: see refiners.converters.architecture); a file has no config, so its shapes must be SD1.5's.
def _cross_attention_reason(width: int | None, sized_by_config: bool = False) -> str | None:
    if width is None or width == 768:
        return None
    known = {
        1024: "Stable Diffusion 2.x: its UNet attends to 1024-wide text embeddings (OpenCLIP ViT-H)",
        2048: "Stable Diffusion XL: its UNet attends to 2048-wide text embeddings (two text encoders)",
    }
    if sized_by_config:
        return known.get(width)
    return known.get(width, f"another model: its UNet attends to {width}-wide text embeddings (SD1: 768)")


def _text_width_reason(width: int | None, sized_by_config: bool = False) -> str | None:
    if width is None or width == 768:
        return None
    known = {
        1024: "Stable Diffusion 2.x: its text encoder is 1024 wide (OpenCLIP ViT-H)",
        1280: "Stable Diffusion XL's second text encoder: 1280 wide (OpenCLIP ViT-bigG)",
    }
    if sized_by_config:
        return known.get(width)
    return known.get(width, f"another model: its text encoder is {width} wide (SD1's CLIP ViT-L: 768)")


def _in_channels_reason(in_channels: int | None) -> str | None:
    if in_channels is None or in_channels in UNET_IN_CHANNELS:
        return None
    if in_channels == 8:
        return "InstructPix2Pix: its UNet takes 8 input channels (latents and image latents)"
    return f"another model: its UNet takes {in_channels} input channels (SD1: 4, or 9 for inpainting)"


def _folder_reason(source: DiffusersFolder) -> str | None:
    index = source.model_index or {}
    if "text_encoder_2" in index or "XL" in (source.pipeline_class or ""):
        return f"Stable Diffusion XL: {source.pipeline_class or 'its model_index.json'} has a second text encoder"
    reasons: list[str | None] = []
    context_width = text_width = None
    if source.has_component("unet"):
        config = source.config("unet")
        if config.get("addition_embed_type") is not None:
            reasons.append("Stable Diffusion XL: its UNet takes added embeddings (text_time)")
        width = config.get("cross_attention_dim")
        context_width = width if isinstance(width, int) else None
        reasons.append(_cross_attention_reason(context_width, sized_by_config=True))
        in_channels = config.get("in_channels")
        reasons.append(_in_channels_reason(in_channels if isinstance(in_channels, int) else None))
    if source.has_component("text_encoder"):
        width = source.config("text_encoder").get("hidden_size")
        text_width = width if isinstance(width, int) else None
        reasons.append(_text_width_reason(text_width, sized_by_config=True))
    if None not in (context_width, text_width) and context_width != text_width:
        reasons.append(
            f"another model: its UNet attends to {context_width}-wide text embeddings but its text encoder is "
            f"{text_width} wide"
        )
    return next((reason for reason in reasons if reason is not None), None)


def _file_reason(tensors: TensorFile) -> str | None:
    unet, clip = LDM_PREFIXES["unet"], LDM_PREFIXES["text_encoder"]
    if any(key.startswith("conditioner.embedders.1.") for key in tensors):
        return "Stable Diffusion XL: it has a second text encoder (conditioner.embedders.1.*)"
    if f"{unet}label_emb.0.0.weight" in tensors or "add_embedding.linear_1.weight" in tensors:
        return "Stable Diffusion XL: its UNet takes added embeddings (label_emb / add_embedding)"
    if any(key.startswith("cond_stage_model.model.") for key in tensors):
        return "Stable Diffusion 2.x: its text encoder is OpenCLIP's (cond_stage_model.model.*)"
    attention = "transformer_blocks.0.attn2.to_k.weight"
    keys = (f"{unet}input_blocks.1.1.{attention}", f"down_blocks.0.attentions.0.{attention}")
    token_embedding = "embeddings.token_embedding.weight"
    text_keys = (f"{clip}text_model.{token_embedding}", f"{clip}{token_embedding}", f"text_model.{token_embedding}")
    conv_in = (f"{unet}input_blocks.0.0.weight", "conv_in.weight")
    reasons = (
        _cross_attention_reason(_width(tensors, keys, 1)),
        _text_width_reason(_width(tensors, (*text_keys, token_embedding), 1)),
        _in_channels_reason(_width(tensors, conv_in, 1)),
    )
    return next((reason for reason in reasons if reason is not None), None)


def check_stable_diffusion_1(source: Source) -> None:
    """Check that `source` is a Stable Diffusion 1.x model (text-to-image or inpainting), from configs and shapes.

    Only what the source has is looked at (a component's folder or file tells less than a whole model).

    Raises:
        ConversionError: The source looks like another architecture (SDXL, SD2, InstructPix2Pix, ...); the message
            says which, and why.
    """
    reason = _folder_reason(source) if isinstance(source, DiffusersFolder) else _file_reason(source.tensors)
    if reason is not None:
        raise ConversionError(
            f"{source.describe()} is not a Stable Diffusion 1.x model: it looks like {reason}. refiners-convert's "
            "sd1, unet, autoencoder and clip-text commands convert Stable Diffusion 1.x models (text-to-image and "
            "inpainting) only."
        )


def _component(source: Source, component: str) -> _Component:
    if isinstance(source, DiffusersFolder):
        tensors = source.tensors(component)
        return _Component(component, tensors, tensors.describe(), None)
    tensors = source.tensors
    if is_ldm_checkpoint(tensors):
        if unknown := ldm_unknown_keys(tensors):
            shown = ", ".join(unknown[:20]) + (f", ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            raise ConversionError(
                f"{source.path} has {len(unknown)} keys that belong to no Stable Diffusion 1.x component (UNet "
                f"{LDM_PREFIXES['unet']}*, autoencoder {LDM_PREFIXES['vae']}*, text encoder "
                f"{LDM_PREFIXES['text_encoder']}*): {shown}. It may be another model, or carry extra weights "
                "(e.g. a LoRA or embeddings) that refiners loads separately."
            )
        prefix = ldm_component_prefix(tensors, component)
        if prefix is None:
            found = sorted({key.split(".")[0] + ".*" for key in tensors})
            raise SourceError(
                f"{source.path} has no {_NAMES[component]}: no key starts with {LDM_PREFIXES[component]} (it has "
                f"{', '.join(found)}). Convert the components this file has, or use a complete checkpoint."
            )
        return _Component(component, _Prefixed(tensors, prefix), f"{source.path} ({prefix}*)", prefix)
    if component == "vae" and ldm_component_prefix(tensors, "vae") == "":
        return _Component(component, tensors, str(source.path), "")
    holds = [name for name, marker in _MARKERS.items() if any(key.endswith(marker) for key in tensors)]
    if component not in holds:
        looks_like = f"the weights of a diffusers {_NAMES[holds[0]]}" if holds else "no Stable Diffusion component"
        raise SourceError(
            f"{source.path} is not the {_NAMES[component]} of a Stable Diffusion 1.x model: it holds {looks_like} "
            f"(no key ends with {_MARKERS[component]}, nor is it an original-layout checkpoint)."
        )
    return _Component(component, tensors, str(source.path), None)


def _destination(dest: str | Path, default_name: str) -> Path:
    path = Path(dest).expanduser()
    if path.is_dir():
        return path / default_name
    if path.suffix != ".safetensors":
        raise SourceError(f"the destination must be a .safetensors file (or an existing folder), got {dest}")
    return path


@dataclass(frozen=True)
class _Conversion:
    """A component converted in memory, not yet written."""

    weights: ConvertedWeights
    label: str
    target: str
    source_dtype: torch.dtype
    dtype: torch.dtype
    start: float


def _convert(
    component: _Component,
    model: SD1UNet | LatentDiffusionAutoencoder | CLIPTextEncoder,
    key_map: KeyMap,
    renaming: ModuleRenaming,
    dtype: torch.dtype | None,
    progress: Progress,
    label: str,
    metadata: dict[str, str],
) -> _Conversion:
    if component.original_prefix is not None:
        key_map = original_key_map(key_map, renaming, component.original_prefix)
    if component.original_prefix is not None:
        layout = "original"
    else:
        layout = "transformers" if component.name == "text_encoder" else "diffusers"
    target = describe(model)
    progress(f"{label}: reading {component.origin}, {layout} layout, for {target}")
    start = time.monotonic()
    # The first floating-point tensor tells the source's dtype (an integer buffer may come first).
    floats = (
        tensor.dtype for tensor in map(component.tensors.__getitem__, component.tensors) if tensor.is_floating_point()
    )
    source_dtype = next(floats, torch.float32)
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    tensors = convert_state_dict(
        component.tensors, key_map, shapes, what=f"{_NAMES[component.name]} of {component.origin}", dtype=dtype
    )
    weights = ConvertedWeights({key: tensor.contiguous() for key, tensor in tensors.items()}, metadata)
    return _Conversion(weights, label, target, source_dtype, dtype or source_dtype, start)


def _write(conversion: _Conversion, dest: Path, progress: Progress) -> ConversionResult:
    tensors = conversion.weights.tensors
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_to_safetensors(dest, tensors, conversion.weights.metadata)
    size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values()) / 1e9
    progress(
        f"{conversion.label}: wrote {len(tensors)} tensors ({size:.2f} GB, "
        f"{str(conversion.dtype).removeprefix('torch.')}) to {dest} in {time.monotonic() - conversion.start:.1f} s"
    )
    return ConversionResult(
        path=dest, target=conversion.target, source_dtype=conversion.source_dtype, dtype=conversion.dtype
    )


def _clip_text(
    source: Source, dtype: torch.dtype | None, tokenizer: str | Path | None, progress: Progress
) -> _Conversion:
    component = _component(source, "text_encoder")
    config = clip_text_config(source)
    encoder = config.build((CLIPTextEncoder, CLIPTextEncoderL), device="meta")
    metadata = config.to_metadata()
    folder = locate_tokenizer(tokenizer) if tokenizer is not None else None
    if folder is None and isinstance(source, DiffusersFolder):
        folder = source.tokenizer_folder()
    if folder is not None:
        clip_tokenizer = read_tokenizer(folder)
        metadata |= clip_tokenizer.to_metadata()
        if clip_tokenizer.vocabulary_size > encoder.vocabulary_size:
            raise SourceError(
                f"the tokenizer in {folder} has token ids up to {clip_tokenizer.vocabulary_size - 1} but the text "
                f"encoder embeds {encoder.vocabulary_size} tokens: it is not this model's tokenizer."
            )
        progress(f"clip-text: tokenizer from {folder} (stored in the file's metadata)")
    else:
        progress(
            "clip-text: note: the source has no tokenizer, so the file will have none and the encoder will take "
            "token ids, not text. Pass --tokenizer (a folder with vocab.json and merges.txt, or a Hub id such as "
            "openai/clip-vit-large-patch14) to include it."
        )
    if component.original_prefix is None:
        has_prefix = any(key.startswith(TRANSFORMERS_CLIP_TEXT_PREFIX) for key in component.tensors)
        key_map = transformers_clip_text_key_map(encoder, TRANSFORMERS_CLIP_TEXT_PREFIX if has_prefix else "")
        renaming = ldm_clip_text_renaming()
    else:
        key_map = transformers_clip_text_key_map(encoder)
        prefix = component.original_prefix + "text_model."
        renaming = ldm_clip_text_renaming(with_text_model=any(key.startswith(prefix) for key in component.tensors))
    return _convert(component, encoder, key_map, renaming, dtype, progress, "clip-text", metadata)


def _autoencoder(source: Source, dtype: torch.dtype | None, progress: Progress) -> _Conversion:
    component = _component(source, "vae")
    config = autoencoder_config(source)
    autoencoder = config.build((LatentDiffusionAutoencoder, SD1Autoencoder), device="meta")
    key_map = diffusers_autoencoder_key_map(autoencoder)
    renaming = ldm_autoencoder_renaming()
    return _convert(component, autoencoder, key_map, renaming, dtype, progress, "autoencoder", config.to_metadata())


def _unet(source: Source, dtype: torch.dtype | None, progress: Progress) -> _Conversion:
    component = _component(source, "unet")
    conv_in = f"{component.original_prefix}input_blocks.0.0.weight" if component.original_prefix else "conv_in.weight"
    shape = component.tensors.shape(conv_in) if conv_in in component.tensors else ()
    if len(shape) != 4:
        raise ConversionError(f"the UNet of {component.origin} has no 4-D {conv_in}: it is not an SD1.x UNet")
    in_channels = shape[1]
    if (reason := _in_channels_reason(in_channels)) is not None:
        raise ConversionError(
            f"the UNet of {component.origin} is not a Stable Diffusion 1.x UNet: it looks like {reason}"
        )
    progress(f"unet: {UNET_IN_CHANNELS[in_channels]} UNet ({in_channels} input channels)")
    if isinstance(source, SingleFile) and (ema := ldm_ema_keys(source.tensors)):
        progress(
            f"unet: note: the checkpoint also has an EMA copy of the UNet ({len(ema)} model_ema.* tensors); as "
            "diffusers does by default, the main weights (model.diffusion_model.*) are converted"
        )
    config = unet_config(source, in_channels)
    try:
        unet = config.build((SD1UNet,), device="meta")
    except ValueError as error:
        raise ConversionError(f"the UNet of {source.describe()} cannot be built: {error}") from error
    metadata = unet_metadata(config, unet_sample_size(source))
    key_map = diffusers_unet_key_map(unet)
    return _convert(component, unet, key_map, ldm_unet_renaming(), dtype, progress, "unet", metadata)


def convert_clip_text(
    source: str | Path | Source,
    dest: str | Path,
    dtype: torch.dtype | None = None,
    *,
    tokenizer: str | Path | None = None,
    progress: Progress = _quiet,
) -> ConversionResult:
    """Convert the text encoder of a Stable Diffusion 1.x model into `CLIPTextEncoderL` weights (sized from the
    source's config).

    The tokenizer's vocabulary and merges go into the file's metadata: from `tokenizer` if given, else from the
    source's `tokenizer/` folder. Single-file checkpoints have no tokenizer: without `tokenizer`, the weights are
    written alone (the encoder then takes token ids), and `progress` says so.

    Args:
        source: A diffusers folder, a text encoder folder or weights file, an original checkpoint, or a Hub id.
        dest: The `.safetensors` file to write (or a folder, to write `CLIP_TEXT_FILE` in it).
        dtype: Cast the weights to this dtype (default: keep the source's).
        tokenizer: Where to read the tokenizer (`vocab.json`, `merges.txt`): a folder or a Hub id such as
            `openai/clip-vit-large-patch14`.
        progress: Receives a line per step.

    Raises:
        SourceError: The source (or tokenizer) cannot be found or read.
        ConversionError: The source is not an SD1.x text encoder; the message says what it looks like, or lists
            the keys and shapes that do not fit.
    """
    source = open_source(source, components=("text_encoder", "tokenizer"))
    check_stable_diffusion_1(source)
    dest = _destination(dest, CLIP_TEXT_FILE)
    return _write(_clip_text(source, dtype, tokenizer, progress), dest, progress)


def convert_autoencoder(
    source: str | Path | Source, dest: str | Path, dtype: torch.dtype | None = None, *, progress: Progress = _quiet
) -> ConversionResult:
    """Convert the autoencoder of a Stable Diffusion 1.x model into `SD1Autoencoder` weights (sized from the
    source's config).

    Args:
        source: A diffusers folder, a `vae` folder or weights file, an original checkpoint (whole, or a standalone
            autoencoder such as `vae-ft-mse-840000-ema-pruned`), or a Hub id.
        dest: The `.safetensors` file to write (or a folder, to write `AUTOENCODER_FILE` in it).
        dtype: Cast the weights to this dtype (default: keep the source's).
        progress: Receives a line per step.

    Raises:
        SourceError: The source cannot be found or read.
        ConversionError: The source is not an SD1.x autoencoder; the message lists the keys and shapes.
    """
    source = open_source(source, components=("vae",))
    check_stable_diffusion_1(source)
    dest = _destination(dest, AUTOENCODER_FILE)
    return _write(_autoencoder(source, dtype, progress), dest, progress)


def convert_unet(
    source: str | Path | Source, dest: str | Path, dtype: torch.dtype | None = None, *, progress: Progress = _quiet
) -> ConversionResult:
    """Convert the UNet of a Stable Diffusion 1.x model into `SD1UNet` weights (sized from the source's config).

    An inpainting UNet (9 input channels) is converted for `SD1UNet(in_channels=9)`, and `progress` says so. The
    file also records the UNet's native sample size (diffusers' `sample_size`; SD1.5's 64 for single files).

    Args:
        source: A diffusers folder, a `unet` folder or weights file, an original checkpoint, or a Hub id.
        dest: The `.safetensors` file to write (or a folder, to write `UNET_FILE` in it).
        dtype: Cast the weights to this dtype (default: keep the source's).
        progress: Receives a line per step.

    Raises:
        SourceError: The source cannot be found or read.
        ConversionError: The source is not an SD1.x UNet; the message says what it looks like, or lists the keys and
            shapes that do not fit.
    """
    source = open_source(source, components=("unet",))
    check_stable_diffusion_1(source)
    dest = _destination(dest, UNET_FILE)
    return _write(_unet(source, dtype, progress), dest, progress)


def _open_whole_model(source: str | Path | Source) -> Source:
    """The source of a whole SD1.x model, checked: its three components are there, in one folder or file."""
    opened = open_source(source, components=("unet", "vae", "text_encoder", "tokenizer"))
    check_stable_diffusion_1(opened)
    if isinstance(opened, SingleFile) and not is_ldm_checkpoint(opened.tensors):
        raise SourceError(
            f"{opened.path} holds one component's weights in diffusers layout, not a whole model: convert it with the "
            "unet, autoencoder or clip-text command, or pass the model's folder or original checkpoint."
        )
    for component in ("unet", "vae", "text_encoder"):
        _component(opened, component)  # fail on a missing component before converting the others
    return opened


def convert_stable_diffusion_1(
    source: str | Path | Source,
    out_folder: str | Path,
    dtype: torch.dtype | None = None,
    *,
    tokenizer: str | Path | None = None,
    progress: Progress = _quiet,
) -> dict[str, ConversionResult]:
    """Convert a whole Stable Diffusion 1.x model: `CLIP_TEXT_FILE`, `AUTOENCODER_FILE` and `UNET_FILE` in a folder.

    `StableDiffusion_1.from_folder(out_folder)` (or `StableDiffusion_1_Inpainting`'s) loads it at its sizes.

    Args:
        source: A diffusers folder, an original single-file checkpoint, or a Hub id.
        out_folder: The folder to write the three files in (created if needed).
        dtype: Cast the weights to this dtype (default: keep the source's).
        tokenizer: Where to read the tokenizer if the source has none (see `convert_clip_text`).
        progress: Receives a line per step.

    Returns:
        The results by component: `"clip_text"`, `"autoencoder"`, `"unet"`.

    Raises:
        SourceError: The source cannot be found or read, or lacks a component.
        ConversionError: The source is not an SD1.x model, or a component does not fit.
    """
    opened = _open_whole_model(source)
    folder = Path(out_folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SourceError(f"the destination {folder} is a file: pass a folder (created if needed)")
    folder.mkdir(parents=True, exist_ok=True)
    # One component in memory at a time.
    return {
        "clip_text": _write(_clip_text(opened, dtype, tokenizer, progress), folder / CLIP_TEXT_FILE, progress),
        "autoencoder": _write(_autoencoder(opened, dtype, progress), folder / AUTOENCODER_FILE, progress),
        "unet": _write(_unet(opened, dtype, progress), folder / UNET_FILE, progress),
    }


def convert_stable_diffusion_1_weights(
    source: str | Path | Source,
    dtype: torch.dtype | None = None,
    *,
    tokenizer: str | Path | None = None,
    progress: Progress = _quiet,
) -> dict[str, ConvertedWeights]:
    """Convert a whole Stable Diffusion 1.x model in memory: the tensors and metadata `convert_stable_diffusion_1`
    would write, without writing them (`StableDiffusion_1.from_converted` builds the model from them).

    Args:
        source: A diffusers folder, an original single-file checkpoint, or a Hub id.
        dtype: Cast the weights to this dtype (default: keep the source's).
        tokenizer: Where to read the tokenizer if the source has none (see `convert_clip_text`).
        progress: Receives a line per step.

    Returns:
        The converted weights by component: `"clip_text"`, `"autoencoder"`, `"unet"`.

    Raises:
        SourceError: The source cannot be found or read, or lacks a component.
        ConversionError: The source is not an SD1.x model, or a component does not fit.
    """
    opened = _open_whole_model(source)
    return {
        "clip_text": _clip_text(opened, dtype, tokenizer, progress).weights,
        "autoencoder": _autoencoder(opened, dtype, progress).weights,
        "unet": _unet(opened, dtype, progress).weights,
    }
