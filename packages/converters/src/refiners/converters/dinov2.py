"""DINOv2 checkpoints to refiners weights: what `refiners-convert dinov2` runs.

A source is one of:

- facebook's original file (`dinov2_vits14_pretrain.pth`, `dinov2_vitg14_reg4_pretrain.pth`...), read with
  `torch.load(weights_only=True)`, or the same tensors in a `.safetensors` file;
- a transformers `Dinov2Model` / `Dinov2WithRegistersModel` folder (`config.json` and `model.safetensors`, sharded or
  not, or `pytorch_model.bin`), or its weights file alone;
- a Hugging Face Hub id such as `facebook/dinov2-small` (only the config and weights are downloaded);
- a transformers image classifier (`Dinov2ForImageClassification`, `Dinov2WithRegistersForImageClassification`, e.g.
  `facebook/dinov2-small-imagenet1k-1-layer`): its backbone and linear head become a `LinearProbe`.

The layout is told by the keys (facebook's `blocks.N...` or transformers' `encoder.layer.N...`); the sizes by the
config of a transformers folder, or else by the shapes of the tensors (DINOv2's attention heads are 64 wide, so a
file without config gives `embedding_dim // 64` heads). The key map comes from the family's name maps
(`refiners.foundationals.dinov2.weight_names`), derived from the target model's structure. Three tensors change
shape on the way: the tokens lose their leading batch dimension, facebook's fused `attn.qkv` is split into the
query, key and value projections, and the SwiGLU input projection has its halves swapped (see `SwiGLUFeedForward`).
The `mask_token` is the only source tensor left out on purpose (a training input); any other key that nothing uses
is an error that lists it. The file is written atomically, with the model's constructor call in its metadata: a
released size is recorded as its class (`DINOv2_small`...), another as a `ViT` with its arguments (a classifier as a
`LinearProbe` of them), and `ViT.from_safetensors(path)` (`LinearProbe.from_safetensors`) builds and loads it.
"""

import argparse
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.converters.sources import SourceError, TensorFile, read_json, transformers_weight_files
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.dinov2 import DINOV2_CLASSES, LinearProbe, ViT
from refiners.foundationals.dinov2.vit import (
    ClassToken,
    PositionalEmbedding,
    RegisterTokens,
    SwiGLUFeedForward,
    swiglu_hidden_dim,
)
from refiners.foundationals.dinov2.weight_names import (
    MASK_TOKEN_NAMES,
    Targets,
    facebook_dinov2_names,
    transformers_dinov2_names,
)

__all__ = [
    "Layout",
    "DINOV2_ARCHITECTURES",
    "DINOv2Source",
    "DINOv2Conversion",
    "open_dinov2_source",
    "dinov2_config",
    "dinov2_key_map",
    "convert_dinov2_weights",
    "convert_dinov2",
    "add_dinov2_command",
    "run_dinov2_command",
]

Layout = Literal["facebook", "transformers"]

DINOV2_ARCHITECTURES = (
    "Dinov2Model",
    "Dinov2WithRegistersModel",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersForImageClassification",
)
"""The transformers classes whose folders `refiners-convert dinov2` reads (their `config.json`'s `architectures`): the
backbones, and the image classifiers, converted to a `LinearProbe`."""

CLASSIFIER_PREFIXES = ("dinov2.", "dinov2_with_registers.")
"""Where transformers' image classifiers keep their backbone's tensors (the classifier's are `classifier.*`)."""

HEAD_DIM = 64
"""The width of an attention head in every released DINOv2 (6 heads for 384, ..., 24 for 1536)."""

