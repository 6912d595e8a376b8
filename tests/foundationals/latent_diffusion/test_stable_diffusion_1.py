"""StableDiffusion_1 generates what diffusers' Stable Diffusion pipelines generate, from the same converted weights.

The references are diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and
`StableDiffusionInpaintPipeline` on small components of the SD1.5 architecture (UNet widths 32-64, a 4-block
autoencoder, a 2-layer CLIP text model, a small CLIP vocabulary made here), with random weights, saved with
`save_pretrained` as a user's download looks. Each component is converted with the refiners key maps and saved with
`save_to_safetensors`, as `refiners-convert` would, then loaded into our models built on the meta device.

A whole generation runs on both sides with the same initial noise (or the same seed) and the same solver: the final
latents agree to 1e-4 of their scale, the decoded images to a PSNR of 40 dB or more.
"""

import inspect
import json
import math
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from torch import Tensor
from toy_models import HEADS, TEXT_WIDTH, UNET_CHANNELS, UNET_CONFIG
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from refiners.converters.autoencoder import convert_diffusers_autoencoder
from refiners.converters.clip_text import convert_transformers_clip_text
from refiners.converters.reference_check import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.fluxion.utils import load_from_safetensors, manual_seed, save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTextEncoderL, CLIPTokenizer
from refiners.foundationals.latent_diffusion import (
    DDIM,
    LatentDiffusionAutoencoder,
    SD1Autoencoder,
    SD1UNet,
    Solver,
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
)
from refiners.foundationals.latent_diffusion import stable_diffusion_1 as stable_diffusion_1_package
from refiners.foundationals.latent_diffusion.solvers import DPMSolver, EulerAncestral

# diffusers' own numpy calls warn under numpy 2 (`__array__` without `copy`): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Relative to the output's scale: atol = RELATIVE_ATOL * max |reference|.
RELATIVE_ATOL = 1e-4
MIN_PSNR = 40.0

HEIGHT, WIDTH = 64, 96  # latents of 8x12: the UNet's lowest resolution has an odd width
SEED = 12

# The SD1.5 architecture at toy size (the UNet config is tests/toy_models.py's; SD1.5's real configs are in
# refiners.converters.reference_check).
VAE_CHANNELS = (32, 32, 64, 64)
VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": list(VAE_CHANNELS),
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 64,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = SD15_TEXT_ENCODER_CONFIG | {
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": TEXT_WIDTH,
}
INPAINTING_UNET_CONFIG: dict[str, Any] = UNET_CONFIG | {"in_channels": 9}
# SD1.5's scheduler_config.json (PNDM's), as the DDIM and DPM-Solver schedulers read it.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}

PROMPT = "a photo of a cat riding a horse on the beach"
NEGATIVE_PROMPT = "a blurry photo, low quality"
PROMPTS = ["a cat on the beach", "a red horse at night"]
NEGATIVE_PROMPTS = ["blurry", "low quality"]
# The words whose merges the vocabulary learns, so that tokens span several characters.
VOCABULARY_WORDS = [
    "a",
    "photo",
    "of",
    "cat",
    "riding",
    "horse",
    "on",
    "the",
    "beach",
    "blurry",
    "low",
    "quality",
    "red",
    "at",
    "night",
]


# -- references ------------------------------------------------------------------------------------------------


