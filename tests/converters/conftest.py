"""A Stable Diffusion 1.5 diffusers folder with random weights, built once per test session, and its outputs.

The three components are built from their real SD1.5 configs (the UNet alone is 860M parameters, 3.4 GB), with
every 1-D parameter (norm weights, biases) perturbed so that no two tensors that could be swapped are equal, and
saved as a download of `runwayml/stable-diffusion-v1-5` looks: `model_index.json`, `unet/`, `vae/`, `text_encoder/`
(with the `text_model.` prefix and the `position_ids` buffer of the Hub's file) and `tokenizer/` (a small CLIP
vocabulary generated here). The reference outputs on fixed inputs are computed before each model is freed: one
full-size model is in memory at a time. Under pytest-xdist the workers share the folder (built by the first one
under a file lock, deleted by the last one).
"""

import gc
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from filelock import FileLock
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from refiners.converters.reference_check import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from refiners.fluxion.utils import load_from_safetensors, save_to_safetensors

# runwayml/stable-diffusion-v1-5's model_index.json, less the components the conversion does not read.
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
WORDS = ["a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "mars", "cozy", "cabin", "painting"]
PROMPT = "A photo of an astronaut riding a horse on Mars, oil painting"


def write_tokenizer(folder: Path) -> None:
    """A CLIP `vocab.json` and `merges.txt`: the 512 byte-level symbols, merges spelling `WORDS`, the specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols)]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        # Left to right: "p h o t o</w>" -> "ph o t o</w>" -> "pho t o</w>" -> ...
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
                tokens.append(merged + piece)
            merged += piece
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{first} {second}" for first, second in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random norm weights and biases: default init gives every GroupNorm the same weights, which hides swaps."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _build(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2), encoding="utf-8")
    write_tokenizer(folder / "tokenizer")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    expected: dict[str, Tensor] = {}

    tokenizer: Any = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    prompt_ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)).eval()
    perturb(text_encoder, generator)
    with torch.no_grad():
        expected |= {"prompt_ids": prompt_ids, "text_output": text_encoder(prompt_ids).last_hidden_state}
    text_encoder.save_pretrained(folder / "text_encoder")
    del text_encoder
    # The Hub's file has the `text_model.` prefix and the `position_ids` buffer (transformers 5 saves neither).
    weights = folder / "text_encoder" / "model.safetensors"
    hub_layout = {f"text_model.{key}": tensor for key, tensor in load_from_safetensors(weights).items()}
    hub_layout["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_to_safetensors(weights, hub_layout)
    del hub_layout

    vae = AutoencoderKL(**SD15_VAE_CONFIG).eval()
    perturb(vae, generator)
    image = (torch.rand(1, 3, 64, 48, generator=generator) * 2 - 1).clamp(-1, 1)
    with torch.no_grad():
        expected |= {"image": image, "reconstruction": vae(image, sample_posterior=False).sample}
    vae.save_pretrained(folder / "vae")
    del vae

    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    perturb(unet, generator)
    latents = torch.randn(2, 4, 8, 12, generator=generator)
    timesteps = torch.tensor([10, 800])
    text_embedding = torch.randn(2, 77, 768, generator=generator)
    with torch.no_grad():
        noise = unet(latents, timesteps, encoder_hidden_states=text_embedding).sample
    expected |= {"latents": latents, "timesteps": timesteps, "text_embedding": text_embedding, "noise": noise}
    unet.save_pretrained(folder / "unet")
    del unet
    gc.collect()
    save_to_safetensors(folder.parent / f"{folder.name}-expected.safetensors", expected)


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # pytest-xdist workers each get `<run>/popen-gwN`: `<run>` is this run's, shared by the workers.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def sd15_prompt() -> str:
    """The prompt of `sd15_expected["prompt_ids"]` and `sd15_expected["text_output"]`."""
    return PROMPT


@pytest.fixture(scope="session")
def sd15_expected(sd15_folder: Path) -> dict[str, Tensor]:
    """The reference inputs and outputs.

    - `prompt_ids`: `PROMPT` through transformers' CLIPTokenizer on the folder's vocabulary; `text_output`: the text
      encoder's last hidden state on them.
    - `image`: an image in [-1, 1]; `reconstruction`: the autoencoder's output on it (posterior mean).
    - `latents`, `timesteps`, `text_embedding`: the UNet's inputs; `noise`: its output.
    """
    return load_from_safetensors(sd15_folder.parent / f"{sd15_folder.name}-expected.safetensors")


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The SD1.5 diffusers folder with random weights (see the module docstring)."""
    root = _shared_root(tmp_path_factory)
    folder, users = root / "sd15-diffusers", root / "sd15-users"
    expected_path = root / "sd15-diffusers-expected.safetensors"
    with FileLock(str(root / "sd15.lock")):
        if not expected_path.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            _build(folder)
        users.write_text(str(int(users.read_text()) + 1 if users.is_file() else 1))
    yield folder
    with FileLock(str(root / "sd15.lock")):
        remaining = int(users.read_text()) - 1
        users.write_text(str(remaining))
        if remaining == 0:  # the last user frees the disk (several GB); a later one would rebuild
            shutil.rmtree(folder, ignore_errors=True)
            expected_path.unlink(missing_ok=True)
