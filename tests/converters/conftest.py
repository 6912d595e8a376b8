"""A Stable Diffusion 1.5 diffusers folder with random weights, built once per test session, and its outputs.

The three components are built from their real SD1.5 configs (the UNet alone is 860M parameters, 3.4 GB), with
every 1-D parameter (norm weights, biases) perturbed so that no two tensors that could be swapped are equal, and
saved as a download of `runwayml/stable-diffusion-v1-5` looks: `model_index.json`, `unet/`, `vae/`, `text_encoder/`
(with the `text_model.` prefix and the `position_ids` buffer of the Hub's file) and `tokenizer/` (a small CLIP
vocabulary generated here). The reference outputs on fixed inputs are computed before each model is freed: one
full-size model is in memory at a time.

The folder's conversions that several tests compare with (`refiners-convert sd1`, and the original single-file
checkpoint made from the folder) are shared the same way. Under pytest-xdist the workers share all of them: each is
built by the first worker that needs it, under a file lock, and deleted by the last one done with it.
"""

import gc
import json
import os
import shutil
from collections.abc import Callable, Iterator
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

from refiners.converters.cli import main
from refiners.converters.reference_check import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from refiners.converters.single_file import (
    LDM_PREFIXES,
    ModuleRenaming,
    ldm_autoencoder_renaming,
    ldm_clip_text_renaming,
    ldm_unet_renaming,
)
from refiners.converters.sources import TensorFile
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
COMPONENT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
RENAMINGS: dict[str, ModuleRenaming] = {
    "unet": ldm_unet_renaming(),
    "vae": ldm_autoencoder_renaming(),
    "text_encoder": ldm_clip_text_renaming(),
}
# What full training checkpoints (v1-5-pruned.ckpt) carry besides the three models.
TRAINING_LEFTOVERS = {
    "betas": torch.linspace(0.00085, 0.012, 1000),
    "alphas_cumprod": torch.linspace(0.99, 0.01, 1000),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32),
    "model_ema.diffusion_modeltime_embed0weight": torch.zeros(1280, 320),
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


def _build_sd15(root: Path) -> None:
    folder = root / "diffusers"
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
    save_to_safetensors(root / "expected.safetensors", expected)


def to_original(key: str, tensor: Tensor, component: str) -> tuple[str, Tensor]:
    """A diffusers key and tensor as the original layout stores them (attention Linears as 1x1 convolutions)."""
    renaming = RENAMINGS[component]
    original = renaming.to_original(key)
    assert original is not None, key
    module, _, name = key.rpartition(".")
    if module in renaming.conv_as_linear and name == "weight":
        tensor = tensor[:, :, None, None]
    return LDM_PREFIXES[component] + original, tensor


def _build_single_files(root: Path, folder: Path) -> None:
    root.mkdir(parents=True)
    original: dict[str, Tensor] = dict(TRAINING_LEFTOVERS)
    for component, path in COMPONENT_FILES.items():
        for key, tensor in TensorFile([folder / path]).items():
            name, value = to_original(key, tensor.half() if tensor.is_floating_point() else tensor, component)
            original[name] = value
    save_to_safetensors(root / "sd15.safetensors", original)
    # As PyTorch Lightning saves them: the weights nested under `state_dict`, next to the training state.
    torch.save({"state_dict": original, "global_step": 840000, "epoch": 5}, root / "sd15.ckpt")
    del original
    gc.collect()
    assert main(["sd1", "--from", str(folder), "--to", str(root / "from_folder"), "--dtype", "float16"]) == 0


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # pytest-xdist workers each get `<run>/popen-gwN`: `<run>` is this run's, shared by the workers.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Iterator[Path]:
    """`build(path)` once for all workers (under a file lock); `path` deleted by the last worker that used it."""
    root = _shared_root(tmp_path_factory)
    path, users, done = root / name, root / f"{name}.users", root / f"{name}.done"
    lock = FileLock(str(root / f"{name}.lock"))
    with lock:
        if not done.is_file():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
        users.write_text(str(int(users.read_text()) + 1 if users.is_file() else 1))
    yield path
    with lock:
        remaining = int(users.read_text()) - 1
        users.write_text(str(remaining))
        if remaining == 0:  # free the disk (GBs); a worker that needs it later builds it again
            shutil.rmtree(path, ignore_errors=True)
            done.unlink()


@pytest.fixture(autouse=True)
def free_disk(request: pytest.FixtureRequest) -> Iterator[None]:
    """Delete each test's `tmp_path` when it ends: the checkpoints written there weigh GBs, and pytest keeps the
    temporary folders of the last runs."""
    path: Path | None = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def sd15_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from _shared(tmp_path_factory, "sd15", _build_sd15)


@pytest.fixture(scope="session")
def sd15_folder(sd15_root: Path) -> Path:
    """The SD1.5 diffusers folder with random weights (see the module docstring)."""
    return sd15_root / "diffusers"


@pytest.fixture(scope="session")
def sd15_prompt() -> str:
    """The prompt of `sd15_expected["prompt_ids"]` and `sd15_expected["text_output"]`."""
    return PROMPT


@pytest.fixture(scope="session")
def sd15_expected(sd15_root: Path) -> dict[str, Tensor]:
    """The reference inputs and outputs.

    - `prompt_ids`: `PROMPT` through transformers' CLIPTokenizer on the folder's vocabulary; `text_output`: the text
      encoder's last hidden state on them.
    - `image`: an image in [-1, 1]; `reconstruction`: the autoencoder's output on it (posterior mean).
    - `latents`, `timesteps`, `text_embedding`: the UNet's inputs; `noise`: its output.
    """
    return load_from_safetensors(sd15_root / "expected.safetensors")


@pytest.fixture(scope="session")
def sd15_converted(sd15_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`refiners-convert sd1 --from <the diffusers folder> --to <this folder>`, run in-process."""

    def build(path: Path) -> None:
        assert main(["sd1", "--from", str(sd15_folder), "--to", str(path)]) == 0

    yield from _shared(tmp_path_factory, "sd15-converted", build)


@pytest.fixture(scope="session")
def sd15_single_files(sd15_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The diffusers folder as an original single-file checkpoint, in float16, and the folder's conversion.

    - `sd15.safetensors`: the three models under `model.diffusion_model.`, `first_stage_model.` and
      `cond_stage_model.transformer.`, with `TRAINING_LEFTOVERS`;
    - `sd15.ckpt`: the same, as PyTorch Lightning saves it (nested under `state_dict`);
    - `from_folder/`: `refiners-convert sd1 --dtype float16` of the diffusers folder.
    """
    yield from _shared(tmp_path_factory, "sd15-single-files", lambda path: _build_single_files(path, sd15_folder))


@pytest.fixture(scope="session")
def original_layout() -> Callable[[str, Tensor, str], tuple[str, Tensor]]:
    """`to_original(key, tensor, component)`: a diffusers key and tensor as the original layout stores them."""
    return to_original