def write_tokenizer_folder(folder: Path) -> None:
    """A CLIP `tokenizer/` folder: the 512 byte symbols, merges that spell `VOCABULARY_WORDS`, the special tokens."""
    symbols = list(bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in VOCABULARY_WORDS:
        prefix = word[0]
        for index, char in enumerate(word[1:], start=1):
            piece = char + "</w>" if index == len(word) - 1 else char
            if (prefix, piece) not in merges:
                merges.append((prefix, piece))
            prefix += piece
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge) for merge in merges)]
    tokens = [*dict.fromkeys(tokens), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{first} {second}" for first, second in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def perturb_norms(model: torch.nn.Module) -> None:
    """Move the norms away from their identity init: a swapped or ignored scale or shift would then show."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
                assert module.weight is not None and module.bias is not None
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))


@dataclass
class Reference:
    """diffusers' pipelines (sharing their components) and the folders they were saved to."""

    text_to_image: StableDiffusionPipeline
    image_to_image: StableDiffusionImg2ImgPipeline
    inpainting: StableDiffusionInpaintPipeline
    folder: Path
    inpainting_folder: Path

    def use_scheduler(self, scheduler: Any) -> None:
        for pipeline in (self.text_to_image, self.image_to_image, self.inpainting):
            pipeline.scheduler = scheduler


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("sd15-toy")
    write_tokenizer_folder(root / "vocabulary")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "vocabulary", model_max_length=77)
    torch.manual_seed(0)
    text_config: dict[str, Any] = TEXT_ENCODER_CONFIG | {"vocab_size": len(tokenizer)}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    inpainting_unet = UNet2DConditionModel(**INPAINTING_UNET_CONFIG).eval()
    for model in (text_encoder, vae, unet, inpainting_unet):
        perturb_norms(model)
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler.from_config(SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    text_to_image = StableDiffusionPipeline(unet=unet, **components)
    inpainting = StableDiffusionInpaintPipeline(unet=inpainting_unet, **components)
    for pipeline in (text_to_image, inpainting):
        pipeline.set_progress_bar_config(disable=True)
    for pipeline, name in [(text_to_image, "stable-diffusion"), (inpainting, "stable-diffusion-inpainting")]:
        pipeline.save_pretrained(root / name)
        # transformers 5 saves only `tokenizer.json`; Hub downloads of SD1.5 also have the slow tokenizer's files.
        for file in ("vocab.json", "merges.txt"):
            shutil.copy(root / "vocabulary" / file, root / name / "tokenizer" / file)
    image_to_image = StableDiffusionImg2ImgPipeline(**text_to_image.components)
    image_to_image.set_progress_bar_config(disable=True)
    return Reference(
        text_to_image=text_to_image,
        image_to_image=image_to_image,
        inpainting=inpainting,
        folder=root / "stable-diffusion",
        inpainting_folder=root / "stable-diffusion-inpainting",
    )


# -- ours ------------------------------------------------------------------------------------------------------


def toy_unet(in_channels: int = 4) -> SD1UNet:
    return SD1UNet(
        in_channels, channels=UNET_CHANNELS, context_embedding_dim=TEXT_WIDTH, num_attention_heads=HEADS, device="meta"
    )


def toy_autoencoder() -> LatentDiffusionAutoencoder:
    return LatentDiffusionAutoencoder(0.18215, block_out_channels=VAE_CHANNELS, layers_per_block=1, device="meta")


def toy_text_encoder(vocabulary_size: int) -> CLIPTextEncoder:
    return CLIPTextEncoder(
        embedding_dim=TEXT_WIDTH,
        vocabulary_size=vocabulary_size,
        num_layers=2,
        num_attention_heads=4,
        feedforward_dim=64,
        gelu_approximation="quick",
        device="meta",
    )


@dataclass
class Weights:
    """Our converted weights, one safetensors file per component (the Hello World's `clip`, `lda`, `unet`)."""

    clip: Path
    lda: Path
    unet: Path
    inpainting_unet: Path
    vocabulary_size: int


@pytest.fixture(scope="module")
def weights(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Weights:
    """The pipelines' folders converted with the refiners key maps, as `refiners-convert` writes them."""
    folder, out = reference.folder, tmp_path_factory.mktemp("refiners-weights")
    tokenizer = CLIPTokenizer(folder / "tokenizer" / "vocab.json", folder / "tokenizer" / "merges.txt")
    vocabulary_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text(encoding="utf-8")))
    clip = convert_transformers_clip_text(
        load_from_safetensors(folder / "text_encoder" / "model.safetensors"), toy_text_encoder(vocabulary_size)
    )
    # The tokenizer travels in the weights' metadata: `load_from_safetensors` gives the encoder its tokenizer.
    save_to_safetensors(out / "clip.safetensors", clip, metadata=tokenizer.to_metadata())
    lda = convert_diffusers_autoencoder(
        load_from_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors"), toy_autoencoder()
    )
    save_to_safetensors(out / "lda.safetensors", lda)
    unet = convert_diffusers_unet(
        load_from_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors"), toy_unet()
    )
    save_to_safetensors(out / "unet.safetensors", unet)
    inpainting_folder = reference.inpainting_folder
    inpainting_unet = convert_diffusers_unet(
        load_from_safetensors(inpainting_folder / "unet" / "diffusion_pytorch_model.safetensors"), toy_unet(9)
    )
    save_to_safetensors(out / "unet-inpainting.safetensors", inpainting_unet)
    return Weights(
        clip=out / "clip.safetensors",
        lda=out / "lda.safetensors",
        unet=out / "unet.safetensors",
        inpainting_unet=out / "unet-inpainting.safetensors",
        vocabulary_size=vocabulary_size,
    )


