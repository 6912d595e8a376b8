"""Loading without ceremony: `StableDiffusion_1.from_folder` on `refiners-convert`'s files, and the one-call loaders
`from_pretrained` (a diffusers folder, a Hub id) and `from_single_file` (an original checkpoint), which convert in
memory.

The toy model of `refiners.converters.toy` (SD1's architecture, 32 to 64 channels wide), saved by diffusers' own
`save_pretrained`, is the source; diffusers' components loaded from it are the reference. The single-file loader
reads SD1.5's sizes: it is checked on the SD1.5 single file of conftest.py against that file's `refiners-convert`.
"""

import fnmatch
import json
import re
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors import safe_open
from torch import Tensor
from transformers import CLIPTextModel

from refiners.converters import from_pretrained, from_single_file
from refiners.converters.cli import main
from refiners.converters.sources import SourceError
from refiners.converters.toy import TOY_UNET_CONFIG, save_toy_stable_diffusion_1
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, manual_seed, save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTextEncoderL
from refiners.foundationals.latent_diffusion import (
    LatentDiffusionAutoencoder,
    SD1UNet,
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
)

ROOT = Path(__file__).resolve().parents[2]
RELATIVE_ATOL = 1e-4
PROMPTS = ["a red circle on a white background", ""]


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_stable_diffusion_1(tmp_path_factory.mktemp("toy") / "diffusers", seed=5)


