"""Where a checkpoint's tensors come from: a diffusers folder, a single file, or a Hugging Face Hub repository.

`open_source` resolves what a user passes as `--from`:

- a diffusers model folder (`model_index.json`, one subfolder per component: `unet/`, `vae/`, `text_encoder/`,
  `tokenizer/`), or one component's folder (`config.json` and its weights);
- a single file: `.safetensors`, or a pickled `.ckpt`/`.pt`/`.pth`/`.bin` (read with `torch.load(weights_only=True)`,
  its nested `state_dict` unwrapped), holding a whole original-layout checkpoint or one component's weights;
- a Hub id (`org/name`), of which only the files the conversion needs are downloaded (`snapshot_download` with
  `allow_patterns`), into the Hub cache.

A component's weights are read from the first of these files its folder has: `{name}.safetensors`, a sharded
`{name}.safetensors.index.json`, the fp16 variant `{name}.fp16.safetensors` (or its sharded index), `{name}.bin`,
`{name}.fp16.bin`, where `{name}` is `diffusion_pytorch_model` (diffusers) or `model` (transformers). Tensors are
read one at a time when accessed (`TensorFile`), so a conversion never holds a whole checkpoint next to its output.

What `refiners-convert` wrote (a folder of refiners `.safetensors` files, or one of them) is refused with how to load
it instead: refiners weights are told apart by their keys, module paths of class names (`DownBlocks.Chain_1...`).
"""

import json
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.clip.tokenizer import CLIPTokenizer

__all__ = [
    "SourceError",
    "TensorFile",
    "DiffusersFolder",
    "SingleFile",
    "Source",
    "COMPONENT_CLASSES",
    "open_source",
    "locate_tokenizer",
    "read_tokenizer",
]

COMPONENT_CLASSES: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
}
"""The classes a component folder's `config.json` may name (diffusers' `_class_name`, transformers' `architectures`)."""

_WEIGHTS_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_TOKENIZER_JSON = "tokenizer.json"  # what transformers 5 saves (without the two above)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
# A module path of class names (`Chain_1`, `Conv2d`), then the parameter's or buffer's name.
_REFINERS_KEY = re.compile(r"(?:[A-Z]\w*\.)+\w+")
_REFINERS_MODELS = {"unet": "SD1UNet", "vae": "SD1Autoencoder", "text_encoder": "CLIPTextEncoderL"}


class SourceError(ValueError):
    """A source that cannot be read as asked: its message says what is missing or unreadable, and what to do."""


def _weight_candidates(name: str) -> list[list[str]]:
    """File patterns of a component's weights, in order of preference; each entry is one way to store them."""
    return [
        [f"{name}.safetensors"],
        [f"{name}.safetensors.index.json", f"{name}-*.safetensors"],
        [f"{name}.fp16.safetensors"],
        [f"{name}.safetensors.index.fp16.json", f"{name}-*.fp16.safetensors"],
        [f"{name}.bin"],
        [f"{name}.fp16.bin"],
    ]


