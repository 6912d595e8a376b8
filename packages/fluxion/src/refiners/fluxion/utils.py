"""Tensor, image and safetensors helpers shared by every refiners package.

Safetensors files are read tensor by tensor and written atomically; loading into a model checks keys and shapes
before touching any weight. Image helpers need Pillow (`pip install "refiners-fluxion[image]"`), imported lazily.
"""

import os
import random
import uuid
import warnings
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, no_grad
from torch.nn.functional import conv2d
from torch.nn.functional import interpolate as _interpolate
from torch.nn.functional import pad as _pad

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "load_from_safetensors",
    "load_metadata_from_safetensors",
    "save_to_safetensors",
    "load_state_dict_from_safetensors",
    "LoadReport",
    "ShapeMismatch",
    "manual_seed",
    "no_grad",
    "summarize_tensor",
    "pad",
    "interpolate",
    "gaussian_blur",
    "normalize",
    "denormalize",
    "image_to_tensor",
    "tensor_to_image",
    "images_to_tensor",
    "tensor_to_images",
]

Device = torch.device | str

# How many keys an error message lists per category before it says "... and N more".
_MAX_LISTED = 10

# -- safetensors files -----------------------------------------------------------------------------------------


@contextmanager
def _open_safetensors(path: str | Path, device: Device = "cpu") -> Generator[Any]:
    """`safe_open`, with errors that name the file and say what to do."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such safetensors file: {path} (check the path and the working directory)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: pass the path of a .safetensors file inside it")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            yield handle
    except SafetensorError as error:
        raise ValueError(_invalid_file_message(path, error)) from error


def _invalid_file_message(path: Path, error: Exception) -> str:
    with path.open("rb") as file:
        head = file.read(4)
    # Pickled checkpoints start with the pickle protocol opcode; torch.save's default format is a zip archive.
    if head[:1] == b"\x80" or head == b"PK\x03\x04":
        what = "it looks like a PyTorch checkpoint (.ckpt/.pt/.bin)"
    else:
        what = "it may be truncated (an interrupted download or save) or another format"
    return (
        f"{path} is not a valid or complete safetensors file ({error}): {what}. "
        "Download or save it again, or convert a .ckpt/.bin checkpoint to safetensors with refiners-convert."
    )


def load_from_safetensors(path: str | Path, device: Device = "cpu") -> dict[str, Tensor]:
    """Load all tensors of a safetensors file.

    Args:
        path: The `.safetensors` file.
        device: Where the tensors are loaded (straight from the file, without a stop on CPU).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a valid or complete safetensors file.
    """
    with _open_safetensors(path, device) as handle:
        keys: list[str] = handle.keys()
        return {key: handle.get_tensor(key) for key in keys}


def load_metadata_from_safetensors(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header (empty if it has none); tensors are not read.

    Args:
        path: The `.safetensors` file.
    """
    with _open_safetensors(path) as handle:
        return dict(handle.metadata() or {})