@pytest.fixture(scope="module")
def toy_converted(toy_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("toy-converted")
    assert main(["sd1", "--from", str(toy_folder), "--to", str(destination)]) == 0
    return destination


@pytest.fixture(scope="module")
def toy_inpainting_folder(toy_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy model with an inpainting UNet (9 input channels), as diffusers saves one."""
    folder = tmp_path_factory.mktemp("toy-inpainting") / "diffusers"
    shutil.copytree(toy_folder, folder)
    shutil.rmtree(folder / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        config: dict[str, Any] = TOY_UNET_CONFIG | {"in_channels": 9}
        UNet2DConditionModel(**config).save_pretrained(folder / "unet")
    return folder


def assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    actual_tensors, expected_tensors = actual.state_dict(), expected.state_dict()
    assert actual_tensors.keys() == expected_tensors.keys()
    for key, tensor in expected_tensors.items():
        assert actual_tensors[key].dtype == tensor.dtype and torch.equal(actual_tensors[key], tensor), key


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


def denoise(sd: StableDiffusion_1, steps: int = 2) -> Tensor:
    """A few steps of the Hello World's loop from seeded noise."""
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding("a cute cat")
        sd.set_num_inference_steps(steps)
        manual_seed(2)
        x = torch.randn(1, 4, 8, 12).to(sd.dtype)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
    return x


# -- from_folder -------------------------------------------------------------------------------------------------


def test_files_record_their_models(toy_converted: Path) -> None:
    unet = load_metadata_from_safetensors(toy_converted / "unet.safetensors")
    assert unet == {
        "refiners.model.version": "1",
        "refiners.model.class": "SD1UNet",
        "refiners.model.arguments": (
            '{"in_channels": 4, "channels": [32, 32, 64, 64], "context_embedding_dim": 32, "num_attention_heads": 4}'
        ),
        "refiners.unet.sample_size": "8",
    }
    clip_text = load_metadata_from_safetensors(toy_converted / "clip_text.safetensors")
    assert str(ModelConfig.from_metadata(clip_text)) == (
        "CLIPTextEncoder(embedding_dim=32, max_sequence_length=77, vocabulary_size=514, num_layers=2, "
        "num_attention_heads=4, feedforward_dim=64, layer_norm_eps=1e-05, gelu_approximation='quick')"
    )
    assert any(key.startswith("clip_tokenizer.") for key in clip_text)  # the vocabulary is still there


def test_from_folder_equals_the_manual_build(toy_converted: Path) -> None:
    sd = StableDiffusion_1.from_folder(toy_converted)
    manual = StableDiffusion_1(
        unet=SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=32, num_attention_heads=4, device="meta"),
        lda=LatentDiffusionAutoencoder(0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1, device="meta"),
        clip_text_encoder=CLIPTextEncoder(
            embedding_dim=32, vocabulary_size=514, num_layers=2, num_attention_heads=4, feedforward_dim=64,
            gelu_approximation="quick", device="meta",
        ),
    )  # fmt: skip
    manual.unet.load_from_safetensors(toy_converted / "unet.safetensors")
    manual.lda.load_from_safetensors(toy_converted / "autoencoder.safetensors")
    manual.clip_text_encoder.load_from_safetensors(toy_converted / "clip_text.safetensors")
    assert repr(sd) == repr(manual) and str(sd.unet) == str(manual.unet)
    for ours, theirs in [
        (sd.unet, manual.unet),
        (sd.lda, manual.lda),
        (sd.clip_text_encoder, manual.clip_text_encoder),
    ]:
        assert_same_weights(ours, theirs)
    assert torch.equal(denoise(sd), denoise(manual))


def test_generate_defaults_to_the_native_size(toy_folder: Path, tmp_path: Path) -> None:
    # diffusers' default: the UNet's sample_size (8 for the toy, 6 here) times the autoencoder's factor (8).
    (tmp_path / "diffusers").mkdir()
    for path in toy_folder.iterdir():
        if path.name != "unet":
            (tmp_path / "diffusers" / path.name).symlink_to(path, target_is_directory=path.is_dir())
    shutil.copytree(toy_folder / "unet", tmp_path / "diffusers" / "unet")
    config = json.loads((toy_folder / "unet" / "config.json").read_text()) | {"sample_size": 6}
    (tmp_path / "diffusers" / "unet" / "config.json").write_text(json.dumps(config))
    assert main(["sd1", "--from", str(tmp_path / "diffusers"), "--to", str(tmp_path / "converted")]) == 0
    sd = StableDiffusion_1.from_folder(tmp_path / "converted")
    assert sd.default_size == 48
    (image,) = sd.generate("a cat", num_inference_steps=1, seed=0, progress=False)
    assert image.size == (48, 48)
    assert sd.generate("a cat", num_inference_steps=1, seed=0, height=32, progress=False)[0].size == (48, 32)


# -- from_pretrained ---------------------------------------------------------------------------------------------


def test_from_pretrained_matches_diffusers(toy_folder: Path, toy_converted: Path) -> None:
    sd = from_pretrained(StableDiffusion_1, toy_folder)
    # The same code path as the files: bit for bit what from_folder loads.
    from_files = StableDiffusion_1.from_folder(toy_converted)
    for ours, theirs in [
        (sd.unet, from_files.unet),
        (sd.lda, from_files.lda),
        (sd.clip_text_encoder, from_files.clip_text_encoder),
    ]:
        assert_same_weights(ours, theirs)
    assert sd.default_size == 64 and sd.clip_text_encoder.tokenizer is not None

    generator = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(toy_folder / "unet").eval()
    latents, text = torch.randn(2, 4, 8, 12, generator=generator), torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 900])
    sd.unet.set_timestep(timesteps)
    sd.unet.set_clip_text_embedding(text)
    vae: Any = AutoencoderKL.from_pretrained(toy_folder / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(toy_folder / "text_encoder").eval()
    assert sd.clip_text_encoder.tokenizer is not None
    ids = sd.clip_text_encoder.tokenizer(PROMPTS)
    with torch.no_grad():
        assert_matches(sd.unet(latents), unet(latents, timesteps, encoder_hidden_states=text).sample)
        assert_matches(sd.lda.decode(latents[:1]), vae.decode(latents[:1] / 0.18215).sample)
        assert_matches(sd.clip_text_encoder(PROMPTS), text_encoder(ids).last_hidden_state)


def test_from_pretrained_downloads_a_hub_id(
    toy_folder: Path, toy_converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested: list[str] = []

    def snapshot_download(repo_id: str, *, allow_patterns: list[str], **kwargs: Any) -> str:
        # What the Hub does: the repo's files that match the patterns, in a local cache folder.
        requested.append(repo_id)
        cache = tmp_path / "cache"
        for file in toy_folder.rglob("*"):
            name = file.relative_to(toy_folder).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, cache / name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    sd = from_pretrained(StableDiffusion_1, "org/toy-sd1", dtype=torch.float64)
    assert set(requested) == {"org/toy-sd1"} and sd.dtype == torch.float64
    expected = StableDiffusion_1.from_folder(toy_converted, dtype=torch.float64)
    for ours, theirs in [(sd.unet, expected.unet), (sd.lda, expected.lda)]:
        assert_same_weights(ours, theirs)
    assert torch.equal(denoise(sd), denoise(expected))


def test_inpainting(toy_inpainting_folder: Path, tmp_path: Path) -> None:
    sd = from_pretrained(StableDiffusion_1_Inpainting, toy_inpainting_folder)
    assert main(["sd1", "--from", str(toy_inpainting_folder), "--to", str(tmp_path)]) == 0
    from_files = StableDiffusion_1_Inpainting.from_folder(tmp_path)
    assert sd.unet.in_channels == from_files.unet.in_channels == 9
    assert_same_weights(sd.unet, from_files.unet)
    unet = UNet2DConditionModel.from_pretrained(toy_inpainting_folder / "unet").eval()
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 9, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    sd.unet.set_timestep(500)
    sd.unet.set_clip_text_embedding(text)
    with torch.no_grad():
        assert_matches(sd.unet(latents), unet(latents, 500, encoder_hidden_states=text).sample)
    with pytest.raises(ValueError, match=r"needs a UNet with 4 input channels, got one with 9: use StableDiffusion_1_"):
        StableDiffusion_1.from_folder(tmp_path)
    with pytest.raises(ValueError, match=r"needs a UNet with 4 input channels, got one with 9: use StableDiffusion_1_"):
        from_pretrained(StableDiffusion_1, toy_inpainting_folder)


def test_each_loader_says_which_sources_are_the_others(toy_folder: Path, tmp_path: Path) -> None:
    weights = toy_folder / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(SourceError, match=r"is a single checkpoint file, not a diffusers folder: load it with from_si"):
        from_pretrained(StableDiffusion_1, weights)
    with pytest.raises(SourceError, match=r"is a folder, not a single checkpoint file: load a diffusers folder with f"):
        from_single_file(StableDiffusion_1, toy_folder)
    with pytest.raises(SourceError, match=r"^no such file: .*nothing\.ckpt \(a Hub id is loaded with from_pretrained"):
        from_single_file(StableDiffusion_1, tmp_path / "nothing.ckpt")


# -- from_single_file --------------------------------------------------------------------------------------------


def test_from_single_file_equals_the_conversion_of_the_file(sd15_single_files: Path) -> None:
    # The original-layout checkpoint made from the SD1.5 folder, in float16; `from_folder/` is the folder's
    # conversion in float16: loaded in float16, the weights are the same, bit for bit.
    with pytest.warns(UserWarning, match=r"has no tokenizer, so the text encoder takes token ids, not text: pass tok"):
        sd = from_single_file(StableDiffusion_1, sd15_single_files / "sd15.safetensors", dtype=torch.float16)
    assert isinstance(sd.clip_text_encoder, CLIPTextEncoderL) and sd.default_size == 512
    for module, name in [(sd.unet, "unet"), (sd.lda, "autoencoder"), (sd.clip_text_encoder, "clip_text")]:
        tensors = module.state_dict()
        with safe_open(str(sd15_single_files / "from_folder" / f"{name}.safetensors"), framework="pt") as expected:
            keys: list[str] = expected.keys()
            assert sorted(keys) == sorted(tensors)
            for key in keys:
                assert torch.equal(tensors[key], expected.get_tensor(key)), key
    del sd


# -- the README --------------------------------------------------------------------------------------------------


def test_the_readme_stable_diffusion_blocks_run(
    toy_folder: Path, toy_converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Stable Diffusion blocks, word for word, on the toy model: its converted folder as `sd15/` and
    `toy/`, a LoRA of one of its layers as `pokemon_lora.safetensors`, and a Hub that serves the toy folder."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Stable Diffusion 1.5, LoRA and training") : readme.index("### Training a LoRA")]
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 3 and 'StableDiffusion_1.from_folder("sd15/")' in blocks[0]
    (tmp_path / "sd15").symlink_to(toy_converted, target_is_directory=True)
    (tmp_path / "toy").symlink_to(toy_converted, target_is_directory=True)
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    generator = torch.Generator().manual_seed(0)
    lora = {f"{module}.lora_A.weight": torch.randn(4, 32, generator=generator)}
    lora[f"{module}.lora_B.weight"] = torch.randn(32, 4, generator=generator)
    save_to_safetensors(tmp_path / "pokemon_lora.safetensors", lora)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(toy_folder))  # pyright: ignore[reportUnknownLambdaType]
    monkeypatch.chdir(tmp_path)
    namespaces: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        namespaces.append({"__name__": "readme"})
        exec(compile(block, f"README.md, Stable Diffusion block {index}", "exec"), namespaces[-1])
    hello_world, loaded, toy = (namespace["sd15" if "sd15" in namespace else "toy"] for namespace in namespaces)
    assert hello_world.unet.device == torch.device("cpu")
    from PIL import Image

    assert Image.open(tmp_path / "pokemon_cat.png").size == (64, 64)  # the toy's native size
    assert loaded.dtype == torch.float16 and loaded.default_size == 64
    assert toy.default_size == 64 and toy.clip_text_encoder.tokenizer is not None
    assert_same_weights(toy.unet, StableDiffusion_1.from_folder(toy_converted).unet)