_NAMES: dict[Layout, Callable[[ViT], dict[str, Targets]]] = {
    "facebook": facebook_dinov2_names,
    "transformers": transformers_dinov2_names,
}
# Where each layout keeps what sizes the model: the class token, the patch projection, the positions, the registers,
# the first layer's MLP (GeLU, or SwiGLU) and the layers' prefix.
_SHAPE_KEYS: dict[Layout, dict[str, str]] = {
    "facebook": {
        "class": "cls_token",
        "patch": "patch_embed.proj.weight",
        "positions": "pos_embed",
        "registers": "register_tokens",
        "mlp": "blocks.0.mlp.fc1.weight",
        "swiglu": "blocks.0.mlp.w12.weight",
        "layers": r"blocks\.(\d+)\.",
    },
    "transformers": {
        "class": "embeddings.cls_token",
        "patch": "embeddings.patch_embeddings.projection.weight",
        "positions": "embeddings.position_embeddings",
        "registers": "embeddings.register_tokens",
        "mlp": "encoder.layer.0.mlp.fc1.weight",
        "swiglu": "encoder.layer.0.mlp.weights_in.weight",
        "layers": r"encoder\.layer\.(\d+)\.",
    },
}
CLASSIFIER_WEIGHT = "classifier.weight"
_REFINERS_KEY = re.compile(r"(?:\w+\.)?Concatenate\.ClassToken\.weight")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class DINOv2Source:
    """A DINOv2 checkpoint, opened.

    Attributes:
        tensors: Its tensors, read lazily.
        layout: Whose names they have.
        config: The transformers `config.json` next to them, if any.
        origin: Where they come from, for messages.
        prefix: The prefix of the backbone's tensors (`dinov2.` in transformers' image classifiers), or "".
    """

    tensors: TensorFile
    layout: Layout
    config: Mapping[str, Any] | None
    origin: str
    prefix: str = ""

    @property
    def classes(self) -> int | None:
        """The number of classes of a classifier's linear head (`classifier.weight`), or None for a backbone."""
        return self.tensors.shape(CLASSIFIER_WEIGHT)[0] if self.prefix and CLASSIFIER_WEIGHT in self.tensors else None


@dataclass(frozen=True)
class DINOv2Conversion:
    """Converted weights, in memory.

    Attributes:
        tensors: The target model's state dict.
        config: The target model's constructor call (recorded in the file's metadata).
        layout: The source's layout.
    """

    tensors: dict[str, Tensor]
    config: ModelConfig
    layout: Layout


