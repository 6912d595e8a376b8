"""`StableDiffusion_1.from_folder` builds each component at the sizes its file records, then loads it.

The files are written here as `refiners-convert sd1` writes them (the state dict, the constructor call in the
metadata, the tokenizer and the UNet's sample size), from toy models with random weights; tests/converters/
test_loading.py checks the converter's own files, and diffusers parity.
"""

from pathlib import Path

import pytest
import torch
from torch import Tensor

from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import manual_seed, save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTextEncoderL, CLIPTokenizer
from refiners.foundationals.clip.tokenizer import bytes_to_unicode
from refiners.foundationals.latent_diffusion import (
    DDIM,
    LatentDiffusionAutoencoder,
    SD1Autoencoder,
    SD1UNet,
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_1.weights import (
    AUTOENCODER_FILE,
    CLIP_TEXT_FILE,
    SAMPLE_SIZE_KEY,
    UNET_FILE,
    ConvertedWeights,
    SD1Weights,
    unet_metadata,
)

UNET = ModelConfig.of(SD1UNet, channels=(32, 32, 64, 64), context_embedding_dim=32, num_attention_heads=4)
LDA = ModelConfig.of(
    LatentDiffusionAutoencoder, encoder_scale=0.18215, block_out_channels=(32,) * 4, layers_per_block=1
)
CLIP_TEXT = ModelConfig.of(
    CLIPTextEncoder, embedding_dim=32, vocabulary_size=514, num_layers=1, num_attention_heads=4, feedforward_dim=64
)


def tokenizer() -> CLIPTokenizer:
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer.from_vocabulary({token: index for index, token in enumerate(tokens)}, [])


def write_folder(folder: Path, unet: ModelConfig = UNET, sample_size: int = 6) -> dict[str, dict[str, Tensor]]:
    """The three files of a toy model with random weights, as `refiners-convert sd1` writes them; its state dicts."""
    manual_seed(0)
    models = {
        UNET_FILE: (unet.build([SD1UNet]), unet_metadata(unet, sample_size)),
        AUTOENCODER_FILE: (LDA.build([LatentDiffusionAutoencoder]), LDA.to_metadata()),
        CLIP_TEXT_FILE: (CLIP_TEXT.build([CLIPTextEncoder]), CLIP_TEXT.to_metadata() | tokenizer().to_metadata()),
    }
    folder.mkdir(parents=True, exist_ok=True)
    state_dicts: dict[str, dict[str, Tensor]] = {}
    for name, (model, metadata) in models.items():
        with torch.no_grad():  # away from identity norms and zero biases, so that every weight shows
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        state_dicts[name] = model.state_dict()
        save_to_safetensors(folder / name, state_dicts[name], metadata)
    return state_dicts


def test_components_are_built_at_the_recorded_sizes_and_loaded(tmp_path: Path) -> None:
    state_dicts = write_folder(tmp_path)
    sd = StableDiffusion_1.from_folder(tmp_path, solver=DDIM(num_inference_steps=3))
    assert isinstance(sd.solver, DDIM) and sd.device == torch.device("cpu") and sd.dtype == torch.float32
    assert (sd.unet.channels, sd.unet.context_embedding_dim, sd.unet.num_attention_heads) == ((32, 32, 64, 64), 32, 4)
    assert sd.lda.block_out_channels == (32,) * 4 and sd.clip_text_encoder.num_layers == 1
    for name, module in [(UNET_FILE, sd.unet), (AUTOENCODER_FILE, sd.lda), (CLIP_TEXT_FILE, sd.clip_text_encoder)]:
        loaded = module.state_dict()
        assert loaded.keys() == state_dicts[name].keys()
        assert all(torch.equal(loaded[key], tensor) for key, tensor in state_dicts[name].items()), name
    # The tokenizer came from the text encoder's file, and the native size from the UNet's (6 latents of 8 pixels).
    assert sd.clip_text_encoder.tokenizer is not None
    assert sd.default_size == 48
    images = sd.generate("a cat", num_inference_steps=2, seed=0, progress=False)
    assert images[0].size == (48, 48)


def test_dtype_and_device(tmp_path: Path) -> None:
    state_dicts = write_folder(tmp_path)
    sd = StableDiffusion_1.from_folder(tmp_path, device="cpu", dtype=torch.float64)
    assert sd.dtype == sd.lda.dtype == sd.clip_text_encoder.dtype == torch.float64
    assert not any(tensor.is_meta for tensor in [*sd.parameters(), *sd.buffers()])
    weight = next(iter(state_dicts[UNET_FILE]))
    assert torch.equal(sd.unet.state_dict()[weight], state_dicts[UNET_FILE][weight].double())


def test_inpainting(tmp_path: Path) -> None:
    write_folder(tmp_path, unet=ModelConfig.of(SD1UNet, in_channels=9, **{**UNET.arguments}))
    sd = StableDiffusion_1_Inpainting.from_folder(tmp_path)
    assert sd.unet.in_channels == 9
    with pytest.raises(ValueError, match=r"use StableDiffusion_1_Inpainting for an inpainting UNet"):
        StableDiffusion_1.from_folder(tmp_path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"^no such folder: .*sd15\. Convert .* into it with `refiners-convert sd1 --from SOURCE --to ",
    ):
        StableDiffusion_1.from_folder(tmp_path / "sd15")
    write_folder(tmp_path)
    (tmp_path / UNET_FILE).unlink()
    with pytest.raises(FileNotFoundError) as error:
        StableDiffusion_1.from_folder(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / UNET_FILE} is missing: create it (and the other files) with "
        f"`refiners-convert sd1 --from SOURCE --to {tmp_path}`"
    )


