"""Meta's Segment Anything checkpoints (`sam_vit_b_01ec64.pth`, ...) to `SegmentAnything` weights.

The checkpoint is a plain `Sam` state dict (`.pth`, read with `torch.load(weights_only=True)`, or `.safetensors`),
or a transformers `SamModel` folder, whose names are turned into the original ones first (`TransformersSAMNames`).
Its sizes are read off the tensors' shapes (width and depth of the ViT, heads from the relative position tables,
global layers from their table's length, decoder depth and widths, number of masks), so any size converts; the
file records the model (`SegmentAnythingB` when the sizes are ViT-B's, else `SegmentAnything(...)` with its
arguments) for `SegmentAnything.from_safetensors`. The key map is derived from the model's tree
(`original_sam_parameters`); a key it does not use is an error, as is one it misses.
"""

import argparse
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.converters.sources import SourceError, TensorFile
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.segment_anything import (
    SegmentAnything,
    SegmentAnythingB,
    SegmentAnythingH,
    SegmentAnythingL,
)
from refiners.foundationals.segment_anything.original_names import original_sam_parameters

__all__ = [
    "HQ_SAM_MARKER",
    "SAMConversion",
    "module_path",
    "original_sam_arguments",
    "original_sam_key_map",
    "build_original_sam",
    "convert_original_sam",
    "read_checkpoint",
    "TransformersSAMNames",
    "write_converted",
    "convert_sam_file",
    "convert_hq_sam_file",
    "HQ_SAM_TARGET_METADATA",
    "add_sam_commands",
    "run_sam_command",
]

HQ_SAM_MARKER = "mask_decoder.hf_token.weight"
"""A key that only HQ-SAM checkpoints have."""

_PRESETS: tuple[type[SegmentAnything], ...] = (SegmentAnythingB, SegmentAnythingL, SegmentAnythingH)
_DECODER_HEADS = 8  # every SAM's; the checkpoint cannot tell (the heads share one projection)


def module_path(root: fl.Chain, module: fl.Module) -> str:
    """The state-dict prefix of `module` in `root` (e.g. `SAMViT.TransformerLayer_3.Residual_1.LayerNorm`)."""
    parts: list[str] = []
    while module is not root:
        parent = module.parent
        if parent is None:
            raise ValueError(f"{type(module).__name__} is not inside {type(root).__name__}")
        parts.append(parent.key_of(module))
        module = parent
    return ".".join(reversed(parts))


