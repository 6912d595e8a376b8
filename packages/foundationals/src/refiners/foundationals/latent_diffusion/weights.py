"""The files `refiners-convert` writes for a latent diffusion model, whatever its family.

A converted model is a folder of three files, `CLIP_TEXT_FILE`, `AUTOENCODER_FILE` and `UNET_FILE`. Each records in
its metadata the constructor call of the model it holds (`refiners.fluxion.model_config`), so that it loads at its
sizes; the text encoder's also carries its tokenizer (`CLIPTokenizer.to_metadata`), and the UNet's its native sample
size (`SAMPLE_SIZE_KEY`: diffusers' `sample_size`, the side of the latents it was trained on). `WeightsFile` is one
such file, opened; `ConvertedWeights` the same tensors and metadata in memory (`refiners.converters`). The families
(`stable_diffusion_1`, `stable_diffusion_xl`) build their components from them in `from_folder`.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, load_state_dict_from_safetensors

__all__ = [
    "CLIP_TEXT_FILE",
    "AUTOENCODER_FILE",
    "UNET_FILE",
    "SAMPLE_SIZE_KEY",
    "ConvertedWeights",
    "WeightsFile",
    "ComponentWeights",
    "unet_metadata",
]

CLIP_TEXT_FILE = "clip_text.safetensors"
AUTOENCODER_FILE = "autoencoder.safetensors"
UNET_FILE = "unet.safetensors"

SAMPLE_SIZE_KEY = "refiners.unet.sample_size"


def unet_metadata(config: ModelConfig, sample_size: int) -> dict[str, str]:
    """The metadata of a converted UNet: its constructor call and its native sample size (in latent pixels)."""
    return config.to_metadata() | {SAMPLE_SIZE_KEY: str(sample_size)}


@dataclass(frozen=True)
class ConvertedWeights:
    """One component's converted weights in memory: the refiners tensors, and the metadata a file of them carries.

    Attributes:
        tensors: The refiners model's state dict, exactly (the conversion checked keys and shapes).
        metadata: The model's constructor call (`ModelConfig.to_metadata`), and what the family adds: the tokenizer,
            the sample size.
    """

    tensors: Mapping[str, Tensor]
    metadata: Mapping[str, str]

    def load_into(self, module: torch.nn.Module) -> None:
        """Make the tensors the weights of `module` (built on the meta device), cast to its dtype: nothing is copied
        when the dtypes agree."""
        targets = module.state_dict()
        wrong = sorted(set(targets) ^ set(self.tensors)) + [
            key for key, target in targets.items() if key in self.tensors and self.tensors[key].shape != target.shape
        ]
        if wrong:
            raise ValueError(
                f"the converted tensors do not fit {type(module).__name__}: {', '.join(wrong[:10])} differ in keys or "
                "shapes"
            )
        tensors = {key: self.tensors[key].to(dtype=target.dtype).contiguous() for key, target in targets.items()}
        module.load_state_dict(tensors, strict=True, assign=True)


@dataclass(frozen=True)
class WeightsFile:
    """One component's converted `.safetensors` file: its path, and its header (metadata and shapes, read when the
    file is opened; the tensors are read by `load_into`).

    Attributes:
        path: The file.
        metadata: Its header's metadata.
        shapes: The shape of each of its tensors.
    """

    path: Path
    metadata: Mapping[str, str]
    shapes: Mapping[str, tuple[int, ...]]

    @classmethod
    def open(cls, path: Path, command: str) -> "WeightsFile":
        """The file at `path`, its header read.

        Args:
            path: The file.
            command: The command that writes it, for the error (`refiners-convert sd1 --from SOURCE --to FOLDER`).

        Raises:
            FileNotFoundError: No file at `path`; the message says how to make it.
        """
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: create it (and the other files) with `{command}`")
        metadata = load_metadata_from_safetensors(path)  # first: its errors say what is wrong with the file
        with safe_open(str(path), framework="pt") as handle:
            keys: list[str] = handle.keys()
            shapes = {key: tuple[int, ...](handle.get_slice(key).get_shape()) for key in keys}
        return cls(path, metadata, shapes)

    def load_into(self, module: torch.nn.Module) -> None:
        """Load the file into `module` (built on the meta device: the tensors are created on CPU).

        Raises:
            ValueError: The file does not fit the module; the message lists what differs.
        """
        load_state_dict_from_safetensors(module, self.path)


ComponentWeights = ConvertedWeights | WeightsFile
"""A component's converted weights: a file, or the same in memory."""