def save_to_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors to a safetensors file, atomically: the file is either fully written or left as it was.

    The tensors are written to a temporary file next to `path` which then replaces `path`, so an interrupted save
    never leaves a truncated file behind (nor destroys a previous version).

    Args:
        path: The `.safetensors` file to write.
        tensors: Tensors by name (contiguous, not sharing memory with each other).
        metadata: Strings stored in the header, e.g. the source of the weights.

    Raises:
        TypeError: A value of `tensors` is not a Tensor, or a metadata entry is not a string.
    """
    path = Path(path)
    for key, value in tensors.items():
        if not isinstance(value, Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"cannot save {key!r} to {path}: it is a {type(value).__name__}, not a torch.Tensor")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"safetensors metadata maps strings to strings, got {key!r}: {value!r}; convert values with str()"
            )
    # A fresh name rather than `tempfile`: the file gets the usual permissions (tempfile's are owner-only).
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        safetensors.torch.save_file(dict(tensors), str(temporary), metadata=dict(metadata) if metadata else None)
        with temporary.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# -- loading into a model --------------------------------------------------------------------------------------


class ShapeMismatch(NamedTuple):
    """A tensor present in both the file and the model, with different shapes."""

    key: str
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass
class LoadReport:
    """What `load_state_dict_from_safetensors` did.

    Attributes:
        loaded: Keys loaded into the model.
        missing: Model keys absent from the file (left as they were).
        unexpected: File keys absent from the model (not read).
        mismatched: Keys in both, with different shapes (not read).
    """

    loaded: list[str] = field(default_factory=list[str])
    missing: list[str] = field(default_factory=list[str])
    unexpected: list[str] = field(default_factory=list[str])
    mismatched: list[ShapeMismatch] = field(default_factory=list[ShapeMismatch])

    @property
    def complete(self) -> bool:
        """Whether the file and the model had exactly the same keys and shapes."""
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """The differences, one category per line, truncated to a readable amount."""
        lines: list[str] = []
        if self.missing:
            lines.append(f"missing from the file ({len(self.missing)}): {_listing(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected in the file ({len(self.unexpected)}): {_listing(self.unexpected)}")
        if self.mismatched:
            lines.append(f"wrong shape ({len(self.mismatched)}):")
            lines.extend(
                f"  {m.key}: file {m.file_shape}, model {m.model_shape}" for m in self.mismatched[:_MAX_LISTED]
            )
            if len(self.mismatched) > _MAX_LISTED:
                lines.append(f"  ... and {len(self.mismatched) - _MAX_LISTED} more")
        return "\n".join(lines)


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown if len(keys) <= _MAX_LISTED else f"{shown}, ... and {len(keys) - _MAX_LISTED} more"


def load_state_dict_from_safetensors(module: torch.nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a safetensors file into a module's parameters and buffers, tensor by tensor.

    Keys and shapes are compared with `module.state_dict()` before any weight is touched. Each tensor is read
    straight onto the device of the weight it replaces and copied into it in place (cast to its dtype), so the
    file is never held in memory next to the model. Weights on the "meta" device (a model built without
    allocating, to skip random initialization) are replaced by new ones on CPU holding the file's values.

    Args:
        module: The model to load into.
        path: The `.safetensors` file.
        strict: Raise, before loading anything, if the keys or shapes differ. When False, load the tensors that
            fit, warn about the rest, and return the report.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a valid safetensors file, or (when strict) does not match the model.
    """
    path = Path(path)
    targets = module.state_dict(keep_vars=True)
    with _open_safetensors(path) as handle:
        keys: list[str] = handle.keys()
        file_shapes = {key: tuple[int, ...](handle.get_slice(key).get_shape()) for key in keys}
    report = _compare(file_shapes, {key: tuple(tensor.shape) for key, tensor in targets.items()})
    if strict and not report.complete:
        raise ValueError(_mismatch_message(module, path, report, file_shapes, targets))

    by_device: dict[str, list[str]] = {}
    for key in report.loaded:
        device = targets[key].device
        by_device.setdefault("cpu" if device.type == "meta" else str(device), []).append(key)
    materialized: dict[int, Tensor] = {}
    for device, keys in by_device.items():
        with _open_safetensors(path, device) as handle, torch.no_grad():
            for key in keys:
                _load_one(module, key, targets[key], handle, materialized)

    if not report.complete:
        still_meta = [key for key in report.missing if targets[key].device.type == "meta"]
        note = f"\n{len(still_meta)} missing weights are still on the meta device." if still_meta else ""
        warnings.warn(
            f"loaded {len(report.loaded)} of {len(targets)} tensors of {type(module).__name__} from {path}:\n"
            f"{report.describe()}{note}",
            stacklevel=2,
        )
    return report