def load_toy(weights: Weights, solver: Solver | None = None, inpainting: bool = False) -> StableDiffusion_1:
    """Ours, the recommended way: built on the meta device, then each component loaded from its file."""
    model_class = StableDiffusion_1_Inpainting if inpainting else StableDiffusion_1
    sd = model_class(
        unet=toy_unet(9 if inpainting else 4),
        lda=toy_autoencoder(),
        clip_text_encoder=toy_text_encoder(weights.vocabulary_size),
        solver=solver,
        device="meta",
    )
    sd.clip_text_encoder.load_from_safetensors(weights.clip)
    sd.lda.load_from_safetensors(weights.lda)
    sd.unet.load_from_safetensors(weights.inpainting_unet if inpainting else weights.unet)
    return sd


@pytest.fixture(scope="module")
def sd(weights: Weights) -> StableDiffusion_1:
    return load_toy(weights, solver=DDIM(num_inference_steps=30))


@pytest.fixture(scope="module")
def sd_inpainting(weights: Weights) -> StableDiffusion_1_Inpainting:
    sd = load_toy(weights, solver=DDIM(num_inference_steps=30), inpainting=True)
    assert isinstance(sd, StableDiffusion_1_Inpainting)
    return sd


@pytest.fixture
def ddim(reference: Reference) -> None:
    reference.use_scheduler(DDIMScheduler.from_config(SCHEDULER_CONFIG))


# -- helpers ---------------------------------------------------------------------------------------------------


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


def psnr(image: Image.Image, expected: Image.Image) -> float:
    assert image.size == expected.size and image.mode == expected.mode
    difference = np.asarray(image, dtype=np.float64) - np.asarray(expected, dtype=np.float64)
    mse = float(np.mean(difference**2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def assert_same_images(images: list[Image.Image], expected: list[Image.Image]) -> None:
    assert len(images) == len(expected)
    for image, reference_image in zip(images, expected, strict=True):
        assert psnr(image, reference_image) >= MIN_PSNR


def reference_images(reference: Reference, latents: Tensor) -> list[Image.Image]:
    """diffusers' decoding of latents to PIL images (the end of its pipelines)."""
    pipeline = reference.text_to_image
    with torch.no_grad():
        decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
    images = pipeline.image_processor.postprocess(decoded, output_type="pil")
    assert isinstance(images, list)
    return images


def latents_from(pipeline: Any, *args: Any, **kwargs: Any) -> Tensor:
    """The final latents of a diffusers pipeline's generation."""
    with torch.no_grad():
        latents = pipeline(*args, output_type="latent", **kwargs).images
    assert isinstance(latents, Tensor)
    return latents


def images_from(pipeline: Any, *args: Any, **kwargs: Any) -> list[Image.Image]:
    """The images of a diffusers pipeline's generation."""
    with torch.no_grad():
        images = pipeline(*args, **kwargs).images
    assert isinstance(images, list)
    return images


def generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def init_image() -> Image.Image:
    """A smooth RGB image: a colour gradient with a bright disc."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    disc = ((x - 60) ** 2 + (y - 28) ** 2 < 15**2) * 120.0
    channels = [x / WIDTH * 200 + disc, y / HEIGHT * 200, (x + y) / (WIDTH + HEIGHT) * 255 - disc / 2]
    return Image.fromarray(np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8))


def mask_image() -> Image.Image:
    """White (paint) in a box, and grey levels on both sides of the 0.5 threshold that both binarize."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[16:48, 24:72] = 255
    mask[0:8, :] = 100  # kept
    mask[56:64, :] = 200  # painted
    return Image.fromarray(mask, mode="L")


def run_loop(
    sd: StableDiffusion_1, x: Tensor, embedding: Tensor, scale: float, rng: torch.Generator | None = None
) -> Tensor:
    with torch.no_grad():
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=scale, generator=rng)
    return x


# -- parity, step by step --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "scheduler", "steps"),
    [
        (DDIM, DDIMScheduler, 10),
        (DPMSolver, DPMSolverMultistepScheduler, 10),
    ],
    ids=["DDIM", "DPMSolver"],
)
def test_text_to_image_matches_diffusers(
    reference: Reference, weights: Weights, solver: type[Solver], scheduler: Any, steps: int
) -> None:
    reference.use_scheduler(scheduler.from_config(SCHEDULER_CONFIG))
    sd = load_toy(weights, solver=solver(num_inference_steps=30))
    noise = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=generator())
    expected = latents_from(
        reference.text_to_image,
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=7.5,
        latents=noise.clone(),
    )
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding(PROMPT, negative_text=NEGATIVE_PROMPT)
    sd.set_num_inference_steps(steps)
    x = sd.init_latents((HEIGHT, WIDTH), noise=noise)
    assert len(sd.steps) == steps
    x = run_loop(sd, x, embedding, 7.5)
    assert_matches(x, expected)
    with torch.no_grad():
        image = sd.lda.decode_latents(x)
    assert psnr(image, reference_images(reference, expected)[0]) >= MIN_PSNR