def _folder_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(
            f"{folder} has no config.json: pass a transformers Dinov2Model folder, a checkpoint file or a Hub id"
        )
    config = read_json(path)
    architectures: Any = config.get("architectures") or []
    if not set(architectures) & set(DINOV2_ARCHITECTURES):
        raise SourceError(
            f"{folder} holds a {' / '.join(map(str, architectures)) or 'model of unknown architecture'}, not a "
            f"{' or '.join(DINOV2_ARCHITECTURES)}: pass the folder of a DINOv2 backbone"
        )
    return config


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    try:
        folder = Path(str(snapshot_download(repo_id, allow_patterns=patterns)))
        if not any((folder / name).is_file() for name in patterns[1:3]):
            folder = Path(str(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model.bin"])))
    except (OSError, ValueError) as error:  # huggingface_hub's HTTP, offline and validation errors
        raise SourceError(
            f"{repo_id} is not a local file or folder, and downloading it from the Hugging Face Hub failed: {error}"
        ) from error
    return folder


def _layout(tensors: TensorFile, origin: str) -> tuple[Layout, str]:
    keys = set(tensors)
    if any(_REFINERS_KEY.fullmatch(key) for key in keys):
        raise SourceError(
            f"{origin} already holds refiners weights (written by refiners-convert dinov2): load it with "
            f"ViT.from_safetensors({origin!r}) (LinearProbe.from_safetensors for a classifier) instead of converting "
            "it again"
        )
    found: list[tuple[Layout, str]] = [
        (layout, prefix)
        for layout, shapes in _SHAPE_KEYS.items()
        for prefix in ("", *(CLASSIFIER_PREFIXES if layout == "transformers" else ()))
        if prefix + shapes["class"] in keys
    ]
    if len(found) != 1:
        shown = ", ".join(sorted(keys)[:8])
        raise SourceError(
            f"{origin} is not a DINOv2 checkpoint: it has neither facebook's `cls_token` nor transformers' "
            f"`embeddings.cls_token` (its keys start with {shown})"
        )
    return found[0]


def open_dinov2_source(source: str | Path) -> DINOv2Source:
    """Open a DINOv2 checkpoint: a file, a transformers folder or a Hub id (see the module's documentation).

    Raises:
        SourceError: It cannot be found or read, or it is not a DINOv2 checkpoint.
    """
    path = Path(source).expanduser()
    config: dict[str, Any] | None = None
    if path.is_dir():
        config = _folder_config(path)
        files = transformers_weight_files(path)
    elif path.is_file():
        if path.suffix not in _FILE_SUFFIXES:
            raise SourceError(f"{path} is not a checkpoint file: expected one of {', '.join(_FILE_SUFFIXES)}")
        files = [path]
        if (path.parent / "config.json").is_file() and path.name in ("model.safetensors", "pytorch_model.bin"):
            config = _folder_config(path.parent)
    elif not path.exists() and _HUB_ID.fullmatch(str(source)):
        path = _download(str(source))
        config = _folder_config(path)
        files = transformers_weight_files(path)
    else:
        raise SourceError(f"no such file or folder: {source} (nor a Hugging Face Hub id, `org/name`)")
    tensors = TensorFile(files)
    origin = tensors.describe()
    layout, prefix = _layout(tensors, origin)
    return DINOv2Source(tensors=tensors, layout=layout, config=config, origin=origin, prefix=prefix)


def _shape(source: DINOv2Source, role: str) -> tuple[int, ...] | None:
    key = source.prefix + _SHAPE_KEYS[source.layout][role]
    return source.tensors.shape(key) if key in source.tensors else None


def _checked(config: Mapping[str, Any], name: str, expected: object, origin: str) -> None:
    if name in config and config[name] != expected:
        raise ConversionError(
            f"{origin}'s config has {name}={config[name]!r} but its weights (or a DINOv2 ViT) have {expected!r}"
        )


def dinov2_config(source: DINOv2Source) -> ModelConfig:
    """The constructor call of the model `source` fits: a released size's class, or a `ViT` with its arguments.

    Raises:
        ConversionError: The source lacks a tensor that sizes the model, or its config asks for what a DINOv2 ViT
            does not compute.
    """
    shapes = {role: _shape(source, role) for role in ("class", "patch", "positions", "registers", "mlp", "swiglu")}
    if shapes["class"] is None or shapes["patch"] is None or shapes["positions"] is None:
        raise ConversionError(f"{source.origin} lacks the class token, patch projection or position embeddings")
    embedding_dim, patch_size = shapes["class"][-1], shapes["patch"][-1]
    positions = shapes["positions"][-2] - 1
    grid_size = round(positions**0.5)
    if grid_size * grid_size != positions:
        raise ConversionError(f"{source.origin}'s {positions} patch position embeddings are not a square grid")
    pattern = re.compile(_SHAPE_KEYS[source.layout]["layers"])
    layer_indices = {
        int(match.group(1))
        for key in source.tensors
        if key.startswith(source.prefix) and (match := pattern.match(key.removeprefix(source.prefix)))
    }
    swiglu = shapes["swiglu"] is not None
    mlp = shapes["swiglu"] if swiglu else shapes["mlp"]
    if mlp is None:
        raise ConversionError(f"{source.origin} has no MLP in its first layer ({_SHAPE_KEYS[source.layout]['mlp']})")
    feedforward_dim = mlp[0] // 2 if swiglu else mlp[0]
    num_registers = shapes["registers"][-2] if shapes["registers"] is not None else 0
    config = source.config or {}
    # What the config says must be what the weights hold, or what a DINOv2 ViT computes.
    for name, expected in (
        ("hidden_size", embedding_dim),
        ("patch_size", patch_size),
        ("num_hidden_layers", len(layer_indices)),
        ("num_register_tokens", num_registers),
        ("use_swiglu_ffn", swiglu),
        ("hidden_act", "gelu"),
        ("qkv_bias", True),
        ("num_channels", 3),
    ):
        _checked(config, name, expected, source.origin)
    if isinstance(image_size := config.get("image_size"), int) and image_size // patch_size != grid_size:
        raise ConversionError(
            f"{source.origin}'s config has image_size={image_size}, but its position embeddings are a "
            f"{grid_size} x {grid_size} grid of {patch_size}-pixel patches"
        )
    num_heads = config.get("num_attention_heads", embedding_dim // HEAD_DIM)
    if not isinstance(num_heads, int) or num_heads < 1 or embedding_dim % num_heads:
        raise ConversionError(
            f"cannot tell the attention heads of {source.origin}: its width {embedding_dim} is not a multiple of "
            f"DINOv2's {HEAD_DIM}-wide heads and it has no config"
        )
    mlp_ratio = config.get("mlp_ratio", 4)
    arguments: dict[str, Any] = {
        "embedding_dim": embedding_dim,
        "patch_size": patch_size,
        "image_size": grid_size * patch_size,
        "num_layers": len(layer_indices),
        "num_heads": num_heads,
        "norm_eps": float(config.get("layer_norm_eps", 1e-6)),
        "mlp_ratio": mlp_ratio,
        "num_registers": num_registers,
        "feedforward": "swiglu" if swiglu else "gelu",
        "feedforward_dim": feedforward_dim,
        # transformers' and facebook's models with registers resample their positions with antialiasing.
        "interpolate_antialias": num_registers > 0,
    }
    expected_dim = swiglu_hidden_dim(embedding_dim, mlp_ratio) if swiglu else embedding_dim * mlp_ratio
    if feedforward_dim == expected_dim:
        del arguments["feedforward_dim"]
    sizes = _arguments(ViT(**arguments, device="meta"))
    for preset in DINOV2_CLASSES[1:]:
        if _arguments(preset(device="meta")) == sizes:
            return ModelConfig.of(preset)
    return ModelConfig.of(ViT, **arguments)


def _arguments(model: ViT) -> tuple[object, ...]:
    return (
        model.embedding_dim,
        model.patch_size,
        model.image_size,
        model.num_layers,
        model.num_heads,
        model.norm_eps,
        model.feedforward,
        model.feedforward_dim,
        model.num_registers,
        model.interpolate_antialias,
    )


def _fused_part(key: str, index: int, count: int) -> str:
    return f"{key} (part {index + 1} of {count})"


def _squeeze(tensor: Tensor) -> Tensor:
    return tensor.squeeze(0)


def _swap_halves(tensor: Tensor) -> Tensor:
    # The references compute silu(x1) * x2 (gate first); fl.GLU computes a * silu(b) (value first).
    gate, value = tensor.chunk(2)
    return torch.cat((value, gate))


def dinov2_key_map(model: ViT, layout: Layout) -> KeyMap:
    """The key map from a `layout` checkpoint to `model`'s state dict.

    A tensor that fills several weights (facebook's `attn.qkv`) is mapped as its parts, `KEY (part i of n)`, which
    `split_fused` makes of the source; the mask token is ignored on purpose.

    Args:
        model: The target (its weights are not read: it may live on the "meta" device).
        layout: The checkpoint's layout.
    """
    paths = {id(module): name for name, module in model.named_modules()}
    key_map = KeyMap(ignored=[lambda key: key == MASK_TOKEN_NAMES[layout]])
    swiglu_inputs = {id(mlp[0]) for mlp in model.layers(SwiGLUFeedForward)}
    for source, targets in _NAMES[layout](model).items():
        for index, (module, parameter) in enumerate(targets):
            target = f"{paths[id(module)]}.{parameter}"
            transform = None
            if isinstance(module, ClassToken | PositionalEmbedding | RegisterTokens):
                transform = _squeeze
            elif id(module) in swiglu_inputs:
                transform = _swap_halves
            key = source if len(targets) == 1 else _fused_part(source, index, len(targets))
            key_map.add(key, target, transform)
    return key_map


class _Unfused(Mapping[str, Tensor]):
    """`source` with each fused tensor replaced by its parts (`KEY (part i of n)`), split along the first dimension."""

    def __init__(self, source: Mapping[str, Tensor], fused: Mapping[str, int]) -> None:
        self._source = source
        self._parts: dict[str, tuple[str, int, int]] = {}
        self._keys: list[str] = []
        for key in source:
            if (count := fused.get(key)) is None:
                self._keys.append(key)
                continue
            for index in range(count):
                self._parts[_fused_part(key, index, count)] = (key, index, count)
        self._keys += self._parts
        self._present = set(self._keys)

    def __getitem__(self, key: str) -> Tensor:
        if (part := self._parts.get(key)) is not None:
            fused, index, count = part
            return self._source[fused].chunk(count)[index]
        if key not in self._present:
            raise KeyError(key)
        return self._source[key]

    def __contains__(self, key: object) -> bool:
        return key in self._present

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def split_fused(source: Mapping[str, Tensor], model: ViT, layout: Layout) -> Mapping[str, Tensor]:
    """`source` with the tensors that fill several weights of `model` split into their parts (see `dinov2_key_map`)."""
    fused = {key: len(targets) for key, targets in _NAMES[layout](model).items() if len(targets) > 1}
    return _Unfused(source, fused)


def _listed(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def convert_dinov2_weights(source: DINOv2Source, dtype: torch.dtype | None = None) -> DINOv2Conversion:
    """Convert an opened checkpoint in memory (see `open_dinov2_source`).

    Args:
        source: The checkpoint.
        dtype: Cast floating-point tensors to this dtype (default: keep the source's).

    Returns:
        The weights of a `ViT` (a released size's class for a released checkpoint), or of a `LinearProbe` for a
        transformers image classifier.

    Raises:
        ConversionError: The checkpoint does not fit a DINOv2 ViT; the message lists the keys and shapes.
    """
    config = backbone_config = dinov2_config(source)
    backbone: ViT = backbone_config.build(DINOV2_CLASSES, device="meta")
    model: ViT | LinearProbe = backbone
    target_prefix = ""
    if (classes := source.classes) is not None:
        config = ModelConfig.of(LinearProbe, backbone=backbone_config, num_classes=classes)
        model = LinearProbe(backbone, num_classes=classes, device="meta")
        target_prefix = f"{model.key_of(backbone)}."
    key_map = dinov2_key_map(backbone, source.layout).with_prefix(source.prefix, target_prefix)
    if isinstance(model, LinearProbe):
        for name in ("weight", "bias"):
            key_map.add(f"classifier.{name}", f"{model.key_of(model.head)}.{name}")
    tensors = split_fused(source.tensors, backbone, source.layout)
    unused = [key for key in tensors if key not in key_map.mapping and not key_map.is_ignored(key)]
    missing = [key for key in key_map.mapping if key not in tensors]
    where = f"{source.origin} ({source.layout} layout)"
    if unused:
        raise ConversionError(
            f"{where} has {len(unused)} tensors that {config} does not use: {_listed(unused)}. Pass a DINOv2 backbone "
            "(or a transformers image classifier), not a training checkpoint nor a separate head"
        )
    if missing:
        raise ConversionError(f"{where} lacks {len(missing)} tensors that {config} needs: {_listed(missing)}")
    converted = convert_state_dict(
        tensors,
        key_map,
        {key: tensor.shape for key, tensor in model.state_dict().items()},
        what=f"{source.layout} DINOv2 checkpoint {source.origin}",
        dtype=dtype,
    )
    return DINOv2Conversion({key: tensor.contiguous() for key, tensor in converted.items()}, config, source.layout)


def _destination(dest: str | Path) -> Path:
    path = Path(dest).expanduser()
    if path.suffix != ".safetensors" or path.is_dir():
        raise SourceError(f"the destination must be a .safetensors file, got {dest}")
    return path


def convert_dinov2(
    source: "str | Path | DINOv2Source", dest: str | Path, dtype: torch.dtype | None = None
) -> tuple[Path, DINOv2Conversion]:
    """Convert a DINOv2 checkpoint and write it, atomically, to a `.safetensors` file with its model's config.

    Args:
        source: A facebook `.pth`, a transformers folder or weights file, a Hub id, or an opened source.
        dest: The `.safetensors` file to write (its folder is created if needed).
        dtype: Cast floating-point tensors to this dtype (default: keep the source's).

    Raises:
        SourceError: The source cannot be read, or `dest` is not a `.safetensors` path.
        ConversionError: The checkpoint does not fit a DINOv2 ViT.
    """
    path = _destination(dest)
    opened = source if isinstance(source, DINOv2Source) else open_dinov2_source(source)
    conversion = convert_dinov2_weights(opened, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_to_safetensors(path, conversion.tensors, conversion.config.to_metadata())
    return path, conversion


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_dinov2_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `refiners-convert dinov2 --from SOURCE --to FILE [--dtype DTYPE]` to `refiners-convert`'s commands."""
    help = (
        "a DINOv2 backbone (facebook's .pth, a transformers Dinov2Model folder, or a Hub id), for ViT.from_safetensors; "
        "a transformers Dinov2ForImageClassification, for LinearProbe.from_safetensors"
    )
    command = commands.add_parser("dinov2", help=help, description=help)
    command.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help="facebook's original file (dinov2_vits14_pretrain.pth...), a transformers Dinov2Model or "
        "Dinov2WithRegistersModel folder or weights file, or a Hub id such as facebook/dinov2-small",
    )
    command.add_argument("--to", dest="dest", required=True, metavar="FILE", help="the .safetensors file to write")
    command.add_argument(
        "--dtype", choices=list(_DTYPES), default=None, help="cast the weights (default: keep the source's)"
    )


def run_dinov2_command(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    """Run `refiners-convert dinov2` (see `add_dinov2_command`); returns the exit status.

    Args:
        args: The parsed arguments.
        progress: Receives the progress and error lines.
    """
    start = time.monotonic()
    try:
        _destination(args.dest)
        source = open_dinov2_source(args.source)
        progress(f"dinov2: reading {source.origin}, {source.layout} layout")
        path, conversion = convert_dinov2(source, args.dest, _DTYPES[args.dtype] if args.dtype is not None else None)
    except (ValueError, OSError) as error:
        progress(f"refiners-convert: error: {error}")
        return 1
    size = sum(tensor.numel() * tensor.element_size() for tensor in conversion.tensors.values()) / 1e9
    progress(
        f"dinov2: wrote {len(conversion.tensors)} tensors ({size:.2f} GB) for {conversion.config} to {path} in "
        f"{time.monotonic() - start:.1f} s; load it with "
        f"{'LinearProbe' if conversion.config.class_name == LinearProbe.__name__ else 'ViT'}.from_safetensors({str(path)!r})"
    )
    print(path)
    return 0