def _compare(file_shapes: dict[str, tuple[int, ...]], model_shapes: dict[str, tuple[int, ...]]) -> LoadReport:
    report = LoadReport()
    for key, model_shape in model_shapes.items():
        if (file_shape := file_shapes.get(key)) is None:
            report.missing.append(key)
        elif file_shape != model_shape:
            report.mismatched.append(ShapeMismatch(key, file_shape, model_shape))
        else:
            report.loaded.append(key)
    report.unexpected = [key for key in file_shapes if key not in model_shapes]
    return report


def _mismatch_message(
    module: torch.nn.Module,
    path: Path,
    report: LoadReport,
    file_shapes: Mapping[str, tuple[int, ...]],
    targets: Mapping[str, Tensor],
) -> str:
    common = len(file_shapes) - len(report.unexpected)
    advice: list[str] = []
    if (prefix := _extra_prefix(report)) is not None:
        advice.append(
            f"The file's keys look like the model's prefixed with {prefix!r} (weights of a larger model): "
            "extract this part, e.g. with the converter that produced the file."
        )
    elif common == 0 and file_shapes:
        advice.append(
            "No key of the file belongs to the model: this file looks like weights for another model, or an "
            "unconverted checkpoint (diffusers, transformers, ...). Convert it with refiners-convert."
        )
    elif report.mismatched:
        advice.append(
            "Wrongly shaped tensors mean the model was built with other hyperparameters than the weights' "
            "(check the constructor arguments or the variant class), or that the file is for another model."
        )
    advice.append("Pass strict=False to load the tensors that fit and get a LoadReport of the rest.")
    return (
        f"cannot load {path} into {type(module).__name__}: the file's tensors do not match the model's "
        f"({len(targets)} in the model, {len(file_shapes)} in the file, {common} in common).\n"
        f"{report.describe()}\n" + " ".join(advice)
    )