class TensorFile(Mapping[str, Tensor]):
    """The tensors of a checkpoint, possibly sharded into several files, read one at a time when accessed.

    safetensors files are opened lazily (a tensor's bytes are read when it is accessed). Pickled files are loaded
    with `torch.load(weights_only=True)`, memory-mapped when their format allows; a top-level `state_dict` entry
    (PyTorch Lightning checkpoints, e.g. the original Stable Diffusion `.ckpt`) is unwrapped.

    Args:
        paths: The files; a key must not appear in two of them.

    Raises:
        SourceError: A file cannot be read, is not a mapping of tensors, or repeats another file's key.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[str, Tensor] = {}
        self._file_of: dict[str, Path] = {}
        for path in self.paths:
            keys = self._open(path)
            if repeated := [key for key in keys if key in self._file_of]:
                raise SourceError(f"{path} repeats keys of {self._file_of[repeated[0]]}: {', '.join(repeated[:5])}")
            self._file_of.update((key, path) for key in keys)

    def _open(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            load_metadata_from_safetensors(path)  # a clear error for a missing, truncated or mislabeled file
            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
            return list(handle.keys())
        tensors = _load_pickle(path)
        self._pickled.update(tensors)
        return list(tensors)

    def __getitem__(self, key: str) -> Tensor:
        path = self._file_of[key]
        if (handle := self._handles.get(path)) is not None:
            return handle.get_tensor(key)
        return self._pickled[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of `key`'s tensor, read from the header without reading the tensor."""
        path = self._file_of[key]
        if (handle := self._handles.get(path)) is not None:
            return tuple(handle.get_slice(key).get_shape())
        return tuple(self._pickled[key].shape)

    def describe(self) -> str:
        """The file (or the first shard and how many there are), for messages."""
        first = str(self.paths[0]) if self.paths else "no file"
        return first if len(self.paths) < 2 else f"{first} (and {len(self.paths) - 1} more shards)"