def test_text_embedding_matches_diffusers(reference: Reference, sd: StableDiffusion_1) -> None:
    with torch.no_grad():
        positive, negative = reference.text_to_image.encode_prompt(
            PROMPTS, "cpu", 1, True, negative_prompt=NEGATIVE_PROMPTS
        )
        assert negative is not None
        embedding = sd.compute_clip_text_embedding(PROMPTS, negative_text=NEGATIVE_PROMPTS)
    assert embedding.shape == (4, 77, TEXT_WIDTH)
    assert_matches(embedding, torch.cat([negative, positive]))


def test_image_to_image_matches_diffusers(reference: Reference, sd: StableDiffusion_1, ddim: None) -> None:
    expected = latents_from(
        reference.image_to_image,
        PROMPT,
        image=init_image(),
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=7.5,
        generator=generator(),
    )
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding(PROMPT)
        sd.set_num_inference_steps(10)
        # The same seed: the image's posterior draw, then the noise, as diffusers draws them.
        x = sd.init_latents((HEIGHT, WIDTH), init_image(), strength=0.6, generator=generator())
    assert sd.steps == list(range(4, 10))  # int(10 * 0.6) = 6 steps, as diffusers runs
    x = run_loop(sd, x, embedding, 7.5)
    assert_matches(x, expected)


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_matches_diffusers(
    reference: Reference, sd_inpainting: StableDiffusion_1_Inpainting, ddim: None, strength: float
) -> None:
    expected = latents_from(
        reference.inpainting,
        PROMPT,
        image=init_image(),
        mask_image=mask_image(),
        height=HEIGHT,
        width=WIDTH,
        strength=strength,
        num_inference_steps=8,
        guidance_scale=7.5,
        generator=generator(),
    )
    with torch.no_grad():
        embedding = sd_inpainting.compute_clip_text_embedding(PROMPT)
        sd_inpainting.set_num_inference_steps(8)
        rng = generator()
        x = sd_inpainting.init_latents((HEIGHT, WIDTH), init_image(), strength=strength, generator=rng)
        mask, masked_image_latents = sd_inpainting.set_inpainting_conditions(init_image(), mask_image(), rng)
    assert mask.shape == (1, 1, HEIGHT // 8, WIDTH // 8) and masked_image_latents.shape == (1, 4, 8, 12)
    x = run_loop(sd_inpainting, x, embedding, 7.5)
    assert_matches(x, expected)
    with torch.no_grad():
        image = sd_inpainting.lda.decode_latents(x)
    assert psnr(image, reference_images(reference, expected)[0]) >= MIN_PSNR


def test_hello_world(reference: Reference, weights: Weights) -> None:
    """The seed README's Hello World, word for word but for the toy components and the files' paths; both ways."""
    pipeline = StableDiffusionPipeline(**reference.text_to_image.components)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG)  # StableDiffusion_1's default solver
    pipeline.set_progress_bar_config(disable=True)
    prompt = "a cute cat"
    manual_seed(2)
    noise = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8)
    expected = latents_from(
        pipeline,
        prompt,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=30,
        latents=noise,
    )
    expected_image = reference_images(reference, expected)[0]

    for device in ["meta", "cpu"]:
        sd15 = StableDiffusion_1(
            unet=SD1UNet(
                channels=UNET_CHANNELS, context_embedding_dim=TEXT_WIDTH, num_attention_heads=HEADS, device=device
            ),
            lda=LatentDiffusionAutoencoder(0.18215, block_out_channels=VAE_CHANNELS, layers_per_block=1, device=device),
            clip_text_encoder=CLIPTextEncoder(
                embedding_dim=TEXT_WIDTH,
                vocabulary_size=weights.vocabulary_size,
                num_layers=2,
                num_attention_heads=4,
                feedforward_dim=64,
                gelu_approximation="quick",
                device=device,
            ),
            device=device,
        )
        sd15.clip_text_encoder.load_from_safetensors(weights.clip)
        sd15.lda.load_from_safetensors(weights.lda)
        sd15.unet.load_from_safetensors(weights.unet)
        assert all(tensor.device.type == "cpu" for tensor in [*sd15.parameters(), *sd15.buffers()])

        with torch.no_grad():
            clip_text_embedding = sd15.compute_clip_text_embedding(prompt)
        sd15.set_num_inference_steps(30)
        manual_seed(2)
        x = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, device=sd15.device)
        with torch.no_grad():
            for step in sd15.steps:
                x = sd15(x, step=step, clip_text_embedding=clip_text_embedding, condition_scale=7.5)
        predicted_image = sd15.lda.decode_latents(x)

        assert_matches(x, expected)
        assert psnr(predicted_image, expected_image) >= MIN_PSNR


