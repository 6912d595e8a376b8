"""`refiners-convert sd1-to-diffusers` on the shipped digits model (`models/digits`): diffusers' own
`StableDiffusionPipeline.from_pretrained` loads the written folder and draws what we draw from the same initial
latents; `refiners-convert sd1` brings the folder back bit for bit; a LoRA we trained, exported in the PEFT layout,
loads with diffusers' `load_lora_weights` and moves both models' images alike."""

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from torch import Tensor

from refiners.adapters.lora import SDLoraManager, peft_state_dict, specs_of
from refiners.converters.architecture import describe
from refiners.converters.cli import main
from refiners.converters.engine import ConversionError
from refiners.converters.to_diffusers import to_diffusers
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.latent_diffusion.solvers import DDIM, DPMSolver, Solver
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_1.weights import SD1Weights
from refiners.training import LoraFineTuning

# diffusers' own numpy calls warn under numpy 2 (`__array__` without `copy`): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"
PROMPTS = ["a handwritten digit seven", "a handwritten digit three"]
STEPS, GUIDANCE = 10, 3.0
RELATIVE_ATOL = 1e-4
"""Relative to the output's scale: atol = RELATIVE_ATOL * max |reference|."""
FILES = ("unet.safetensors", "autoencoder.safetensors", "clip_text.safetensors")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "digits-diffusers"
    assert main(["sd1-to-diffusers", "--from", str(DIGITS), "--to", str(folder)]) == 0
    return folder


def pipeline(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise() -> Tensor:
    return torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(7))


def diffusers_latents(pipe: StableDiffusionPipeline, scheduler: Any) -> Tensor:
    pipe.scheduler = scheduler
    with torch.no_grad():
        latents = pipe(
            PROMPTS,
            height=64,
            width=64,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=noise(),
            output_type="latent",
        ).images  # pyright: ignore[reportAttributeAccessIssue]
    assert isinstance(latents, Tensor)
    return latents


def our_latents(sd: StableDiffusion_1) -> Tensor:
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding(PROMPTS)
        x = sd.init_latents((64, 64), noise=noise())
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=GUIDANCE)
    return x


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


def decoded(pipe: StableDiffusionPipeline, latents: Tensor) -> Tensor:
    with torch.no_grad():
        return pipe.vae.decode(latents / pipe.vae.config["scaling_factor"]).sample  # pyright: ignore


@pytest.mark.parametrize("solver", [DDIM, DPMSolver], ids=["DDIM", "DPMSolver (the folder's scheduler)"])
def test_diffusers_draws_our_images(exported: Path, solver: type[Solver]) -> None:
    pipe = pipeline(exported)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config) if solver is DDIM else pipe.scheduler
    expected = diffusers_latents(pipe, scheduler)
    sd = StableDiffusion_1.from_folder(DIGITS, solver=solver(num_inference_steps=STEPS))
    latents = our_latents(sd)
    assert_matches(latents, expected)
    with torch.no_grad():
        assert_matches(sd.lda.decode(latents), decoded(pipe, expected))


def test_configs_are_derived_from_the_records(exported: Path) -> None:
    pipe = pipeline(exported)
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config  # pyright: ignore
    assert list(unet["block_out_channels"]) == [32, 32, 64, 64] and unet["sample_size"] == 8  # pyright: ignore
    assert unet["cross_attention_dim"] == 32 and unet["attention_head_dim"] == 4  # pyright: ignore
    sd = SD1Weights.read(DIGITS)
    assert vae["scaling_factor"] == sd.build_lda().encoder_scale and vae["norm_num_groups"] == 8  # pyright: ignore
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.hidden_act) == (  # pyright: ignore
        32,
        2,
        49408,
        "quick_gelu",
    )
    assert pipe.safety_checker is None and not list(exported.rglob(".*.tmp"))


def test_a_model_in_memory_exports_as_its_folder(exported: Path, tmp_path: Path) -> None:
    to_diffusers(StableDiffusion_1.from_folder(DIGITS, dtype=torch.float16), tmp_path)
    for file in exported.rglob("*"):
        if file.suffix == ".safetensors":
            expected, actual = load_from_safetensors(file), load_from_safetensors(tmp_path / file.relative_to(exported))
            assert expected.keys() == actual.keys() and all(torch.equal(actual[k], v) for k, v in expected.items())
        elif file.is_file():
            assert (tmp_path / file.relative_to(exported)).read_bytes() == file.read_bytes(), file


def test_round_trip_is_bit_identical(exported: Path, tmp_path: Path) -> None:
    back = tmp_path / "back"
    assert main(["sd1", "--from", str(exported), "--to", str(back)]) == 0
    for file in FILES:
        original, returned = load_from_safetensors(DIGITS / file), load_from_safetensors(back / file)
        assert original.keys() == returned.keys()
        for key, tensor in original.items():
            assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), (file, key)
    ours, theirs = SD1Weights.read(DIGITS), SD1Weights.read(back)
    assert ours.sample_size == theirs.sample_size
    assert describe(ours.build_unet(4)) == describe(theirs.build_unet(4))
    assert describe(ours.build_lda()) == describe(theirs.build_lda())
    assert describe(ours.build_clip_text_encoder()) == describe(theirs.build_clip_text_encoder())
    tokenizer = {k: v for k, v in load_metadata_from_safetensors(DIGITS / FILES[2]).items() if "tokenizer" in k}
    assert tokenizer.items() <= load_metadata_from_safetensors(back / FILES[2]).items()
    images = [
        StableDiffusion_1.from_folder(folder).generate(PROMPTS[0], num_inference_steps=4, seed=3, progress=False)[0]
        for folder in (DIGITS, back)
    ]
    assert images[0].tobytes() == images[1].tobytes()


def test_our_lora_loads_in_diffusers_and_draws_the_same(exported: Path, tmp_path: Path) -> None:
    module = LoraFineTuning(base="sd15", weights=str(DIGITS), targets="attention", rank=4, train_text_encoder=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in module.named_loras().values():
            lora.up.weight.copy_(0.2 * torch.randn(lora.up.weight.shape, generator=generator))
    specs = specs_of(module.diffusers_loras())
    # Named as diffusers with transformers 5 loads a `CLIPTextModel`'s modules: without `text_model`.
    specs = {name.replace("text_encoder.text_model.", "text_encoder.", 1): spec for name, spec in specs.items()}
    assert any(name.startswith("text_encoder.") for name in specs)
    tensors, header = peft_state_dict(specs)
    path = tmp_path / "lora-peft.safetensors"
    save_to_safetensors(path, tensors, header)

    pipe = pipeline(exported)
    pipe.load_lora_weights(str(path))  # pyright: ignore[reportArgumentType]
    expected = diffusers_latents(pipe, DDIMScheduler.from_config(pipe.scheduler.config))
    sd = StableDiffusion_1.from_folder(DIGITS, solver=DDIM(num_inference_steps=STEPS))
    base = our_latents(sd)
    SDLoraManager(sd).add_loras("random", path)
    latents = our_latents(sd)
    assert (latents - base).abs().max() > 0.1 * base.abs().max()  # the LoRA moves the output
    assert_matches(latents, expected)
    with torch.no_grad():
        assert_matches(sd.lda.decode(latents), decoded(pipe, expected))
    # A LoRA left injected has no diffusers name: the export refuses the model, listing its tensors.
    with pytest.raises(ConversionError, match="source keys that nothing in the target uses") as error:
        to_diffusers(sd, tmp_path / "out")
    assert "LoraAdapter" in str(error.value)
    assert not (tmp_path / "out" / "model_index.json").exists()