def _load_pickle(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise SourceError(f"no such checkpoint file: {path}")
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            # Files saved before PyTorch 1.6 (not a zip archive) cannot be memory-mapped.
            if "mmap" not in str(error):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Not torch's message: it suggests `weights_only=False`, which would run whatever code the file holds.
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        objects = f"Python objects that are not tensors{f' ({found.group(1)})' if found else ''}"
        raise SourceError(
            f"{path} cannot be loaded safely: it pickles {objects}: refusing to unpickle it; get the .safetensors "
            "version of this checkpoint, or re-save its state dict (a dict of tensors) with torch.save"
        ) from None
    except Exception as error:  # torch.load of a file it did not write fails in many ways (KeyError, EOFError...)
        text = _ANSI_ESCAPE.sub("", str(error)).strip()
        detail = f"{type(error).__name__}: {text.splitlines()[0].split('. ')[0]}" if text else type(error).__name__
        raise SourceError(
            f"{path} is not a readable PyTorch checkpoint ({detail}): it is truncated, corrupted or of another "
            "format; download or save it again"
        ) from None
    if isinstance(loaded, dict) and isinstance(state_dict := loaded.get("state_dict"), dict):
        loaded = state_dict
    if not isinstance(loaded, dict):
        raise SourceError(f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping of tensors)")
    if not_tensors := [str(key) for key, value in loaded.items() if not isinstance(value, Tensor)]:
        raise SourceError(
            f"{path} is not a state dict: {len(not_tensors)} entries are not tensors ({', '.join(not_tensors[:5])})"
        )
    return {str(key): value for key, value in loaded.items()}


def _config_classes(config: Mapping[str, Any]) -> list[str]:
    architectures = config.get("architectures")
    names = [config.get("_class_name"), *(architectures if isinstance(architectures, list) else [])]
    return [name for name in names if isinstance(name, str)]


@dataclass(frozen=True)
class DiffusersFolder:
    """A diffusers model folder (`model_index.json` and a subfolder per component), or one component's folder.

    Attributes:
        root: The folder.
    """

    root: Path

    @cached_property
    def model_index(self) -> dict[str, Any] | None:
        """The parsed `model_index.json`, or None for a component's folder."""
        path = self.root / "model_index.json"
        return read_json(path) if path.is_file() else None

    @property
    def pipeline_class(self) -> str | None:
        """The pipeline the folder is for (`_class_name` of `model_index.json`, e.g. `StableDiffusionPipeline`)."""
        name = (self.model_index or {}).get("_class_name")
        return name if isinstance(name, str) else None

    def has_component(self, component: str) -> bool:
        """Whether the folder has `component` (a pipeline folder's subfolder, or this component's folder)."""
        if self.model_index is not None:
            return (self.root / component).is_dir()
        config = self.root / "config.json"
        return config.is_file() and bool(set(_config_classes(read_json(config))) & set(COMPONENT_CLASSES[component]))

    def component_folder(self, component: str) -> Path:
        """The folder of `component`'s config and weights.

        Raises:
            SourceError: The folder has no such component; the message lists what it has.
        """
        if self.model_index is not None:
            folder = self.root / component
            if not folder.is_dir():
                listed = sorted(key for key in self.model_index if not key.startswith("_"))
                present = sorted(path.name for path in self.root.iterdir() if path.is_dir())
                raise SourceError(
                    f"{self.root} has no {component}/ folder, which a Stable Diffusion 1.x model needs (with unet/, "
                    f"vae/, text_encoder/ and tokenizer/). model_index.json lists {', '.join(listed) or 'nothing'}; "
                    f"the folder has {', '.join(present) or 'no subfolder'}. Download the missing component (e.g. "
                    "pass the Hub id instead) or point --from at a complete folder."
                )
            return folder
        config_path = self.root / "config.json"
        if not config_path.is_file():
            raise SourceError(
                f"{self.root} is not a diffusers folder: it has neither model_index.json (a model folder) nor "
                "config.json (a component's folder). Pass the folder of a diffusers model, a single checkpoint file "
                "or a Hugging Face Hub id."
            )
        classes = _config_classes(read_json(config_path))
        if not set(classes) & set(COMPONENT_CLASSES[component]):
            raise SourceError(
                f"{self.root} is the folder of {' / '.join(classes) or 'an unknown model'}, not of the {component} "
                f"({' or '.join(COMPONENT_CLASSES[component])}): pass the model's folder (with model_index.json) or "
                f"its {component}/ folder."
            )
        return self.root

    def config(self, component: str) -> dict[str, Any]:
        """The component's parsed `config.json`."""
        path = self.component_folder(component) / "config.json"
        if not path.is_file():
            raise SourceError(f"{path.parent} has no config.json: it is not a complete diffusers {component} folder")
        return read_json(path)

    def weight_files(self, component: str) -> list[Path]:
        """The files of the component's weights (several for a sharded checkpoint), by the preference order above.

        Raises:
            SourceError: The component's folder has no weights file.
        """
        folder = self.component_folder(component)
        name = _WEIGHTS_NAMES[component]
        for patterns in _weight_candidates(name):
            first = folder / patterns[0]
            if not first.is_file():
                continue
            if first.name.endswith(".json"):
                return shard_files(first)
            return [first]
        present = sorted(path.name for path in folder.iterdir())
        raise SourceError(
            f"{folder} has no weights: expected {name}.safetensors (or its .fp16 variant, a sharded index, or "
            f"{name}.bin); found {', '.join(present) or 'nothing'}. The download may be incomplete."
        )

    def tensors(self, component: str) -> TensorFile:
        """The component's tensors, read lazily (see `TensorFile`)."""
        return TensorFile(self.weight_files(component))

    def tokenizer_folder(self) -> Path | None:
        """The `tokenizer/` folder of a model folder (`tokenizer_2/` for SDXL's refiner, which has only that one), if
        it holds a CLIP tokenizer (see `read_tokenizer`)."""
        folders = [self.root / name for name in ("tokenizer", "tokenizer_2")]
        return next((folder for folder in folders if _has_tokenizer(folder)), None)

    def describe(self) -> str:
        return f"diffusers folder {self.root}"


def shard_files(index: Path) -> list[Path]:
    """The files a sharded checkpoint's index (`*.safetensors.index.json`) lists, checked to be there."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index} has no weight_map: it is not a sharded checkpoint index")
    files = [index.parent / name for name in dict.fromkeys(str(name) for name in weight_map.values())]
    if missing := [file.name for file in files if not file.is_file()]:
        raise SourceError(f"{index} lists shards that are missing: {', '.join(missing)}. The download is incomplete.")
    return files


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, parsed; a `SourceError` that names the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path} is not a readable JSON file ({error})") from error
    if not isinstance(data, dict):
        raise SourceError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def transformers_weight_files(folder: Path) -> list[Path]:
    """The weights of a transformers model folder: `model.safetensors`, its shards, or `pytorch_model.bin`.

    Raises:
        SourceError: The folder has none of them; the message lists what it has.
    """
    if (single := folder / "model.safetensors").is_file():
        return [single]
    if (index := folder / "model.safetensors.index.json").is_file():
        return shard_files(index)
    if (pickled := folder / "pytorch_model.bin").is_file():
        return [pickled]
    present = sorted(path.name for path in folder.iterdir())
    raise SourceError(
        f"{folder} has no weights: expected model.safetensors (or a sharded index, or pytorch_model.bin); found "
        f"{', '.join(present) or 'nothing'}"
    )


@dataclass(frozen=True)
class SingleFile:
    """A checkpoint in one file: a whole original-layout model, or one component's weights.

    Attributes:
        path: The `.safetensors`, `.ckpt`, `.pt`, `.pth` or `.bin` file.
    """

    path: Path

    @cached_property
    def tensors(self) -> TensorFile:
        """All the file's tensors, read lazily (a pickled file is loaded once, memory-mapped when possible)."""
        return TensorFile([self.path])

    def describe(self) -> str:
        return f"single file {self.path}"


Source = DiffusersFolder | SingleFile


def open_source(source: "str | Path | Source", components: Sequence[str] = ("unet", "vae", "text_encoder")) -> Source:
    """Resolve `source`: a local folder or file, else a Hugging Face Hub id whose needed files are downloaded.

    Args:
        source: A diffusers folder, a component's folder, a checkpoint file, or a Hub id (`org/name`). An already
            opened source is returned as is.
        components: The components that will be read (`unet`, `vae`, `text_encoder`, `tokenizer`): only their
            files are downloaded from the Hub.

    Raises:
        SourceError: The path does not exist and is not a Hub id, the file type is not supported, the download
            failed, or the folder or `.safetensors` file already holds refiners weights (`refiners-convert`'s output).
    """
    if isinstance(source, DiffusersFolder | SingleFile):
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        _refuse_converted_folder(path)
        return DiffusersFolder(path)
    if path.is_file():
        if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
            raise SourceError(
                f"{path} is not a checkpoint file: expected one of {', '.join(_SINGLE_FILE_SUFFIXES)}, or a diffusers "
                "folder."
            )
        _refuse_converted_file(path, components)
        return SingleFile(path)
    if not _HUB_ID.fullmatch(str(source)):
        raise SourceError(f"no such file or folder: {source} (nor is it a Hugging Face Hub id like `org/name`)")
    return DiffusersFolder(_download(str(source), components))


def _holds_refiners_weights(path: Path) -> bool:
    """Whether `path` is a `.safetensors` file of refiners weights, which need no conversion.

    A refiners state dict's keys are paths in a tree of Chains, where each module is named after its class
    (`DownBlocks.Chain_1.Conv2d.weight`); diffusers, transformers and the original checkpoints name modules in lower
    case (`down_blocks.0.resnets.0.conv1.weight`, `model.diffusion_model.input_blocks.0.0.weight`). Only the header
    is read.
    """
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as file:
            keys: list[str] = list(file.keys())
    except Exception:  # an unreadable file is not refiners weights; reading it as a source reports why
        return False
    return bool(keys) and all(_REFINERS_KEY.fullmatch(key) for key in keys)


def _refuse_converted_folder(folder: Path) -> None:
    if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
        return
    if converted := sorted(path.name for path in folder.glob("*.safetensors") if _holds_refiners_weights(path)):
        raise SourceError(
            f"{folder} already holds refiners weights ({', '.join(converted)}): load it with "
            f'StableDiffusion_1.from_folder("{folder}") instead of converting it again'
        )


def _refuse_converted_file(path: Path, components: Sequence[str]) -> None:
    if not _holds_refiners_weights(path):
        return
    models = [_REFINERS_MODELS[component] for component in components if component in _REFINERS_MODELS]
    load = (
        f'{models[0]}(...).load_from_safetensors("{path}")'
        if len(models) == 1
        else (f'the load_from_safetensors("{path}") of its model ({", ".join(_REFINERS_MODELS.values())})')
    )
    raise SourceError(f"{path} already holds refiners weights: load it with {load} instead of converting it again")


def _download(repo_id: str, components: Sequence[str]) -> Path:
    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(str(snapshot_download(repo_id, allow_patterns=patterns)))
        except (OSError, ValueError) as error:  # huggingface_hub's HTTP, offline and validation errors
            raise SourceError(
                f"{repo_id} is not a local file or folder, and downloading it from the Hugging Face Hub failed: {error}"
            ) from error

    weighted = [component for component in components if component in _WEIGHTS_NAMES]
    patterns = ["model_index.json", *(f"{component}/config.json" for component in weighted)]
    if "tokenizer" in components:
        patterns += [f"tokenizer/{name}" for name in (*_TOKENIZER_FILES, _TOKENIZER_JSON)]
    # One candidate layout per round, best first, so that only one copy of each component's weights is downloaded.
    candidates = {component: _weight_candidates(_WEIGHTS_NAMES[component]) for component in weighted}
    folder = fetch(patterns + [f"{c}/{pattern}" for c in weighted for pattern in candidates[c][0]])
    remaining = [c for c in weighted if not (folder / c / candidates[c][0][0]).is_file()]
    for index in range(1, len(_weight_candidates(""))):
        if not remaining:
            break
        folder = fetch([f"{c}/{pattern}" for c in remaining for pattern in candidates[c][index]])
        remaining = [c for c in remaining if not (folder / c / candidates[c][index][0]).is_file()]
    return folder


def _has_tokenizer(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _TOKENIZER_FILES) or (folder / _TOKENIZER_JSON).is_file()


def read_tokenizer(folder: Path) -> CLIPTokenizer:
    """The CLIP tokenizer in `folder`: from `vocab.json` and `merges.txt`, or else from `tokenizer.json`.

    Raises:
        SourceError: The folder holds neither, or they cannot be read.
    """
    try:
        if all((folder / name).is_file() for name in _TOKENIZER_FILES):
            return CLIPTokenizer(folder / _TOKENIZER_FILES[0], folder / _TOKENIZER_FILES[1])
        if (folder / _TOKENIZER_JSON).is_file():
            return CLIPTokenizer.from_tokenizer_json(folder / _TOKENIZER_JSON)
    except ValueError as error:
        raise SourceError(f"cannot read the CLIP tokenizer in {folder}: {error}") from error
    raise SourceError(f"no CLIP tokenizer in {folder}: expected vocab.json and merges.txt, or tokenizer.json")


def locate_tokenizer(source: "str | Path") -> Path:
    """The folder of a CLIP tokenizer (see `read_tokenizer`): a folder, its `tokenizer/` subfolder, or a Hub repo.

    Args:
        source: A folder holding both files (or a model folder with a `tokenizer/` subfolder), or a Hub id (e.g.
            `openai/clip-vit-large-patch14`).

    Raises:
        SourceError: Neither place has both files.
    """
    path = Path(source).expanduser()
    if not path.exists() and _HUB_ID.fullmatch(str(source)):
        from huggingface_hub import snapshot_download

        names = (*_TOKENIZER_FILES, _TOKENIZER_JSON)
        patterns = [*names, *(f"tokenizer/{name}" for name in names)]
        try:
            path = Path(str(snapshot_download(str(source), allow_patterns=patterns)))
        except (OSError, ValueError) as error:
            raise SourceError(
                f"cannot download the tokenizer of {source} from the Hugging Face Hub: {error}"
            ) from error
    for folder in (path, path / "tokenizer"):
        if _has_tokenizer(folder):
            return folder
    raise SourceError(
        f"no CLIP tokenizer in {source}: expected vocab.json and merges.txt (or tokenizer.json) in it or in its "
        "tokenizer/ subfolder"
    )