# -- parity, in one call ---------------------------------------------------------------------------------------


def test_generate_text_to_image_matches_diffusers(reference: Reference, sd: StableDiffusion_1, ddim: None) -> None:
    kwargs: dict[str, Any] = {"num_inference_steps": 6, "height": HEIGHT, "width": WIDTH, "num_images_per_prompt": 2}
    expected = images_from(
        reference.text_to_image, PROMPTS, negative_prompt=NEGATIVE_PROMPTS, generator=generator(), **kwargs
    )
    images = sd.generate(PROMPTS, negative_prompt=NEGATIVE_PROMPTS, seed=SEED, progress=False, **kwargs)
    assert len(images) == 4 and images[0].size == (WIDTH, HEIGHT)
    assert_same_images(images, expected)


def test_generate_without_guidance_matches_diffusers(reference: Reference, sd: StableDiffusion_1, ddim: None) -> None:
    kwargs: dict[str, Any] = {"num_inference_steps": 6, "height": HEIGHT, "width": WIDTH, "guidance_scale": 1.0}
    expected = images_from(reference.text_to_image, PROMPT, generator=generator(), **kwargs)
    assert_same_images(sd.generate(PROMPT, seed=SEED, progress=False, **kwargs), expected)


def test_generate_image_to_image_matches_diffusers(reference: Reference, sd: StableDiffusion_1, ddim: None) -> None:
    kwargs: dict[str, Any] = {"num_inference_steps": 6, "strength": 0.7, "guidance_scale": 5.0}
    expected = images_from(reference.image_to_image, PROMPT, image=init_image(), generator=generator(), **kwargs)
    # The size defaults to the init image's, as in diffusers' image-to-image pipeline.
    assert_same_images(sd.generate(PROMPT, init_image=init_image(), seed=SEED, progress=False, **kwargs), expected)


def test_generate_inpainting_matches_diffusers(
    reference: Reference, sd_inpainting: StableDiffusion_1_Inpainting, ddim: None
) -> None:
    """A larger image and mask, resized to the requested size (Lanczos, then the mask binarized) on both sides."""
    image = init_image().resize((2 * WIDTH, 2 * HEIGHT), resample=Image.Resampling.BICUBIC)
    mask = mask_image().resize((2 * WIDTH, 2 * HEIGHT), resample=Image.Resampling.BILINEAR)
    kwargs: dict[str, Any] = {"num_inference_steps": 6, "num_images_per_prompt": 2, "height": HEIGHT, "width": WIDTH}
    expected = images_from(reference.inpainting, PROMPT, image=image, mask_image=mask, generator=generator(), **kwargs)
    images = sd_inpainting.generate(PROMPT, init_image=image, mask=mask, seed=SEED, progress=False, **kwargs)
    assert images[0].size == (WIDTH, HEIGHT)
    assert_same_images(images, expected)


