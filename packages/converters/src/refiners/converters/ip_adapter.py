"""Original (h94) IP-Adapter files to refiners weights: what `refiners-convert ip-adapter` runs.

A source is an IP-Adapter file as h94 publishes it (`.bin`: `{"image_proj": ..., "ip_adapter": ...}`, or flat
`.safetensors`), base, plus or FaceID, for SD1.5 or SDXL, or its Hub path (`h94/IP-Adapter/models/ip-adapter_sd15.bin`:
only that file is downloaded). The conversion is `refiners.adapters.ip_adapter.convert_h94_ip_adapter`, the one the
adapters run when given an original file: the projection's parameters under their module paths, the cross-attentions
numbered in order, a FaceID file's LoRA kept beside them; every key of the file is used, or the conversion fails
listing those that are not. The file is written atomically, with the projection's constructor call in its metadata:
`SD1IPAdapter(target=sd.unet, weights=FILE)` (or `SDXLIPAdapter`) loads it, and refuses it for another family's UNet.
"""

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from refiners.adapters.ip_adapter import IPAdapterWeights, convert_h94_ip_adapter
from refiners.adapters.ip_adapter import read_ip_adapter_weights as read_h94_weights
from refiners.converters.sources import SourceError
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors

__all__ = ["convert_ip_adapter", "add_ip_adapter_command", "run_ip_adapter_command"]

_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")
_HUB_PATH = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)+")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FAMILIES = {768: "SD1IPAdapter", 2048: "SDXLIPAdapter"}


def _download(hub_path: str) -> Path:
    from huggingface_hub import hf_hub_download

    parts = hub_path.split("/")
    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except (OSError, ValueError) as error:  # huggingface_hub's HTTP, offline and validation errors
        raise SourceError(
            f"{hub_path} is not a local file, and downloading it from the Hugging Face Hub failed: {error}"
        ) from error


def _source_file(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.exists() and _HUB_PATH.fullmatch(str(source)) and path.suffix in _SUFFIXES:
        path = _download(str(source))
    if not path.is_file():
        raise SourceError(
            f"no such file: {source} (pass an IP-Adapter file, or its Hub path such as "
            "h94/IP-Adapter/models/ip-adapter_sd15.bin)"
        )
    if path.suffix not in _SUFFIXES:
        raise SourceError(f"{path} is not an IP-Adapter file: expected one of {', '.join(_SUFFIXES)}")
    if path.suffix == ".safetensors" and ModelConfig.from_metadata(load_metadata_from_safetensors(path)) is not None:
        raise SourceError(
            f"{path} already holds refiners weights (written by refiners-convert): load it with "
            f"SD1IPAdapter(target=sd.unet, weights={str(path)!r}) (or SDXLIPAdapter) instead of converting it again"
        )
    return path


def convert_ip_adapter(
    source: str | Path, dest: str | Path, dtype: torch.dtype | None = None
) -> tuple[Path, IPAdapterWeights]:
    """Convert an original IP-Adapter file and write it, atomically, to a `.safetensors` file with its metadata.

    Args:
        source: The file (`.bin`, `.safetensors`), or its Hub path (`org/name/path/in/the/repository.bin`).
        dest: The `.safetensors` file to write (its folder is created if needed).
        dtype: Cast the tensors to this dtype (default: keep the source's).

    Returns:
        The file written and the weights it holds.

    Raises:
        SourceError: The source cannot be found or read, or already holds refiners weights.
        ValueError: The file is not an IP-Adapter of a supported kind, or has tensors nothing uses (listed).
    """
    path = Path(dest).expanduser()
    if path.suffix != ".safetensors" or path.is_dir():
        raise SourceError(f"the destination must be a .safetensors file, got {dest}")
    weights = convert_h94_ip_adapter(read_h94_weights(_source_file(source)))
    tensors = {
        key: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
        for key, tensor in weights.tensors.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_to_safetensors(path, tensors, weights.projection.to_metadata())
    return path, IPAdapterWeights(weights.projection, tensors)


def add_ip_adapter_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `refiners-convert ip-adapter --from SOURCE --to FILE [--dtype DTYPE]` to `refiners-convert`'s commands."""
    help = "an IP-Adapter file as h94 publishes it (base, plus, FaceID; SD1.5 or SDXL), for SD1IPAdapter/SDXLIPAdapter"
    command = commands.add_parser("ip-adapter", help=help, description=help)
    command.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help="an IP-Adapter .bin or .safetensors file, or its Hub path (h94/IP-Adapter/models/ip-adapter_sd15.bin)",
    )
    command.add_argument("--to", dest="dest", required=True, metavar="FILE", help="the .safetensors file to write")
    command.add_argument(
        "--dtype", choices=list(_DTYPES), default=None, help="cast the weights (default: keep the source's)"
    )


def run_ip_adapter_command(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    """Run `refiners-convert ip-adapter` (see `add_ip_adapter_command`); returns the exit status."""
    start = time.monotonic()
    try:
        path, weights = convert_ip_adapter(
            args.source, args.dest, _DTYPES[args.dtype] if args.dtype is not None else None
        )
    except (ValueError, OSError) as error:
        progress(f"refiners-convert: error: {error}")
        return 1
    width = weights.context_embedding_dim
    adapter = _FAMILIES.get(width, "SD1IPAdapter or SDXLIPAdapter")
    kind = weights.kind
    lora = " and its LoRA (add `ip_adapter.lora` to the model)" if weights.lora_tensors() else ""
    progress(
        f"ip-adapter: wrote {len(weights.tensors)} tensors ({kind}: {weights.projection}{lora}; "
        f"{weights.cross_attention_count} cross-attentions of {width}-wide context) to {path} in "
        f"{time.monotonic() - start:.1f} s; load it with {adapter}(target=unet, weights={str(path)!r})"
    )
    print(path)
    return 0