def test_files_without_recorded_sizes_are_sd15(tmp_path: Path) -> None:
    # Files converted before sizes were recorded: SD1.5's components (on the meta device: shapes only).
    weights = SD1Weights(*(ConvertedWeights({}, {}) for _ in range(3)))
    for built, sd15 in [
        (weights.build_unet(9), SD1UNet(9, device="meta")),
        (weights.build_lda(), SD1Autoencoder(device="meta")),
        (weights.build_clip_text_encoder(), CLIPTextEncoderL(device="meta")),
    ]:
        assert type(built) is type(sd15)
        assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in sd15.state_dict().items()}
    assert weights.sample_size == 64 and StableDiffusion_1(device="meta").default_size == 512

    # A toy file without its record does not fit SD1.5's sizes: the error says to convert it again.
    state_dicts = write_folder(tmp_path)
    save_to_safetensors(tmp_path / UNET_FILE, state_dicts[UNET_FILE])
    with pytest.raises(ValueError, match=r"was converted before sizes were recorded") as error:
        StableDiffusion_1.from_folder(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / UNET_FILE} was converted before sizes were recorded and is not SD1.5-sized: convert it again "
        f"with refiners-convert sd1 --from SOURCE --to {tmp_path} (685 of its tensors differ from SD1UNet's, e.g. "
        "DownBlocks.Chain_1.Conv2d.bias: (32,) in the file, (320,) in the model)"
    )


def test_bad_metadata(tmp_path: Path) -> None:
    write_folder(tmp_path, sample_size=6)
    state_dicts = write_folder(tmp_path / "other")
    save_to_safetensors(tmp_path / UNET_FILE, state_dicts[UNET_FILE], unet_metadata(UNET, 6) | {SAMPLE_SIZE_KEY: "six"})
    with pytest.raises(ValueError, match=r"refiners\.unet\.sample_size='six': expected a positive integer"):
        StableDiffusion_1.from_folder(tmp_path)
    save_to_safetensors(tmp_path / UNET_FILE, state_dicts[UNET_FILE], LDA.to_metadata())
    with pytest.raises(
        ValueError, match=r"weights are for a LatentDiffusionAutoencoder, which is not one of .*SD1UNet"
    ):
        StableDiffusion_1.from_folder(tmp_path)
