"""T2I-Adapters to `FullT2IEncoder` / `LightT2IEncoder` / `FullT2IEncoderXL` weights: diffusers' `T2IAdapter` and
TencentARC's original files.

The key map is derived from the encoder's structure (`T2IEncoder.diffusers_modules`: `adapter.conv_in`,
`adapter.body.{i}.in_conv`, `.resnets.{j}.block1`, `.out_conv`). TencentARC's layout (`t2iadapter_depth_sd14v1.pth`:
`conv_in`, a flat `body.{k}` of residual blocks, `num_res_blocks` per stage; the light adapter's `body.{i}.in_conv`,
`body.{i}.body.{j}`, `body.{i}.out_conv`) is renamed to diffusers' by the encoder's `original_names`. The sizes come
from the diffusers config (a folder's `config.json`, or `--config`), else from the tensors' shapes; the file written
records them (`ModelConfig`), so that `SD1T2IAdapter(weights=FILE)` builds the encoder from the file alone.
"""

import argparse
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from refiners.adapters.t2i_adapter import FullT2IEncoder, FullT2IEncoderXL, LightT2IEncoder, T2IEncoder
from refiners.converters.engine import ConversionError, convert_state_dict
from refiners.converters.reference_check import Comparison, compare_outputs, missing_reference_packages
from refiners.converters.sources import SourceError, TensorFile
from refiners.converters.unet import module_key_map
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, save_to_safetensors

__all__ = [
    "T2I_ENCODERS",
    "t2i_adapter_config",
    "diffusers_t2i_adapter_config",
    "convert_t2i_adapter",
    "compare_t2i_adapter",
    "add_t2i_adapter_command",
    "run_t2i_adapter_command",
]

T2I_ENCODERS: tuple[type[T2IEncoder], ...] = (FullT2IEncoder, LightT2IEncoder, FullT2IEncoderXL)
"""The encoder of each of diffusers' `adapter_type`s."""

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TENCENTARC_RES_BLOCKS = 2  # `nums_rb` of every TencentARC full adapter; a flat body does not tell it


_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "channels": (320, 640, 1280, 1280),
    "num_res_blocks": 2,
    "downscale_factor": 8,
}
"""diffusers' `T2IAdapter` defaults, for a config that leaves a size out (they hold for every `adapter_type`)."""


def t2i_adapter_config(config: Mapping[str, Any]) -> ModelConfig:
    """The encoder of a diffusers `T2IAdapter` config (its `config.json`), every size recorded.

    Raises:
        ConversionError: The config names an adapter type these encoders do not lay out.
    """
    kind = config.get("adapter_type", "full_adapter")
    encoder = next((encoder for encoder in T2I_ENCODERS if encoder.kind == kind), None)
    if encoder is None:
        raise ConversionError(
            f"this T2I-Adapter's adapter_type={kind!r} is not supported: expected one of "
            f"{', '.join(repr(e.kind) for e in T2I_ENCODERS)}"
        )
    arguments = {key: config.get(key, default) for key, default in _DIFFUSERS_DEFAULTS.items()}
    return ModelConfig.of(encoder, **arguments | {"channels": tuple(arguments["channels"])})


def diffusers_t2i_adapter_config(model_config: ModelConfig) -> dict[str, Any]:
    """The diffusers `T2IAdapter` config of an encoder's record (what `t2i_adapter_config` reads).

    Args:
        model_config: The record of a converted file (`t2i_adapter_config`'s).
    """
    encoder = next(encoder for encoder in T2I_ENCODERS if encoder.__name__ == model_config.class_name)
    arguments = dict(model_config.arguments)
    return {"adapter_type": encoder.kind, **arguments, "channels": list(arguments["channels"])}


def _count(tensors: Mapping[str, Tensor], pattern: str) -> int:
    return sum(1 for key in tensors if re.fullmatch(pattern, key))


def _unshuffled(conv_in_features: int) -> tuple[int, int]:
    """`(in_channels, downscale_factor)` of an unshuffle into `conv_in_features` channels: SDXL's adapters unshuffle
    by 16 (1 or 3 channels: 256 or 768 features), SD1's by 8."""
    factor = 16 if conv_in_features in (256, 768) else 8
    return conv_in_features // factor**2, factor


