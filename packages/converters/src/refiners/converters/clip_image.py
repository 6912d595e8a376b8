"""transformers' `CLIPVisionModelWithProjection` to `CLIPImageEncoder` weights: what `refiners-convert clip-image` runs.

A source is a transformers folder (`config.json` and `model.safetensors`, sharded or not, or `pytorch_model.bin`), its
weights file alone, or a Hub id, optionally with a subfolder (`h94/IP-Adapter/models/image_encoder`: only the config
and weights are downloaded). The sizes come from the config; a file without one must have the sizes of a preset
(`CLIPImageEncoderH`, `CLIPImageEncoderG`), found by its tensors' shapes. The key map is derived from the encoder's
structure (`transformers_clip_image_key_map`), so it holds for every width and depth. `position_ids` (a buffer some
versions saved) is ignored on purpose; any other key nothing uses is an error that lists the keys on one line. The
file is written atomically, with the encoder's constructor call in its metadata: `CLIPImageEncoder.from_safetensors`
builds and loads it.
"""

import argparse
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.converters.sources import SourceError, TensorFile, read_json, transformers_weight_files
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.clip.common import FeedForward, TransformerLayer
from refiners.foundationals.clip.image_encoder import (
    CLIP_IMAGE_ENCODER_CLASSES,
    ClassToken,
    CLIPImageEncoder,
    CLIPImageEncoderG,
    CLIPImageEncoderH,
    PatchEncoder,
    ViTEmbeddings,
)

__all__ = [
    "CLIPImageSource",
    "open_clip_image_source",
    "clip_image_config",
    "transformers_clip_image_key_map",
    "convert_clip_image_weights",
    "convert_clip_image",
    "add_clip_image_command",
    "run_clip_image_command",
]

_PREFIX = "vision_model."
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_ACTIVATIONS = {"gelu": "none", "quick_gelu": "quick"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CLIPImageSource:
    """A transformers CLIP vision checkpoint, opened: its tensors (read lazily), its config if any, where it is."""

    tensors: TensorFile
    config: Mapping[str, Any] | None
    origin: str


def _folder_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(
            f"{folder} has no config.json: pass a CLIPVisionModelWithProjection folder, a file or a Hub id"
        )
    config = read_json(path)
    architectures: Any = config.get("architectures") or []
    if "CLIPVisionModelWithProjection" not in architectures:
        raise SourceError(
            f"{folder} holds a {' / '.join(map(str, architectures)) or 'model of unknown architecture'}, not a "
            "CLIPVisionModelWithProjection: pass the folder of a CLIP image encoder (an IP-Adapter's image_encoder/)"
        )
    return config


def _download(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    parts = hub_id.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])  # `org/name`, then a folder in the repository
    prefix = f"{subfolder}/" if subfolder else ""
    names = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    try:
        folder = Path(str(snapshot_download(repo_id, allow_patterns=[prefix + name for name in names]))) / subfolder
        if not any((folder / name).is_file() for name in names[1:3]):
            patterns = [prefix + name for name in ("config.json", "pytorch_model.bin")]
            folder = Path(str(snapshot_download(repo_id, allow_patterns=patterns))) / subfolder
    except (OSError, ValueError) as error:  # huggingface_hub's HTTP, offline and validation errors
        raise SourceError(
            f"{hub_id} is not a local file or folder, and downloading it from the Hugging Face Hub failed: {error}"
        ) from error
    return folder


def open_clip_image_source(source: str | Path) -> CLIPImageSource:
    """Open a CLIP vision checkpoint: a transformers folder, a weights file, or a Hub id (with a subfolder).

    Raises:
        SourceError: It cannot be found or read, or it is not a CLIP vision model.
    """
    path = Path(source).expanduser()
    config: dict[str, Any] | None = None
    if path.is_dir():
        config, files = _folder_config(path), transformers_weight_files(path)
    elif path.is_file():
        if path.suffix not in _FILE_SUFFIXES:
            raise SourceError(f"{path} is not a checkpoint file: expected one of {', '.join(_FILE_SUFFIXES)}")
        files = [path]
        if (path.parent / "config.json").is_file() and path.name in ("model.safetensors", "pytorch_model.bin"):
            config = _folder_config(path.parent)
    elif not path.exists() and _HUB_ID.fullmatch(str(source)):
        path = _download(str(source))
        config, files = _folder_config(path), transformers_weight_files(path)
    else:
        raise SourceError(f"no such file or folder: {source} (nor a Hugging Face Hub id, `org/name[/subfolder]`)")
    tensors = TensorFile(files)
    origin = tensors.describe()
    if any(key.startswith("ViTEmbeddings.") for key in tensors):
        raise SourceError(
            f"{origin} already holds refiners weights (written by refiners-convert clip-image): load it with "
            f"CLIPImageEncoder.from_safetensors({origin!r}) instead of converting it again"
        )
    if f"{_PREFIX}embeddings.class_embedding" not in tensors:
        shown = ", ".join(sorted(tensors)[:5])
        raise SourceError(
            f"{origin} is not a transformers CLIP vision model: it has no {_PREFIX}embeddings.class_embedding (its "
            f"keys start with {shown})"
        )
    return CLIPImageSource(tensors, config, origin)