def _extra_prefix(report: LoadReport) -> str | None:
    """A prefix that, stripped from the unexpected keys, gives the missing ones (`unet.` in a pipeline file)."""
    missing = set(report.missing)
    if not missing:
        return None
    counts: dict[str, int] = {}
    for key in report.unexpected:
        parts = key.split(".")
        for index in range(1, len(parts)):
            if ".".join(parts[index:]) in missing:
                prefix = ".".join(parts[:index]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    best = max(counts, key=lambda prefix: counts[prefix], default=None)
    return best if best is not None and counts[best] >= len(missing) / 2 else None


def _owner(module: torch.nn.Module, key: str) -> tuple[torch.nn.Module, str]:
    """The submodule that holds `key`'s weight, and the weight's attribute name there."""
    owner_path, _, name = key.rpartition(".")
    try:
        owner = module.get_submodule(owner_path)
    except AttributeError as error:
        raise ValueError(
            f"cannot materialize {key!r} of {type(module).__name__}: no submodule {owner_path!r}"
        ) from error
    if name not in owner._parameters and name not in owner._buffers:
        raise ValueError(f"cannot materialize {key!r}: {type(owner).__name__} has no parameter or buffer {name!r}")
    return owner, name


def _load_one(module: torch.nn.Module, key: str, target: Tensor, handle: Any, materialized: dict[int, Tensor]) -> None:
    # One tensor at a time, released on return: the file is never fully in memory next to the model.
    if target.device.type != "meta":
        target.copy_(handle.get_tensor(key))
        return
    owner, name = _owner(module, key)
    current: Tensor | None = owner._parameters.get(name)
    if current is None:
        current = owner._buffers[name]
        assert current is not None, f"{key} is a None buffer, which state_dict() does not list"
    if (replacement := materialized.get(id(current))) is None:
        value = handle.get_tensor(key).to(dtype=current.dtype)
        if isinstance(current, torch.nn.Parameter):
            replacement = torch.nn.Parameter(value, requires_grad=current.requires_grad)
        else:
            replacement = value
        # Tied weights (one tensor at two keys) stay tied: their other owners get the same new tensor.
        materialized[id(current)] = replacement
    else:
        replacement.copy_(handle.get_tensor(key))
    if isinstance(replacement, torch.nn.Parameter):
        owner._parameters[name] = replacement
    else:
        owner._buffers[name] = replacement


# -- tensors ---------------------------------------------------------------------------------------------------


def manual_seed(seed: int) -> None:
    """Seed torch (CPU and every GPU) and Python's `random`, for reproducible runs.

    Args:
        seed: The seed.
    """
    random.seed(seed)
    torch.manual_seed(seed)


def summarize_tensor(tensor: Tensor, /) -> str:
    """A one-line description of a tensor, for error messages and debugging.

    Shape, dtype and device; for real tensors with values, min/max (and mean/std for floating ones) over the
    finite values, and the count of NaN and infinite values.

    Args:
        tensor: The tensor to describe.

    Example:
        ```py
        import torch
        from refiners.fluxion.utils import summarize_tensor

        text = summarize_tensor(torch.tensor([[1.0, float("nan")], [3.0, 5.0]]))
        assert text == "Tensor(shape=(2, 2), dtype=float32, device=cpu, min=1, max=5, mean=3, std=2, nan=1)"
        ```
    """
    info = [
        f"shape=({', '.join(map(str, tensor.shape))})",
        f"dtype={str(tensor.dtype).removeprefix('torch.')}",
        f"device={tensor.device}",
    ]
    if tensor.requires_grad:
        info.append("requires_grad=True")
    if tensor.device.type != "meta" and tensor.numel() > 0 and not tensor.is_complex() and tensor.dtype != torch.bool:
        with torch.no_grad():
            info.extend(_statistics(tensor.detach()))
    return f"Tensor({', '.join(info)})"


def _statistics(tensor: Tensor) -> list[str]:
    if not tensor.is_floating_point():
        return [f"min={tensor.min().item()}", f"max={tensor.max().item()}"]
    values = tensor.float()
    finite = values[values.isfinite()]
    stats: list[str] = []
    if finite.numel() > 0:
        stats += [f"min={finite.min().item():.4g}", f"max={finite.max().item():.4g}"]
        stats.append(f"mean={finite.mean().item():.4g}")
        if finite.numel() > 1:
            stats.append(f"std={finite.std().item():.4g}")
    if (nans := int(values.isnan().sum().item())) > 0:
        stats.append(f"nan={nans}")
    if (infs := int(values.isinf().sum().item())) > 0:
        stats.append(f"inf={infs}")
    return stats


def pad(x: Tensor, pad: Sequence[int], value: float = 0.0, mode: str = "constant") -> Tensor:
    """Pad the last dimensions of a tensor (`torch.nn.functional.pad`).

    Args:
        x: The tensor to pad.
        pad: Sizes in pairs, last dimension first: `(left, right)`, `(left, right, top, bottom)`, ...
        value: The fill value for `mode="constant"`.
        mode: `"constant"`, `"reflect"`, `"replicate"` or `"circular"`.
    """
    if len(pad) % 2 != 0:
        raise ValueError(f"pad takes sizes in (before, after) pairs, last dimension first; got {tuple(pad)}")
    return _pad(x, tuple(pad), mode=mode, value=value if mode == "constant" else None)


def interpolate(
    x: Tensor,
    size: int | Sequence[int] | None = None,
    mode: str = "nearest",
    *,
    scale_factor: float | None = None,
    antialias: bool = False,
) -> Tensor:
    """Resize the spatial dimensions of a batch (`torch.nn.functional.interpolate`), to a size or by a factor.

    Args:
        x: The batch, `batch x channels x *spatial`.
        size: The output spatial size (give this or `scale_factor`).
        mode: `"nearest"`, `"bilinear"`, `"bicubic"`, `"nearest-exact"`, `"area"`, ...
        scale_factor: The ratio of output to input size (give this or `size`).
        antialias: Anti-alias when downsampling (bilinear and bicubic modes).
    """
    if (size is None) == (scale_factor is None):
        raise ValueError(
            f"interpolate needs exactly one of size and scale_factor, got size={size}, scale_factor={scale_factor}"
        )
    return _interpolate(
        x,
        size=size if size is None or isinstance(size, int) else tuple(size),
        scale_factor=scale_factor,
        mode=mode,
        antialias=antialias,
    )


def gaussian_blur(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    sigma: float | tuple[float, float] | None = None,
) -> Tensor:
    """Blur the last two dimensions with a Gaussian kernel, reflecting at the borders (as torchvision does).

    Args:
        x: A floating tensor, `*batch x height x width`.
        kernel_size: Odd kernel size, or `(width, height)` sizes.
        sigma: Standard deviation, or `(x, y)` ones. Default (as OpenCV and torchvision):
            `0.3 * ((kernel_size - 1) / 2 - 1) + 0.8`.
    """
    if not x.is_floating_point():
        raise TypeError(f"gaussian_blur needs a floating tensor, got {summarize_tensor(x)}; convert it with .float()")
    kx, ky = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if kx <= 0 or ky <= 0 or kx % 2 == 0 or ky % 2 == 0:
        raise ValueError(f"gaussian_blur needs odd positive kernel sizes, got {kernel_size}")
    if sigma is None:
        sx, sy = 0.3 * ((kx - 1) * 0.5 - 1) + 0.8, 0.3 * ((ky - 1) * 0.5 - 1) + 0.8
    else:
        sx, sy = (sigma, sigma) if isinstance(sigma, int | float) else sigma
    if sx <= 0 or sy <= 0:
        raise ValueError(f"gaussian_blur needs a positive sigma, got {sigma}")
    height, width = x.shape[-2:]
    if ky // 2 >= height or kx // 2 >= width:
        raise ValueError(
            f"kernel_size {kernel_size} is too large for a {height}x{width} input: reflection padding needs "
            f"kernel_size // 2 < size; use a smaller kernel"
        )
    kernel = torch.outer(_gaussian_kernel_1d(ky, sy), _gaussian_kernel_1d(kx, sx))
    planes = x.reshape(-1, 1, height, width)
    planes = _pad(planes, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    blurred = conv2d(planes, kernel.to(device=x.device, dtype=x.dtype)[None, None])
    return blurred.reshape(x.shape)


def _gaussian_kernel_1d(size: int, sigma: float) -> Tensor:
    half = (size - 1) / 2
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, size, dtype=torch.float64) / sigma) ** 2)
    return pdf / pdf.sum()


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel `(x - mean) / std` of images, `*batch x channels x height x width` (e.g. ImageNet statistics).

    Args:
        x: The images.
        mean: One mean per channel.
        std: One standard deviation per channel.
    """
    mean_t, std_t = _channel_statistics(x, mean, std)
    return (x - mean_t) / std_t


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The inverse of `normalize`: per-channel `x * std + mean`.

    Args:
        x: The normalized images, `*batch x channels x height x width`.
        mean: One mean per channel.
        std: One standard deviation per channel.
    """
    mean_t, std_t = _channel_statistics(x, mean, std)
    return x * std_t + mean_t