def _shape(tensors: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise ConversionError(f"the checkpoint has no {key}: it is not an original Segment Anything checkpoint")
    shape = tensors.shape(key) if isinstance(tensors, TensorFile | TransformersSAMNames) else tuple(tensors[key].shape)
    return tuple(shape)


def _count(tensors: Mapping[str, Tensor], pattern: str) -> int:
    indices = {int(match.group(1)) for key in tensors if (match := re.fullmatch(pattern, key))}
    return max(indices) + 1 if indices else 0


def original_sam_arguments(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """`SegmentAnything`'s constructor arguments, read off an original checkpoint's shapes."""
    embedding_dim, _, patch_size, _ = _shape(tensors, "image_encoder.patch_embed.proj.weight")
    grid_size = _shape(tensors, "image_encoder.pos_embed")[1]
    num_layers = _count(tensors, r"image_encoder\.blocks\.(\d+)\..*")
    table_sizes = [_shape(tensors, f"image_encoder.blocks.{index}.attn.rel_pos_h") for index in range(num_layers)]
    window_sizes = {(rows + 1) // 2 for rows, _ in table_sizes if (rows + 1) // 2 != grid_size}
    if len(window_sizes) > 1:
        raise ConversionError(f"the checkpoint's windowed layers have several window sizes: {sorted(window_sizes)}")
    head_dim = table_sizes[0][1]
    return {
        "embedding_dim": embedding_dim,
        "num_layers": num_layers,
        "num_heads": embedding_dim // head_dim,
        "global_attention_indices": tuple(
            index for index, (rows, _) in enumerate(table_sizes) if (rows + 1) // 2 == grid_size
        ),
        "window_size": window_sizes.pop() if window_sizes else 14,
        "image_size": grid_size * patch_size,
        "patch_size": patch_size,
        "prompt_embedding_dim": _shape(tensors, "image_encoder.neck.0.weight")[0],
        "mask_encoder_channels": _shape(tensors, "prompt_encoder.mask_downscaling.3.weight")[0],
        "decoder_depth": _count(tensors, r"mask_decoder\.transformer\.layers\.(\d+)\..*"),
        "decoder_num_heads": _DECODER_HEADS,
        "decoder_feedforward_dim": _shape(tensors, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        "iou_hidden_dim": _shape(tensors, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
        "num_multimask_outputs": _shape(tensors, "mask_decoder.mask_tokens.weight")[0] - 1,
    }


def build_original_sam(
    tensors: Mapping[str, Tensor], device: torch.device | str | None = "meta", dtype: torch.dtype | None = None
) -> SegmentAnything:
    """The `SegmentAnything` an original checkpoint fits: a preset when its sizes are one's, on the "meta" device."""
    arguments = original_sam_arguments(tensors)
    for preset in _PRESETS:
        if preset(device="meta")._arguments() == arguments:
            return preset(device=device, dtype=dtype)
    return SegmentAnything(**arguments, device=device, dtype=dtype)


def _squeeze_to(shape: torch.Size) -> Callable[[Tensor], Tensor]:
    def transform(tensor: Tensor) -> Tensor:
        # `pos_embed` is (1, h, w, dim) in the original: the batch dimension is added back by broadcasting here.
        return tensor.squeeze(0) if tensor.dim() == len(shape) + 1 and tensor.shape[0] == 1 else tensor

    return transform


def original_sam_key_map(sam: SegmentAnything) -> KeyMap:
    """The key map from an original `Sam` state dict to `sam`'s (its weights are not read: it may be on "meta")."""
    key_map = KeyMap()
    shapes = {key: tensor.shape for key, tensor in sam.state_dict().items()}
    for source, (module, name) in original_sam_parameters(sam).items():
        target = f"{module_path(sam, module)}.{name}"
        transform = _squeeze_to(shapes[target]) if source == "image_encoder.pos_embed" else None
        key_map.add(source, target, transform)
    return key_map


def convert_original_sam(
    tensors: Mapping[str, Tensor], sam: SegmentAnything, dtype: torch.dtype | None = None, what: str = "checkpoint"
) -> dict[str, Tensor]:
    """Convert an original `Sam` state dict into `sam`'s.

    Raises:
        ConversionError: The checkpoint does not fit `sam`; the message lists the keys and shapes. An HQ-SAM
            checkpoint is refused with what to run instead.
    """
    if HQ_SAM_MARKER in tensors:
        raise ConversionError(
            f"the {what} is an HQ-SAM checkpoint (it has {HQ_SAM_MARKER}): convert its HQ weights with "
            "`refiners-convert hq-sam` (an adapter on SAM), and SAM itself from Meta's SAM checkpoint"
        )
    return convert_state_dict(
        tensors,
        original_sam_key_map(sam),
        {key: tensor.shape for key, tensor in sam.state_dict().items()},
        what=f"Segment Anything {what} (for {sam.config})",
        dtype=dtype,
    )


def read_checkpoint(path: str | Path) -> Mapping[str, Tensor]:
    """The tensors of a checkpoint, under the original names: a file (`.pth`/`.pt`/`.bin` read with
    `torch.load(weights_only=True)`, `.safetensors`), or a transformers `SamModel` folder (`config.json` and
    `model.safetensors`, sharded or not, or `pytorch_model.bin`), whose names are turned into the original ones
    (see `TransformersSAMNames`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        tensors = TensorFile(_transformers_weight_files(path))
    elif path.is_file():
        tensors = TensorFile([path])
    else:
        raise SourceError(f"no such checkpoint file or folder: {path}")
    return TransformersSAMNames(tensors) if any(key.startswith("vision_encoder.") for key in tensors) else tensors


def _transformers_weight_files(folder: Path) -> list[Path]:
    config = folder / "config.json"
    if not config.is_file() or "SamModel" not in config.read_text(encoding="utf-8"):
        raise SourceError(f"{folder} is not a transformers SamModel folder (its config.json does not name SamModel)")
    if (index := folder / "model.safetensors.index.json").is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise SourceError(f"{folder} has no weights (model.safetensors, its sharded index, or pytorch_model.bin)")


# transformers' names of the original `nn.Sequential` children, by their index there.
_SEQUENTIALS = {
    "vision_encoder.neck": ("image_encoder.neck", {"conv1": 0, "layer_norm1": 1, "conv2": 2, "layer_norm2": 3}),
    "prompt_encoder.mask_embed": (
        "prompt_encoder.mask_downscaling",
        {"conv1": 0, "layer_norm1": 1, "conv2": 3, "layer_norm2": 4, "conv3": 6},
    ),
}
_UPSCALING = {"upscale_conv1": 0, "upscale_layer_norm": 1, "upscale_conv2": 3}
_RENAMES = (
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^vision_encoder\.layers\.", "image_encoder.blocks."),
    (r"^vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
)
# The prompt encoder's copy of the shared position features: transformers ties it to `shared_image_embedding`.
_TIED = "prompt_encoder.shared_embedding.positional_embedding"


class TransformersSAMNames(Mapping[str, Tensor]):
    """The tensors of a transformers `SamModel`, under the original checkpoint's names.

    The renaming is a handful of rules (`vision_encoder.layers.N.layer_norm1` is `image_encoder.blocks.N.norm1`, ...),
    the children of the original `Sequential`s by their index there, and transformers' MLPs (`proj_in`, `layers.i`,
    `proj_out`) as the original's `layers.0..n-1`. `prompt_encoder.shared_embedding.positional_embedding`, tied to
    `shared_image_embedding.positional_embedding`, is read once. A key no rule renames keeps its name (and is
    reported as unused by the conversion).

    Args:
        tensors: The transformers checkpoint's tensors.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = tensors
        keys = [
            key for key in tensors if not (key == _TIED and "shared_image_embedding.positional_embedding" in tensors)
        ]
        mlps = {key.removesuffix(".proj_in.weight") for key in keys if key.endswith(".proj_in.weight")}
        hidden = dict.fromkeys(mlps, 0)
        for key in keys:
            if (match := re.fullmatch(r"(.*)\.layers\.(\d+)\.\w+", key)) and match.group(1) in mlps:
                hidden[match.group(1)] = max(hidden[match.group(1)], int(match.group(2)) + 1)
        self._source = {self._original(key, hidden): key for key in keys}

    @staticmethod
    def _original(key: str, mlp_hidden_layers: dict[str, int]) -> str:
        for prefix, (original, indices) in _SEQUENTIALS.items():
            if (match := re.fullmatch(rf"{re.escape(prefix)}\.(\w+)\.(\w+)", key)) and match.group(1) in indices:
                return f"{original}.{indices[match.group(1)]}.{match.group(2)}"
        if (match := re.fullmatch(r"mask_decoder\.(\w+)\.(\w+)", key)) and match.group(1) in _UPSCALING:
            return f"mask_decoder.output_upscaling.{_UPSCALING[match.group(1)]}.{match.group(2)}"
        match = re.fullmatch(r"(.*)\.(proj_in|proj_out|layers\.(\d+))\.(\w+)", key)
        if match and match.group(1) in mlp_hidden_layers:
            mlp, part, hidden, name = match.groups()
            last = mlp_hidden_layers[mlp] + 1
            index = 0 if part == "proj_in" else last if part == "proj_out" else int(hidden) + 1
            return f"{mlp}.layers.{index}.{name}"
        for pattern, replacement in _RENAMES:
            renamed, count = re.subn(pattern, replacement, key)
            if count:
                return renamed
        return key

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[self._source[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)

    def __contains__(self, key: object) -> bool:
        return key in self._source

    def shape(self, key: str) -> tuple[int, ...]:
        source = self._source[key]
        return self.tensors.shape(source) if isinstance(self.tensors, TensorFile) else tuple(self.tensors[source].shape)


@dataclass(frozen=True)
class SAMConversion:
    """What a conversion wrote.

    Attributes:
        path: The `.safetensors` file.
        description: What it holds, e.g. `SegmentAnythingB()`.
    """

    path: Path
    description: str


def write_converted(tensors: Mapping[str, Tensor], metadata: dict[str, str], dest: str | Path) -> Path:
    """Write converted tensors atomically (the file is complete or absent) to `dest`, a `.safetensors` file."""
    path = Path(dest).expanduser()
    if path.suffix != ".safetensors":
        raise SourceError(f"the destination must be a .safetensors file, got {dest}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_to_safetensors(path, {key: tensor.contiguous() for key, tensor in tensors.items()}, metadata)
    return path


def convert_sam_file(source: str | Path, dest: str | Path, dtype: torch.dtype | None = None) -> SAMConversion:
    """`refiners-convert sam`: an original checkpoint file to a `.safetensors` file for `SegmentAnything`."""
    tensors = read_checkpoint(source)
    sam = build_original_sam(tensors)
    converted = convert_original_sam(tensors, sam, dtype, what=f"checkpoint {source}")
    path = write_converted(converted, sam.config.to_metadata(), dest)
    return SAMConversion(path, str(sam.config))


def _hq_sam_key_map(sam: SegmentAnything, adapter: Any) -> KeyMap:
    from refiners.adapters.hq_sam import original_hq_sam_parameters

    sam_keys = set(original_sam_parameters(sam))
    # SAM's own weights, which HQ-SAM checkpoints repeat (frozen): they belong to `refiners-convert sam`'s file.
    key_map = KeyMap(ignored=[sam_keys.__contains__])
    for source, target in original_hq_sam_parameters(adapter).items():
        key_map.add(source, target)
    return key_map


def convert_hq_sam_file(source: str | Path, dest: str | Path, dtype: torch.dtype | None = None) -> SAMConversion:
    """`refiners-convert hq-sam`: an original HQ-SAM checkpoint to the weights of `HQSAMAdapter`.

    The checkpoint holds SAM's weights too (HQ-SAM trains with SAM frozen): they are recognised as SAM's and left
    to `refiners-convert sam` (convert Meta's SAM checkpoint of the same size); any other key is an error.
    """
    from refiners.adapters.hq_sam import HQSAMAdapter

    tensors = read_checkpoint(source)
    if HQ_SAM_MARKER not in tensors:
        raise ConversionError(
            f"{source} is not an HQ-SAM checkpoint (it has no {HQ_SAM_MARKER}): convert SAM checkpoints with "
            "`refiners-convert sam`"
        )
    sam = build_original_sam(tensors)
    adapter = HQSAMAdapter(target=sam)
    converted = convert_state_dict(
        tensors,
        _hq_sam_key_map(sam, adapter),
        {key: tensor.shape for key, tensor in adapter.state_dict().items()},
        what=f"HQ-SAM checkpoint {source} (for HQSAMAdapter on {sam.config})",
        dtype=dtype,
    )
    metadata = {HQ_SAM_TARGET_METADATA: str(sam.config)}
    return SAMConversion(write_converted(converted, metadata, dest), f"HQSAMAdapter on {sam.config}")


HQ_SAM_TARGET_METADATA = "refiners.hq_sam.target"
"""The metadata entry of a converted HQ-SAM file that names the SAM it was trained on (e.g. `SegmentAnythingB()`)."""


def add_sam_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `sam` and `hq-sam` to `refiners-convert`."""
    for name, help in (
        (
            "sam",
            "an original Segment Anything checkpoint (sam_vit_b_01ec64.pth, ...) or a transformers SamModel folder, "
            "for SegmentAnything",
        ),
        ("hq-sam", "an original HQ-SAM checkpoint (sam_hq_vit_b.pth, ...), for HQSAMAdapter"),
    ):
        command = commands.add_parser(name, help=help, description=help)
        command.add_argument(
            "--from", dest="source", required=True, metavar="SOURCE", help="a .pth or .safetensors file (or a folder)"
        )
        command.add_argument("--to", dest="dest", required=True, metavar="FILE", help="the .safetensors file to write")
        command.add_argument(
            "--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="cast the weights"
        )
        if name == "sam":
            command.add_argument(
                "--check",
                action="store_true",
                help="compare the converted model with segment_anything's Sam (installed apart) on a random image and "
                "point, and print the max abs differences",
            )


def run_sam_command(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    """Run `refiners-convert sam` or `hq-sam`; returns the exit status."""
    dtype = getattr(torch, args.dtype) if args.dtype is not None else None
    convert = convert_sam_file if args.command == "sam" else convert_hq_sam_file
    try:
        result = convert(args.source, args.dest, dtype)
    except (ValueError, OSError) as error:
        progress(f"refiners-convert: error: {' '.join(str(error).split())}")
        return 1
    print(result.path)
    if getattr(args, "check", False) and not _check_sam(args.source, result.path, dtype, progress):
        return 1
    load = (
        f"SegmentAnything.from_safetensors({str(result.path)!r})"
        if args.command == "sam"
        else f"HQSAMAdapter(target=sam, weights={str(result.path)!r}).inject()"
    )
    progress(f"{args.command}: wrote {result.description} to {result.path}; load it with {load}")
    return 0


CHECK_TOLERANCE = 1e-4
"""`--check` fails above this max abs difference, relative to the reference output's scale (5e-2 after a cast to
float16 or bfloat16)."""


def _check_sam(source: str | Path, converted: Path, dtype: torch.dtype | None, progress: Callable[[str], None]) -> bool:
    from refiners.converters.segment_anything_check import compare_sam, missing_segment_anything

    if missing_segment_anything():
        progress(
            "refiners-convert: error: --check needs segment_anything (pip install segment-anything torchvision), or "
            "leave --check out."
        )
        return False
    tolerance = CHECK_TOLERANCE if dtype in (None, torch.float32) else 5e-2
    progress("sam: checking against segment_anything's Sam on a random image and point...")
    passed = True
    for what, comparison in compare_sam(source, converted).items():
        ok = comparison.relative <= tolerance
        passed &= ok
        progress(
            f"sam: {what}: max abs difference {comparison.max_abs_difference:.3g} ({comparison.relative:.3g} of the "
            f"output's scale {comparison.scale:.3g}; tolerance {tolerance:g}): "
            + ("ok" if ok else "FAILED, the converted model does not compute what the reference computes")
        )
    return passed