def clip_image_config(source: CLIPImageSource) -> ModelConfig:
    """The constructor call of the encoder `source` fits: a preset's class, or `CLIPImageEncoder` with its arguments.

    Raises:
        ConversionError: The config asks for what a `CLIPImageEncoder` cannot do, or a file without config does not
            have a preset's sizes.
    """
    tensors = source.tensors
    if source.config is None:
        width = tensors.shape(f"{_PREFIX}embeddings.class_embedding")[0]
        layers = len({key.split(".")[3] for key in tensors if key.startswith(f"{_PREFIX}encoder.layers.")})
        for preset in (CLIPImageEncoderH, CLIPImageEncoderG):
            model = preset(device="meta")
            if (model.embedding_dim, model.num_layers) == (width, layers):
                return ModelConfig.of(preset)
        raise ConversionError(
            f"{source.origin} has no config.json and its sizes ({width} wide, {layers} layers) are not those of "
            "CLIPImageEncoderH (1280, 32) or CLIPImageEncoderG (1664, 48): pass its transformers folder instead"
        )
    config = source.config
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in _ACTIVATIONS:
        raise ConversionError(
            f"{source.origin}'s config has hidden_act={activation!r}: expected one of {list(_ACTIVATIONS)}"
        )
    if config.get("num_channels", 3) != 3:
        raise ConversionError(f"{source.origin}'s config has num_channels={config['num_channels']}: CLIP takes RGB")
    arguments: dict[str, Any] = {
        "image_size": config.get("image_size", 224),
        "embedding_dim": config.get("hidden_size", 768),
        "output_dim": config.get("projection_dim", 512),
        "patch_size": config.get("patch_size", 32),
        "num_layers": config.get("num_hidden_layers", 12),
        "num_attention_heads": config.get("num_attention_heads", 12),
        "feedforward_dim": config.get("intermediate_size", 3072),
        "layer_norm_eps": config.get("layer_norm_eps", 1e-5),
        "gelu_approximation": _ACTIVATIONS[activation],
    }
    for preset in (CLIPImageEncoderH, CLIPImageEncoderG):
        model = preset(device="meta")
        if all(getattr(model, name) == value for name, value in arguments.items()):
            return ModelConfig.of(preset)
    return ModelConfig.of(CLIPImageEncoder, **arguments)


def _path(root: fl.Chain, module: fl.Module) -> str:
    parts: list[str] = []
    while module is not root:
        parent = module.parent
        if parent is None:
            raise ValueError(f"{type(module).__name__} is not inside {type(root).__name__}")
        parts.append(parent.key_of(module))
        module = parent
    return ".".join(reversed(parts))