def _inferred_config(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """A diffusers config read from the tensors' shapes (diffusers names)."""
    if "adapter.body.0.out_conv.weight" in tensors:
        stages = _count(tensors, r"adapter\.body\.\d+\.out_conv\.weight")
        widths = [tensors[f"adapter.body.{i}.out_conv.weight"].shape[0] for i in range(stages)]
        in_channels, factor = tensors["adapter.body.0.in_conv.weight"].shape[1] // 64, 8
        return {
            "adapter_type": "light_adapter",
            "in_channels": in_channels,
            "channels": widths[:-1],
            "num_res_blocks": _count(tensors, r"adapter\.body\.0\.resnets\.\d+\.block1\.weight"),
            "downscale_factor": factor,
        }
    stages = _count(tensors, r"adapter\.body\.\d+\.resnets\.0\.block1\.weight")
    in_channels, factor = _unshuffled(tensors["adapter.conv_in.weight"].shape[1])
    return {
        "adapter_type": "full_adapter_xl" if factor == 16 else "full_adapter",
        "in_channels": in_channels,
        "channels": [tensors[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0] for i in range(stages)],
        "num_res_blocks": _count(tensors, r"adapter\.body\.0\.resnets\.\d+\.block1\.weight"),
        "downscale_factor": factor,
    }


def _original_config(tensors: Mapping[str, Tensor], num_res_blocks: int | None) -> dict[str, Any]:
    """A diffusers config read from the shapes of a TencentARC file."""
    if "body.0.body.0.block1.weight" in tensors:  # Adapter_light
        stages = _count(tensors, r"body\.\d+\.out_conv\.weight")
        return {
            "adapter_type": "light_adapter",
            "in_channels": tensors["body.0.in_conv.weight"].shape[1] // 64,
            "channels": [tensors[f"body.{i}.out_conv.weight"].shape[0] for i in range(stages - 1)],
            "num_res_blocks": _count(tensors, r"body\.0\.body\.\d+\.block1\.weight"),
            "downscale_factor": 8,
        }
    per_stage = num_res_blocks or _TENCENTARC_RES_BLOCKS
    blocks = _count(tensors, r"body\.\d+\.block1\.weight")
    if blocks == 0 or blocks % per_stage:
        raise ConversionError(
            f"this file has {blocks} residual blocks in its body, not a multiple of {per_stage} per stage: it is not "
            "a TencentARC T2I-Adapter (give its diffusers config with --config if its stages have another number)"
        )
    in_channels, factor = _unshuffled(tensors["conv_in.weight"].shape[1])
    return {
        "adapter_type": "full_adapter_xl" if factor == 16 else "full_adapter",
        "in_channels": in_channels,
        "channels": [tensors[f"body.{i * per_stage}.block1.weight"].shape[0] for i in range(blocks // per_stage)],
        "num_res_blocks": per_stage,
        "downscale_factor": factor,
    }


def _read_source(source: str | Path) -> tuple[TensorFile, dict[str, Any] | None]:
    """The tensors of a T2I-Adapter folder, file or Hub id, and its config if it has one."""
    path = Path(source).expanduser()
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        from huggingface_hub import snapshot_download

        try:
            path = Path(str(snapshot_download(str(source), allow_patterns=["config.json", _WEIGHTS[0]])))
        except (OSError, ValueError) as error:
            raise SourceError(f"{source} is not a local file or folder, and downloading it failed: {error}") from error
    if path.is_dir():
        weights = next((path / name for name in _WEIGHTS if (path / name).is_file()), None)
        if weights is None or not (path / "config.json").is_file():
            raise SourceError(f"{path} is not a diffusers T2IAdapter folder: it needs config.json and {_WEIGHTS[0]}")
        return TensorFile([weights]), json.loads((path / "config.json").read_text(encoding="utf-8"))
    if not path.is_file():
        raise SourceError(f"no such T2I-Adapter file, folder or Hub id: {source}")
    return TensorFile([path]), None


def _diffusers_named(source: str | Path, config: Mapping[str, Any] | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The source's tensors by diffusers' names, and its diffusers config (the folder's, given, or inferred)."""
    tensors, folder_config = _read_source(source)
    config = folder_config if folder_config is not None else config
    keys = list(tensors)
    if any(key.startswith("adapter.") for key in keys):
        return {key: tensors[key] for key in keys}, dict(config) if config is not None else _inferred_config(tensors)
    if config is None:
        config = _original_config(tensors, None)
    encoder = t2i_adapter_config(config).build(T2I_ENCODERS, device="meta")
    renaming = dict(encoder.original_names())
    named: dict[str, Tensor] = {}
    unused: list[str] = []
    for key in keys:
        module, _, parameter = key.rpartition(".")
        if module in renaming:
            named[f"{renaming[module]}.{parameter}"] = tensors[key]
        else:
            unused.append(key)
    if unused:
        raise ConversionError(
            f"{len(unused)} keys of {source} are of no {type(encoder).__name__} module (TencentARC's layout): "
            f"{', '.join(sorted(unused)[:20])}" + (f" and {len(unused) - 20} more" if len(unused) > 20 else "")
        )
    return named, dict(config)


def convert_t2i_adapter(
    source: str | Path, dest: str | Path, config: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None
) -> tuple[Path, ModelConfig]:
    """Convert a T2I-Adapter and write it, atomically, to a `.safetensors` file that records its encoder.

    Args:
        source: A diffusers `T2IAdapter` folder, a weights file (diffusers' or TencentARC's layout, `.pth` or
            `.safetensors`), or a Hub id.
        dest: The `.safetensors` file to write.
        config: The diffusers config of a file given alone (default: read from the tensors' shapes).
        dtype: Cast floating-point tensors to this dtype (default: keep the source's).

    Raises:
        ConversionError: The source does not fit; the message lists the keys that differ.
    """
    dest = Path(dest).expanduser()
    if dest.suffix != ".safetensors" or dest.is_dir():
        raise SourceError(f"the destination must be a .safetensors file, got {dest}")
    named, diffusers_config = _diffusers_named(source, config)
    model_config = t2i_adapter_config(diffusers_config)
    encoder = model_config.build(T2I_ENCODERS, device="meta")
    key_map = module_key_map(encoder, dict(encoder.diffusers_modules()))
    if unknown := sorted(key for key in named if key not in key_map.mapping):
        raise ConversionError(
            f"{len(unknown)} keys of {source} are of no {model_config.class_name} module: {', '.join(unknown[:20])}"
            + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        )
    converted = convert_state_dict(
        named,
        key_map,
        {key: tensor.shape for key, tensor in encoder.state_dict().items()},
        what=f"T2I-Adapter ({model_config.class_name})",
        dtype=dtype,
    )
    save_to_safetensors(dest, {k: v.contiguous() for k, v in converted.items()}, metadata=model_config.to_metadata())
    return dest, model_config


def compare_t2i_adapter(
    source: str | Path, converted: Path, config: Mapping[str, Any] | None = None, seed: int = 0
) -> Comparison:
    """How far the converted encoder's features are from diffusers' `T2IAdapter`'s, on the source's weights and a
    random image (the largest difference over the features, relative to the largest feature value).

    Args:
        source: What was converted (`convert_t2i_adapter`'s source).
        converted: The converted file.
        config: The diffusers config given for a file alone.
        seed: The seed of the random image.
    """
    from diffusers.models.adapter import T2IAdapter

    named, diffusers_config = _diffusers_named(source, config)
    model_config = t2i_adapter_config(diffusers_config)
    reference = T2IAdapter(**diffusers_t2i_adapter_config(model_config))
    reference.load_state_dict({key: tensor.float() for key, tensor in named.items()})
    encoder = model_config.build(T2I_ENCODERS)
    encoder.load_state_dict(load_from_safetensors(converted))
    encoder = encoder.float()
    side = 2 * max(encoder.feature_downscales)
    image = torch.rand(1, encoder.in_channels, side, side, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected: list[Tensor] = reference.eval()(image)
        actual = encoder(image)
    comparisons = [compare_outputs(e, a) for e, a in zip(expected, actual, strict=True)]
    return Comparison(max(c.max_abs_difference for c in comparisons), max(c.scale for c in comparisons))


def add_t2i_adapter_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `refiners-convert t2i-adapter --from SOURCE --to FILE [--config JSON] [--dtype DTYPE] [--check]`."""
    help = "a T2I-Adapter (diffusers T2IAdapter folder or file, TencentARC's .pth/.safetensors, or a Hub id)"
    command = commands.add_parser("t2i-adapter", help=help, description=help)
    command.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="the T2I-Adapter to convert")
    command.add_argument("--to", dest="dest", required=True, metavar="FILE", help="the .safetensors file to write")
    command.add_argument(
        "--config",
        default=None,
        metavar="JSON",
        help="the diffusers config.json of a file given alone (default: read the sizes from the tensors; TencentARC's "
        "full adapters have 2 residual blocks per stage, SDXL's unshuffle by 16)",
    )
    command.add_argument("--dtype", choices=list(_DTYPES), default=None, help="cast the weights")
    command.add_argument(
        "--check",
        action="store_true",
        help="compare the converted encoder's features with diffusers' T2IAdapter's on a random image",
    )


def run_t2i_adapter_command(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    """Run `refiners-convert t2i-adapter` (see `add_t2i_adapter_command`); returns the exit status."""
    from refiners.converters.cli import CHECK_TOLERANCE, CHECK_TOLERANCE_AFTER_CAST

    if args.check and (missing := missing_reference_packages()):
        progress(
            f"refiners-convert: error: --check needs {' and '.join(missing)}: install the reference extra "
            '(pip install "refiners-converters[reference]"), or leave --check out.'
        )
        return 1
    start = time.monotonic()
    try:
        config = None if args.config is None else json.loads(Path(args.config).read_text(encoding="utf-8"))
        dtype = None if args.dtype is None else _DTYPES[args.dtype]
        path, model_config = convert_t2i_adapter(args.source, args.dest, config, dtype)
        adapter = next(encoder for encoder in T2I_ENCODERS if encoder.__name__ == model_config.class_name).adapter
        progress(
            f"t2i-adapter: wrote {model_config} to {path} in {time.monotonic() - start:.1f} s; load it with "
            f"{adapter}(target=unet, name=..., weights={str(path)!r})"
        )
        print(path)
        if args.check:
            comparison = compare_t2i_adapter(args.source, path, config)
            tolerance = CHECK_TOLERANCE if dtype in (None, torch.float32) else CHECK_TOLERANCE_AFTER_CAST
            passed = comparison.relative <= tolerance
            progress(
                f"t2i-adapter: max abs difference {comparison.max_abs_difference:.3g} ({comparison.relative:.3g} of "
                f"the features' scale {comparison.scale:.3g}; tolerance {tolerance:g}): "
                + ("ok" if passed else "FAILED, the converted encoder does not compute what diffusers' computes")
            )
            if not passed:
                return 1
    except (ValueError, OSError) as error:
        progress(f"refiners-convert: error: {error}")
        return 1
    return 0