def test_generate_with_a_stochastic_solver_matches_diffusers(reference: Reference, weights: Weights) -> None:
    """Euler ancestral draws noise at every step (from the seed's generator) and scales the initial noise."""
    reference.use_scheduler(EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    sd = load_toy(weights, solver=EulerAncestral(num_inference_steps=30))
    kwargs: dict[str, Any] = {"num_inference_steps": 6, "height": HEIGHT, "width": WIDTH}
    expected = images_from(reference.text_to_image, PROMPT, generator=generator(), **kwargs)
    assert_same_images(sd.generate(PROMPT, seed=SEED, progress=False, **kwargs), expected)


def test_seeded_reproducibility(reference: Reference, sd: StableDiffusion_1, ddim: None) -> None:
    """A seed, or torch's global seed (`manual_seed`), gives diffusers' images; another seed gives others."""
    kwargs: dict[str, Any] = {"num_inference_steps": 4, "height": HEIGHT, "width": WIDTH}
    torch.manual_seed(5)
    expected = images_from(reference.text_to_image, PROMPT, **kwargs)
    manual_seed(5)
    assert_same_images(sd.generate(PROMPT, progress=False, **kwargs), expected)

    expected = images_from(reference.text_to_image, PROMPT, generator=generator(7), **kwargs)
    assert_same_images(sd.generate(PROMPT, seed=7, progress=False, **kwargs), expected)
    other = sd.generate(PROMPT, seed=8, progress=False, **kwargs)
    assert psnr(other[0], expected[0]) < MIN_PSNR


# -- construction ----------------------------------------------------------------------------------------------


def test_default_components_are_sd15_on_the_meta_device() -> None:
    """`StableDiffusion_1(device="meta")` allocates nothing; its components have diffusers' SD1.5 parameters."""
    sd15 = StableDiffusion_1(device="meta")
    assert isinstance(sd15.unet, SD1UNet) and sd15.unet.in_channels == 4
    assert isinstance(sd15.lda, SD1Autoencoder)
    assert isinstance(sd15.clip_text_encoder, CLIPTextEncoderL)
    assert isinstance(sd15.solver, DPMSolver) and sd15.solver.num_inference_steps == 30
    assert all(
        p.is_meta for p in [*sd15.unet.parameters(), *sd15.lda.parameters(), *sd15.clip_text_encoder.parameters()]
    )
    # The schedule is real: it is computed when the solver is built.
    assert sd15.solver.device.type == "cpu" and sd15.solver.timesteps[0] == 999
    assert repr(sd15) == (
        "StableDiffusion_1(unet=SD1UNet, lda=SD1Autoencoder, clip_text_encoder=CLIPTextEncoderL, "
        "solver=DPMSolver(num_inference_steps=30), device=meta, dtype=float32)"
    )
    inpainting = StableDiffusion_1_Inpainting(device="meta")
    assert inpainting.unet.in_channels == 9

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    for ours, theirs in [(sd15.unet, unet), (sd15.lda, vae), (sd15.clip_text_encoder, text_encoder)]:
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_given_components_move_to_the_device_and_dtype(weights: Weights) -> None:
    sd = load_toy(weights)
    sd.to(dtype=torch.float64)
    assert sd.dtype == torch.float64 and sd.lda.dtype == torch.float64
    moved = StableDiffusion_1(unet=sd.unet, lda=sd.lda, clip_text_encoder=sd.clip_text_encoder, dtype=torch.float32)
    assert moved.dtype == torch.float32 and moved.clip_text_encoder.dtype == torch.float32


def test_docstring_example() -> None:
    (code,) = re.findall(r"```py\n(.*?)\s*```", inspect.getdoc(StableDiffusion_1) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(code), "<example of StableDiffusion_1>", "exec"), {"__name__": "example"})


def test_exports() -> None:
    import refiners.foundationals.latent_diffusion as latent_diffusion

    assert stable_diffusion_1_package.StableDiffusion_1 is StableDiffusion_1
    for name in ["StableDiffusion_1", "StableDiffusion_1_Inpainting", "SD1UNet", "SD1Autoencoder", "DDIM", "DPMSolver"]:
        assert name in latent_diffusion.__all__ and hasattr(latent_diffusion, name)


# -- errors ----------------------------------------------------------------------------------------------------


def test_size_must_be_a_multiple_of_8(sd: StableDiffusion_1) -> None:
    with pytest.raises(ValueError, match=re.escape("multiples of 8") + ".*height=60, width=96.*use e.g. height=56"):
        sd.generate(PROMPT, height=60, width=WIDTH, progress=False)
    with pytest.raises(ValueError, match=re.escape("got height=64, width=100")):
        sd.init_latents((64, 100))