def _channel_statistics(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    channels = x.shape[-3] if x.ndim >= 3 else None
    if channels is None or len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"normalize needs one mean and one std per channel of a (*batch, channels, height, width) tensor, got "
            f"{len(mean)} means and {len(std)} stds for {summarize_tensor(x)}"
        )
    dtype = x.dtype if x.is_floating_point() else torch.float32
    mean_t = torch.tensor(mean, device=x.device, dtype=dtype)[:, None, None]
    std_t = torch.tensor(std, device=x.device, dtype=dtype)[:, None, None]
    return mean_t, std_t


# -- images ----------------------------------------------------------------------------------------------------

_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_MODES = {channels: mode for mode, channels in _CHANNELS.items()}


def image_to_tensor(image: "Image.Image", device: Device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """A PIL image as a `1 x channels x height x width` tensor in [0, 1].

    Args:
        image: An "RGB" (3 channels), "RGBA" (4), "L" (1) or "LA" (2) image.
        device: Where the tensor goes.
        dtype: A floating dtype (default float32).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"image_to_tensor makes values in [0, 1]: it needs a floating dtype, got {dtype}")
    if (channels := _CHANNELS.get(image.mode)) is None:
        raise ValueError(
            f"image_to_tensor supports modes {', '.join(_CHANNELS)}; got a {image.mode!r} image: "
            "convert it first, e.g. `image.convert('RGB')`"
        )
    width, height = image.size
    data = image.tobytes()
    # Pillow gives interleaved bytes (height x width x channels); bytearray: torch needs a writable buffer.
    pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    pixels = pixels.view(height, width, channels).permute(2, 0, 1).unsqueeze(0)
    return (pixels.to(device=device, dtype=torch.float32) / 255).to(dtype=dtype or torch.float32)


def tensor_to_image(tensor: Tensor) -> "Image.Image":
    """A `1 x channels x height x width` tensor in [0, 1] as a PIL image: values are clamped to [0, 1] and rounded.

    Args:
        tensor: 1 channel gives an "L" image, 2 "LA", 3 "RGB" and 4 "RGBA".
    """
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            'tensor_to_image needs Pillow: install it with `pip install "refiners-fluxion[image]"`'
        ) from error

    if tensor.ndim != 4 or tensor.shape[0] != 1 or (mode := _MODES.get(tensor.shape[1])) is None:
        raise ValueError(
            "tensor_to_image takes a 1 x channels x height x width tensor with 1, 2, 3 or 4 channels, got "
            f"{summarize_tensor(tensor)}; use tensor_to_images for a batch"
        )
    if tensor.is_floating_point() and bool(tensor.isnan().any()):
        raise ValueError(f"tensor_to_image got NaN values: {summarize_tensor(tensor)}")
    pixels = (tensor.detach()[0].float().clamp(0, 1) * 255).round().byte()
    height, width = pixels.shape[1:]
    # A fresh contiguous copy owns exactly its bytes, in Pillow's interleaved order: height x width x channels.
    interleaved = pixels.permute(1, 2, 0).cpu().clone(memory_format=torch.contiguous_format)
    return Image.frombytes(mode, (width, height), bytes(interleaved.untyped_storage()))


def images_to_tensor(
    images: Sequence["Image.Image"], device: Device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """PIL images of the same size and mode as a `batch x channels x height x width` tensor in [0, 1].

    Args:
        images: The images (see `image_to_tensor` for the modes).
        device: Where the tensor goes.
        dtype: A floating dtype (default float32).
    """
    if not images:
        raise ValueError("images_to_tensor needs at least one image")
    if len({(image.size, image.mode) for image in images}) > 1:
        found = ", ".join(f"{image.mode} {image.size[0]}x{image.size[1]}" for image in images[:_MAX_LISTED])
        raise ValueError(
            f"images_to_tensor needs images of one size and mode, got: {found}; resize or convert them first"
        )
    return torch.cat([image_to_tensor(image, device=device, dtype=dtype) for image in images])


def tensor_to_images(tensor: Tensor) -> list["Image.Image"]:
    """A `batch x channels x height x width` tensor in [0, 1] as PIL images (see `tensor_to_image`).

    Args:
        tensor: The batch.
    """
    if tensor.ndim != 4:
        raise ValueError(
            f"tensor_to_images takes a batch x channels x height x width tensor, got {summarize_tensor(tensor)}"
        )
    return [tensor_to_image(image.unsqueeze(0)) for image in tensor]