def transformers_clip_image_key_map(encoder: CLIPImageEncoder) -> KeyMap:
    """The key map from a transformers `CLIPVisionModelWithProjection`'s state dict to `encoder`'s.

    Each transformers module is paired with the layer that plays its role, found by type and order: the class
    token (a vector in transformers, reshaped to a one-token row), the patch convolution, the position embeddings,
    the LayerNorms before and after the transformer, each layer's norms and projections, and the projection.

    Args:
        encoder: The target encoder (its weights are not read: it may live on the "meta" device).
    """
    key_map = KeyMap(ignored=[lambda key: key == f"{_PREFIX}embeddings.position_ids"])

    def add(source: str, module: fl.Module, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        target = _path(encoder, module)
        for name, _ in module.named_parameters(recurse=False):
            key_map.add(f"{source}.{name}", f"{target}.{name}", transform)

    embeddings = encoder.ensure_find(ViTEmbeddings)
    key_map.add(
        f"{_PREFIX}embeddings.class_embedding",
        f"{_path(encoder, embeddings.ensure_find(ClassToken))}.weight",
        lambda tensor: tensor.reshape(1, -1),
    )
    add(f"{_PREFIX}embeddings.patch_embedding", embeddings.ensure_find(PatchEncoder).ensure_find(fl.Conv2d))
    add(f"{_PREFIX}embeddings.position_embedding", embeddings.layer("Residual.PositionalEncoder", fl.WeightedModule))
    outer_norms = [child for child in encoder if isinstance(child, fl.LayerNorm)]
    if len(outer_norms) != 2:
        raise ValueError(f"expected a LayerNorm before and one after the transformer, found {len(outer_norms)}")
    add(f"{_PREFIX}pre_layrnorm", outer_norms[0])  # sic: transformers' name
    add(f"{_PREFIX}post_layernorm", outer_norms[1])
    for index, layer in enumerate(encoder.layers(TransformerLayer)):
        name = f"{_PREFIX}encoder.layers.{index}"
        norm1, norm2 = layer.layers(fl.LayerNorm)
        query, key, value, output = layer.ensure_find(fl.SelfAttention).layers(fl.Linear)
        fc1, fc2 = layer.ensure_find(FeedForward).layers(fl.Linear)
        for source, module in [
            ("layer_norm1", norm1),
            ("self_attn.q_proj", query),
            ("self_attn.k_proj", key),
            ("self_attn.v_proj", value),
            ("self_attn.out_proj", output),
            ("layer_norm2", norm2),
            ("mlp.fc1", fc1),
            ("mlp.fc2", fc2),
        ]:
            add(f"{name}.{source}", module)
    add("visual_projection", [child for child in encoder if isinstance(child, fl.Linear)][-1])
    return key_map


def convert_clip_image_weights(
    source: CLIPImageSource, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Convert an opened checkpoint in memory: the encoder's constructor call and its state dict.

    Raises:
        ConversionError: The checkpoint does not fit; the message lists the unused and missing keys, each on one line.
    """
    config = clip_image_config(source)
    encoder = config.build(CLIP_IMAGE_ENCODER_CLASSES, device="meta")
    key_map = transformers_clip_image_key_map(encoder)
    unused = [key for key in source.tensors if key not in key_map.mapping and not key_map.is_ignored(key)]
    missing = [key for key in key_map.mapping if key not in source.tensors]
    if unused:
        raise ConversionError(
            f"{source.origin} has {len(unused)} tensors that {config} does not use: {', '.join(unused)}"
        )
    if missing:
        raise ConversionError(f"{source.origin} lacks {len(missing)} tensors that {config} needs: {', '.join(missing)}")
    converted = convert_state_dict(
        source.tensors,
        key_map,
        {key: tensor.shape for key, tensor in encoder.state_dict().items()},
        what=f"transformers CLIP vision model {source.origin}",
        dtype=dtype,
    )
    return config, {key: tensor.contiguous() for key, tensor in converted.items()}


def convert_clip_image(
    source: "str | Path | CLIPImageSource", dest: str | Path, dtype: torch.dtype | None = None
) -> tuple[Path, ModelConfig, int]:
    """Convert a CLIP vision checkpoint and write it, atomically, to a `.safetensors` file with its encoder's config.

    Args:
        source: A transformers folder or weights file, a Hub id, or an opened source.
        dest: The `.safetensors` file to write (its folder is created if needed).
        dtype: Cast floating-point tensors to this dtype (default: keep the source's).

    Returns:
        The file written, the encoder's constructor call, and the number of tensors.
    """
    path = Path(dest).expanduser()
    if path.suffix != ".safetensors" or path.is_dir():
        raise SourceError(f"the destination must be a .safetensors file, got {dest}")
    opened = source if isinstance(source, CLIPImageSource) else open_clip_image_source(source)
    config, tensors = convert_clip_image_weights(opened, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_to_safetensors(path, tensors, config.to_metadata())
    return path, config, len(tensors)


def add_clip_image_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `refiners-convert clip-image --from SOURCE --to FILE [--dtype DTYPE]` to `refiners-convert`'s commands."""
    help = "a CLIP image encoder (transformers CLIPVisionModelWithProjection), for CLIPImageEncoder.from_safetensors"
    command = commands.add_parser("clip-image", help=help, description=help)
    command.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help="a transformers CLIPVisionModelWithProjection folder or weights file, or a Hub id (with a subfolder, "
        "such as h94/IP-Adapter/models/image_encoder)",
    )
    command.add_argument("--to", dest="dest", required=True, metavar="FILE", help="the .safetensors file to write")
    command.add_argument(
        "--dtype", choices=list(_DTYPES), default=None, help="cast the weights (default: keep the source's)"
    )


def run_clip_image_command(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    """Run `refiners-convert clip-image` (see `add_clip_image_command`); returns the exit status."""
    start = time.monotonic()
    try:
        path, config, count = convert_clip_image(
            args.source, args.dest, _DTYPES[args.dtype] if args.dtype is not None else None
        )
    except (ValueError, OSError) as error:
        progress(f"refiners-convert: error: {error}")
        return 1
    progress(
        f"clip-image: wrote {count} tensors for {config} to {path} in {time.monotonic() - start:.1f} s; load it with "
        f"CLIPImageEncoder.from_safetensors({str(path)!r})"
    )
    print(path)
    return 0