def test_mask_must_have_the_size_of_its_image(sd_inpainting: StableDiffusion_1_Inpainting) -> None:
    small_mask = mask_image().resize((WIDTH // 2, HEIGHT // 2))
    expected = re.escape("got a 48x32 mask for a 96x64 init_image (width x height)")
    with pytest.raises(ValueError, match=expected):
        sd_inpainting.generate(PROMPT, init_image=init_image(), mask=small_mask, progress=False)
    with pytest.raises(ValueError, match=re.escape("got a 48x32 mask for a 96x64 image")):
        sd_inpainting.set_inpainting_conditions(init_image(), small_mask)


@pytest.mark.parametrize("strength", [0.0, -0.2, 1.5])
def test_strength_must_be_in_0_1(sd: StableDiffusion_1, strength: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"strength must be in (0, 1], got {strength}")):
        sd.generate(PROMPT, init_image=init_image(), strength=strength, progress=False)
    with pytest.raises(ValueError, match=re.escape(f"strength must be in (0, 1], got {strength}")):
        sd.init_latents((HEIGHT, WIDTH), init_image(), strength=strength)


def test_strength_errors(sd: StableDiffusion_1) -> None:
    with pytest.raises(ValueError, match=re.escape("strength=0.5 needs an init_image")):
        sd.generate(PROMPT, strength=0.5, progress=False)
    with pytest.raises(ValueError, match="no init_image was given"):
        sd.init_latents((HEIGHT, WIDTH), strength=0.5)
    sd.set_num_inference_steps(4)
    with pytest.raises(ValueError, match=re.escape("strength=0.2 of 4 steps leaves no step to run")):
        sd.init_latents((HEIGHT, WIDTH), init_image(), strength=0.2)


def test_inpainting_inputs_errors(sd: StableDiffusion_1, sd_inpainting: StableDiffusion_1_Inpainting) -> None:
    with pytest.raises(ValueError, match="use StableDiffusion_1_Inpainting"):
        sd.generate(PROMPT, init_image=init_image(), mask=mask_image(), progress=False)
    with pytest.raises(ValueError, match=re.escape("inpainting needs the image to paint into (init_image) and where")):
        sd_inpainting.generate(PROMPT, init_image=init_image(), progress=False)
    fresh = StableDiffusion_1_Inpainting(
        unet=sd_inpainting.unet, lda=sd_inpainting.lda, clip_text_encoder=sd_inpainting.clip_text_encoder
    )
    embedding = torch.zeros(2, 77, TEXT_WIDTH)
    with pytest.raises(ValueError, match=re.escape("call set_inpainting_conditions(target_image, mask) first")):
        fresh(torch.zeros(1, 4, 8, 12), step=0, clip_text_embedding=embedding)


def test_other_input_errors(sd: StableDiffusion_1) -> None:
    with pytest.raises(ValueError, match="negative_prompt only acts through classifier-free guidance"):
        sd.generate(PROMPT, negative_prompt="blurry", guidance_scale=1.0, progress=False)
    with pytest.raises(ValueError, match="prompt is an empty list"):
        sd.generate([], progress=False)
    with pytest.raises(ValueError, match="give one negative prompt per prompt"):
        sd.compute_clip_text_embedding(PROMPTS, negative_text=["blurry"])
    with pytest.raises(ValueError, match=re.escape("must be (1, 4, 8, 12), got (1, 4, 8, 8)")):
        sd.init_latents((HEIGHT, WIDTH), noise=torch.zeros(1, 4, 8, 8), batch_size=1)
    sd.set_num_inference_steps(5)
    with pytest.raises(ValueError, match=re.escape("got shape (1, 77, 32) for 1 latents")):
        sd(torch.zeros(1, 4, 8, 12), step=0, clip_text_embedding=torch.zeros(1, 77, TEXT_WIDTH))


def test_components_must_fit_together() -> None:
    with pytest.raises(ValueError, match="use StableDiffusion_1_Inpainting for an inpainting UNet"):
        StableDiffusion_1(unet=toy_unet(9), lda=toy_autoencoder(), clip_text_encoder=toy_text_encoder(600))
    with pytest.raises(ValueError, match="use StableDiffusion_1 for a text-to-image UNet"):
        StableDiffusion_1_Inpainting(unet=toy_unet(4), lda=toy_autoencoder(), clip_text_encoder=toy_text_encoder(600))
    with pytest.raises(ValueError, match="text embeddings of size 32 but the text encoder makes them of size 768"):
        StableDiffusion_1(unet=toy_unet(4), lda=toy_autoencoder(), device="meta")
