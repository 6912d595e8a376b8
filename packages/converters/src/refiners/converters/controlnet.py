"""ControlNets to `SD1Controlnet` / `SDXLControlnet` weights: diffusers' `ControlNetModel` and lllyasviel's files.

The key map is derived from the ControlNet's structure, as the UNet's: its encoder half is named as diffusers names a
UNet's (`diffusers_encoder_modules`), then the condition encoder (`controlnet_cond_embedding.conv_in`, `.blocks.{i}`,
`.conv_out`) and the zero convolutions (`controlnet_down_blocks.{i}`, `controlnet_mid_block`), in the order the model
holds them. The original layout (`control_model.input_blocks...`, `input_hint_block.{2i}`, `zero_convs.{i}.0`,
`middle_block_out.0`) is renamed to diffusers' by the UNet's original renaming (`ldm_unet_renaming`), read from the
file's own blocks, plus those three. The sizes come from the diffusers config (a folder's `config.json`, or
`--config`), else from the tensors' shapes; the file written records them (`ModelConfig`), so that
`SD1ControlnetAdapter(weights=FILE)` builds the ControlNet from the file alone.
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

import refiners.fluxion.layers as fl
from refiners.adapters.controlnet import CONTROL_LORA_MARKER, Controlnet, SD1Controlnet, SDXLControlnet
from refiners.converters.engine import ConversionError, convert_state_dict
from refiners.converters.sources import SourceError, TensorFile
from refiners.converters.unet import module_key_map
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.latent_diffusion.unet_names import (
    ModuleRenaming,
    diffusers_encoder_modules,
    ldm_unet_renaming,
)

__all__ = [
    "diffusers_controlnet_modules",
    "original_controlnet_renaming",
    "controlnet_config",
    "convert_controlnet",
    "add_controlnet_command",
    "run_controlnet_command",
]

_ORIGINAL_PREFIX = "control_model."
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def diffusers_controlnet_modules(controlnet: Controlnet) -> dict[str, fl.WeightedModule]:
    """Every layer with weights of a ControlNet, by the name of the module of diffusers' `ControlNetModel` that plays
    its role.

    Args:
        controlnet: The ControlNet (its weights are not read: it may live on the "meta" device).
    """
    pairs = diffusers_encoder_modules(controlnet, controlnet.extra_diffusers_modules())
    first, *blocks, last = controlnet.condition_encoder.layers(fl.Conv2d)
    pairs += [("controlnet_cond_embedding.conv_in", first), ("controlnet_cond_embedding.conv_out", last)]
    pairs += [(f"controlnet_cond_embedding.blocks.{i}", conv) for i, conv in enumerate(blocks)]
    *skips, middle = controlnet.residual_projections.layers(fl.Conv2d)
    pairs += [(f"controlnet_down_blocks.{i}", conv) for i, conv in enumerate(skips)]
    pairs.append(("controlnet_mid_block", middle))
    return dict(pairs)


def original_controlnet_renaming(controlnet: Controlnet) -> ModuleRenaming:
    """The original layout's module paths of `controlnet` (lllyasviel's `cldm`, without `control_model.`) and
    diffusers'.

    Args:
        controlnet: The ControlNet (its weights are not read).
    """
    topology = controlnet.topology
    encoder_convs = len(list(controlnet.condition_encoder.layers(fl.Conv2d)))
    return _renaming_of(type(controlnet), topology.layers_per_block, topology.attention_levels, encoder_convs)


def _per_level(value: Any, levels: int) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,) * levels  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]


def controlnet_config(config: Mapping[str, Any]) -> ModelConfig:
    """The `SD1Controlnet` or `SDXLControlnet` of a diffusers `ControlNetModel` config (its `config.json`).

    Raises:
        ConversionError: The config asks for what these models do not do; the message lists it.
    """
    unsupported = {
        "global_pool_conditions": (config.get("global_pool_conditions", False), False),
        "controlnet_conditioning_channel_order": (config.get("controlnet_conditioning_channel_order", "rgb"), "rgb"),
        "class_embed_type": (config.get("class_embed_type"), None),
        "time_cond_proj_dim": (config.get("time_cond_proj_dim"), None),
        "encoder_hid_dim": (config.get("encoder_hid_dim"), None),
    }
    if wrong := [
        f"{name}={value!r} (expected {expected!r})"
        for name, (value, expected) in unsupported.items()
        if value != expected
    ]:
        raise ConversionError(f"this ControlNet config is not supported: {', '.join(wrong)}")
    channels = tuple(config["block_out_channels"])
    levels = len(channels)
    attention_levels = tuple("CrossAttn" in name for name in config["down_block_types"])
    heads = _per_level(config.get("num_attention_heads") or config["attention_head_dim"], levels)
    common: dict[str, Any] = {
        "in_channels": config.get("in_channels", 4),
        "channels": channels,
        "context_embedding_dim": config["cross_attention_dim"],
        "condition_channels": config.get("conditioning_channels", 3),
        "condition_encoder_channels": tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
    }
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        return ModelConfig.of(
            SDXLControlnet,
            **common,
            attention_levels=attention_levels,
            transformer_depths=_per_level(config.get("transformer_layers_per_block", 1), levels),
            num_attention_heads=heads,
            pooled_embedding_dim=config["projection_class_embeddings_input_dim"] - 6 * time_dim,
            time_embedding_dim=time_dim,
            layers_per_block=config.get("layers_per_block", 2),
        )
    sd1 = (
        attention_levels,
        levels,
        config.get("layers_per_block", 2),
        len(set(heads)),
        config.get("addition_embed_type"),
    )
    if sd1 != ((True, True, True, False), 4, 2, 1, None) or config.get("use_linear_projection", False):
        raise ConversionError(
            f"this ControlNet is neither SD1.x's (4 resolutions, attention at the first three, 2 layers per block, "
            f"1x1 projections) nor SDXL's (text-time embedding): down_block_types={config['down_block_types']}, "
            f"layers_per_block={config.get('layers_per_block')}, use_linear_projection="
            f"{config.get('use_linear_projection')}"
        )
    return ModelConfig.of(SD1Controlnet, **common, num_attention_heads=heads[0])


def _original_levels(keys: list[str]) -> tuple[int, tuple[bool, ...]]:
    """`layers_per_block` and the attention levels of an original-layout ControlNet, read from its `input_blocks`."""
    blocks: dict[int, set[str]] = {}
    for key in keys:
        if match := re.match(r"input_blocks\.(\d+)\.(\d+)\.(\w+)", key):
            blocks.setdefault(int(match[1]), set()).add(f"{match[2]}.{match[3]}")
    levels: list[list[set[str]]] = [[]]
    for index in sorted(blocks)[1:]:  # block 0 is conv_in
        if "0.op" in blocks[index]:
            levels.append([])
        else:
            levels[-1].append(blocks[index])
    layers_per_block = len(levels[0])
    return layers_per_block, tuple(any(any(m.startswith("1.") for m in block) for block in level) for level in levels)


def _inferred_config(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """A diffusers config read from the tensors' shapes (diffusers names), with SD's head counts (8 for SD1.x; 64
    channels per head otherwise)."""
    levels = 1 + max(int(m[1]) for key in tensors if (m := re.match(r"down_blocks\.(\d+)\.", key)))
    channels = [tensors[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in tensors) for i in range(levels)]
    first_attention = next(k for k in tensors if k.endswith("attn2.to_k.weight"))
    context = tensors[first_attention].shape[1]
    depths = [
        1
        + max(
            (
                int(m[1])
                for k in tensors
                if (m := re.match(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.", k))
            ),
            default=0,
        )
        for i in range(levels)
    ]
    encoder = [tensors["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    encoder += [
        tensors[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0]
        for i in range(
            sum(1 for k in tensors if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k)) // 2
        )
    ]
    config: dict[str, Any] = {
        "in_channels": tensors["conv_in.weight"].shape[1],
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "layers_per_block": 1
        + max(int(m[1]) for k in tensors if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))),
        "cross_attention_dim": context,
        "attention_head_dim": 8 if context == 768 else [width // 64 for width in channels],
        "transformer_layers_per_block": depths,
        "conditioning_channels": tensors["controlnet_cond_embedding.conv_in.weight"].shape[1],
        "conditioning_embedding_out_channels": encoder,
    }
    if "add_embedding.linear_1.weight" in tensors:
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": tensors["add_embedding.linear_1.weight"].shape[1],
            "use_linear_projection": True,
        }
    return config


def _read_source(source: str | Path) -> tuple[TensorFile, dict[str, Any] | None, str]:
    """The tensors of a ControlNet folder, file or Hub id, its config if it has one, and where they were read."""
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
            raise SourceError(
                f"{path} is not a diffusers ControlNetModel folder: it needs config.json and {_WEIGHTS[0]}"
            )
        return TensorFile([weights]), json.loads((path / "config.json").read_text(encoding="utf-8")), str(path)
    if not path.is_file():
        raise SourceError(f"no such ControlNet file, folder or Hub id: {source}")
    return TensorFile([path]), None, str(path)


def convert_controlnet(
    source: str | Path, dest: str | Path, config: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None
) -> tuple[Path, ModelConfig]:
    """Convert a ControlNet and write it, atomically, to a `.safetensors` file that records its model.

    Args:
        source: A diffusers `ControlNetModel` folder, a weights file (diffusers' or the original layout, `.pth` or
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
    tensors, folder_config, _ = _read_source(source)
    config = folder_config if folder_config is not None else config
    keys = list(tensors)
    if CONTROL_LORA_MARKER in keys:
        raise ConversionError(
            f"{source} is a Control-LoRA (it has {CONTROL_LORA_MARKER!r}): it needs no conversion, load it with "
            f"SDXLControlnetAdapter.from_control_lora(target=sdxl.unet, weights={str(source)!r})"
        )
    original = any(key.removeprefix(_ORIGINAL_PREFIX).startswith("input_hint_block.") for key in keys)
    named: dict[str, Tensor]
    if original:
        stripped = {key.removeprefix(_ORIGINAL_PREFIX): key for key in keys}
        layers_per_block, attention_levels = _original_levels(list(stripped))
        kind = SDXLControlnet if any(key.startswith("label_emb.") for key in stripped) else SD1Controlnet
        encoder_convs = sum(1 for key in stripped if re.fullmatch(r"input_hint_block\.\d+\.weight", key))
        renaming = _renaming_of(kind, layers_per_block, attention_levels, encoder_convs)
        named, unused = {}, []
        for short, key in stripped.items():
            renamed = renaming.to_diffusers(short)
            if renamed is None:
                unused.append(key)
            else:
                named[renamed] = tensors[key]
        if unused:
            raise ConversionError(
                f"{len(unused)} keys of {source} are of no ControlNet module: {', '.join(sorted(unused)[:20])}"
            )
    else:
        named = {key: tensors[key] for key in keys}
    model_config = controlnet_config(config if config is not None else _inferred_config(named))
    controlnet = model_config.build((SD1Controlnet, SDXLControlnet), device="meta")
    key_map = module_key_map(controlnet, diffusers_controlnet_modules(controlnet))
    if unknown := sorted(key for key in named if key not in key_map.mapping):
        raise ConversionError(
            f"{len(unknown)} keys of {source} are of no {model_config.class_name} module: {', '.join(unknown[:20])}"
            + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        )
    converted = convert_state_dict(
        named,
        key_map,
        {key: tensor.shape for key, tensor in controlnet.state_dict().items()},
        what=f"ControlNet (for {model_config.class_name})",
        dtype=dtype,
    )
    save_to_safetensors(dest, {k: v.contiguous() for k, v in converted.items()}, metadata=model_config.to_metadata())
    return dest, model_config


def _renaming_of(
    kind: type[Controlnet], layers_per_block: int, attention_levels: tuple[bool, ...], encoder_convs: int
) -> ModuleRenaming:
    """The original renaming of a ControlNet of this shape (its widths do not matter to the names): the UNet's, plus
    `input_hint_block` (one Sequential, a SiLU after each convolution but the last), `zero_convs.{i}.0` and
    `middle_block_out.0`."""
    levels = len(attention_levels)
    hint = [("input_hint_block.0", "controlnet_cond_embedding.conv_in")]
    hint += [
        (f"input_hint_block.{2 * (i + 1)}", f"controlnet_cond_embedding.blocks.{i}") for i in range(encoder_convs - 2)
    ]
    hint.append((f"input_hint_block.{2 * (encoder_convs - 1)}", "controlnet_cond_embedding.conv_out"))
    skips = 1 + levels * layers_per_block + levels - 1
    zero = [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(skips)]
    extra = [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
    extra = extra if kind is SDXLControlnet else []
    return ldm_unet_renaming(
        layers_per_block, attention_levels, [*extra, *hint, *zero, ("middle_block_out.0", "controlnet_mid_block")]
    )


def add_controlnet_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `refiners-convert controlnet --from SOURCE --to FILE [--config JSON] [--dtype DTYPE]`."""
    help = "a ControlNet (diffusers ControlNetModel folder or file, lllyasviel's .pth/.safetensors, or a Hub id)"
    command = commands.add_parser("controlnet", help=help, description=help)
    command.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="the ControlNet to convert")
    command.add_argument("--to", dest="dest", required=True, metavar="FILE", help="the .safetensors file to write")
    command.add_argument(
        "--config",
        default=None,
        metavar="JSON",
        help="the diffusers config.json of a file given alone (default: "
        "read the sizes from the tensors, with Stable Diffusion's numbers of attention heads)",
    )
    command.add_argument("--dtype", choices=list(_DTYPES), default=None, help="cast the weights")


def run_controlnet_command(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    """Run `refiners-convert controlnet` (see `add_controlnet_command`); returns the exit status."""
    start = time.monotonic()
    try:
        config = None if args.config is None else json.loads(Path(args.config).read_text(encoding="utf-8"))
        dtype = None if args.dtype is None else _DTYPES[args.dtype]
        path, model_config = convert_controlnet(args.source, args.dest, config, dtype)
    except (ValueError, OSError) as error:
        progress(f"refiners-convert: error: {error}")
        return 1
    adapter = "SDXLControlnetAdapter" if model_config.class_name == SDXLControlnet.__name__ else "SD1ControlnetAdapter"
    progress(
        f"controlnet: wrote {model_config} to {path} in {time.monotonic() - start:.1f} s; load it with "
        f"{adapter}(target=unet, name=..., weights={str(path)!r})"
    )
    print(path)
    return 0
