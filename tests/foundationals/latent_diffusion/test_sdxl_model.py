"""StableDiffusion_XL generates what diffusers' StableDiffusionXLPipeline generates (toy sizes, random weights)."""

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from PIL import Image
from toy_sdxl import SCHEDULER_CONFIG, Twins, build_twins

from refiners.foundationals.latent_diffusion import DDIM, Euler, Solver
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
    SDXL_LIGHTNING_SOLVER_PARAMS,
    SDXL_SOLVER_PARAMS,
    StableDiffusion_XL,
    StableDiffusion_XL_Inpainting,
)

HEIGHT, WIDTH = 64, 48
SEED = 12
PROMPTS = ["a cute cat", "a red car"]


@pytest.fixture(scope="module")
def twins() -> Twins:
    return build_twins()


def sdxl(twins: Twins, solver: Solver) -> StableDiffusion_XL:
    return StableDiffusion_XL(
        unet=twins.unet, lda=twins.lda, clip_text_encoder=twins.text_encoder, solver=solver, default_size=64
    )


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def reference_latents(twins: Twins, scheduler: Any, **kwargs: Any) -> torch.Tensor:
    twins.pipeline.scheduler = scheduler
    with torch.no_grad():
        output = twins.pipeline(height=HEIGHT, width=WIDTH, output_type="latent", generator=generator(), **kwargs)
    latents = output.images  # pyright: ignore[reportAttributeAccessIssue]
    assert isinstance(latents, torch.Tensor)
    return latents


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    ("solver", "scheduler"),
    [(DDIM, DDIMScheduler), (Euler, EulerDiscreteScheduler)],
)
def test_step_by_step_matches_diffusers(twins: Twins, solver: type[Solver], scheduler: Any) -> None:
    # SDXL's scheduler config spaces timesteps as "leading" (diffusers' Euler default, SD1.5's, is "linspace").
    expected = reference_latents(
        twins,
        scheduler.from_config(SCHEDULER_CONFIG),
        prompt=PROMPTS[0],
        negative_prompt="blurry",
        num_inference_steps=5,
    )
    model = sdxl(twins, solver(num_inference_steps=5, params=SDXL_SOLVER_PARAMS))
    with torch.no_grad():
        embedding, pooled = model.compute_clip_text_embedding(PROMPTS[0], negative_text="blurry")
        time_ids = model.default_time_ids(original_size=(HEIGHT, WIDTH), target_size=(HEIGHT, WIDTH))
        x = model.init_latents((HEIGHT, WIDTH), generator=generator())
        for step in model.steps:
            x = model(x, step, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids)
    assert_matches(x, expected)


def test_generate_matches_diffusers(twins: Twins) -> None:
    # Two prompts, two images each, no negative prompt: diffusers' zero negative embeddings.
    kwargs: dict[str, Any] = {"num_inference_steps": 4, "num_images_per_prompt": 2, "guidance_scale": 6.0}
    expected = reference_latents(twins, DDIMScheduler.from_config(SCHEDULER_CONFIG), prompt=PROMPTS, **kwargs)
    model = sdxl(twins, DDIM(num_inference_steps=4, params=SDXL_SOLVER_PARAMS))
    expected_images = twins.pipeline.image_processor.postprocess(  # pyright: ignore[reportUnknownMemberType]
        twins.pipeline.vae.decode(expected / 0.13025).sample.detach(), output_type="pil"
    )
    images = model.generate(PROMPTS, height=HEIGHT, width=WIDTH, seed=SEED, progress=False, **kwargs)
    assert len(images) == 4 and images[0].size == (WIDTH, HEIGHT)
    assert isinstance(expected_images, list)
    for image, reference in zip(images, expected_images, strict=True):
        assert isinstance(reference, Image.Image)
        difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
        assert difference.max() <= 1


def test_micro_conditioning_moves_the_image(twins: Twins) -> None:
    kwargs: dict[str, Any] = {"num_inference_steps": 3, "height": HEIGHT, "width": WIDTH, "seed": SEED}
    model = sdxl(twins, DDIM(num_inference_steps=3, params=SDXL_SOLVER_PARAMS))
    expected = reference_latents(
        twins,
        DDIMScheduler.from_config(SCHEDULER_CONFIG),
        prompt=PROMPTS[0],
        num_inference_steps=3,
        original_size=(512, 256),
        crops_coords_top_left=(16, 32),
    )
    plain = np.asarray(model.generate(PROMPTS[0], progress=False, **kwargs)[0], dtype=np.int16)
    conditioned = model.generate(
        PROMPTS[0], progress=False, original_size=(512, 256), crops_coords_top_left=(16, 32), **kwargs
    )[0]
    assert np.abs(np.asarray(conditioned, dtype=np.int16) - plain).max() > 0
    with torch.no_grad():
        decoded = twins.pipeline.vae.decode(expected / 0.13025).sample
    reference = twins.pipeline.image_processor.postprocess(decoded, output_type="pil")[0]  # pyright: ignore
    assert isinstance(reference, Image.Image)
    assert np.abs(np.asarray(conditioned, dtype=np.int16) - np.asarray(reference, dtype=np.int16)).max() <= 1


def test_missing_sdxl_conditioning_is_named(twins: Twins) -> None:
    model = sdxl(twins, DDIM(num_inference_steps=3, params=SDXL_SOLVER_PARAMS))
    with pytest.raises(ValueError, match=r"also needs \['pooled_text_embedding', 'time_ids'\]"):
        model(torch.zeros(1, 4, 8, 6), 0, clip_text_embedding=torch.zeros(2, 77, 80))


def test_generate_image_to_image_matches_diffusers(twins: Twins) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
        StableDiffusionXLImg2ImgPipeline,
    )

    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, ((x - 24) ** 2 + (y - 30) ** 2 < 200) * 200.0], axis=-1)
    init_image = Image.fromarray(pixels.astype(np.uint8))
    pipeline = StableDiffusionXLImg2ImgPipeline(**twins.pipeline.components, requires_aesthetics_score=False)
    pipeline.scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)  # pyright: ignore[reportAttributeAccessIssue]
    with torch.no_grad():
        expected = pipeline(
            PROMPTS[0], image=init_image, strength=0.6, num_inference_steps=5, generator=generator()
        ).images[0]  # pyright: ignore[reportAttributeAccessIssue]
    model = sdxl(twins, DDIM(num_inference_steps=5, params=SDXL_SOLVER_PARAMS))
    image = model.generate(
        PROMPTS[0], init_image=init_image, strength=0.6, num_inference_steps=5, seed=SEED, progress=False
    )[0]
    assert image.size == (WIDTH, HEIGHT)
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1


def test_generate_inpainting_matches_diffusers() -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
        StableDiffusionXLInpaintPipeline,
    )

    twins = build_twins(seed=1, in_channels=9)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, np.full_like(x, 90.0)], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))
    mask = Image.fromarray(((np.abs(x - 24) < 12) & (np.abs(y - 32) < 16)).astype(np.uint8) * 255)
    pipeline = StableDiffusionXLInpaintPipeline(**twins.pipeline.components, requires_aesthetics_score=False)
    pipeline.scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)  # pyright: ignore[reportAttributeAccessIssue]
    kwargs: dict[str, Any] = {"strength": 1.0, "num_inference_steps": 4, "height": HEIGHT, "width": WIDTH}
    with torch.no_grad():
        expected = pipeline(PROMPTS[0], image=image, mask_image=mask, generator=generator(), **kwargs).images[0]  # pyright: ignore[reportAttributeAccessIssue]
    model = StableDiffusion_XL_Inpainting(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=4, params=SDXL_SOLVER_PARAMS),
    )
    ours = model.generate(PROMPTS[0], init_image=image, mask=mask, seed=SEED, progress=False, **kwargs)[0]
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1
    assert model.default_guidance_scale == 7.5  # diffusers' SDXL inpainting pipeline's default, not SDXL's 5.0
    # The conditions matter: another mask gives another image.
    other = model.generate(
        PROMPTS[0],
        init_image=image,
        mask=mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        seed=SEED,
        progress=False,
        **kwargs,
    )[0]
    assert np.abs(np.asarray(other, dtype=np.int16) - np.asarray(ours, dtype=np.int16)).max() > 1


def test_lightning_schedule_without_guidance_matches_diffusers(twins: Twins) -> None:
    # SDXL-Lightning's set-up: Euler, "trailing" timesteps, 4 steps, no classifier-free guidance.
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG, timestep_spacing="trailing")
    expected = reference_latents(twins, scheduler, prompt=PROMPTS[0], num_inference_steps=4, guidance_scale=0.0)
    model = sdxl(twins, Euler(num_inference_steps=4, params=SDXL_LIGHTNING_SOLVER_PARAMS))
    with torch.no_grad():
        embedding, pooled = model.clip_text_encoder(PROMPTS[0])
        time_ids = model.default_time_ids(original_size=(HEIGHT, WIDTH), target_size=(HEIGHT, WIDTH))
        x = model.init_latents((HEIGHT, WIDTH), generator=generator())
        conditioning = {"clip_text_embedding": embedding, "pooled_text_embedding": pooled, "time_ids": time_ids}
        for step in model.steps:
            x = model._denoise(x, step, conditioning, None, None)  # pyright: ignore[reportPrivateUsage]
    assert_matches(x, expected)
    images = model.generate(
        PROMPTS[0], num_inference_steps=4, guidance_scale=0.0, height=HEIGHT, width=WIDTH, seed=SEED, progress=False
    )
    decoded = twins.pipeline.vae.decode(expected / 0.13025).sample.detach()
    reference = twins.pipeline.image_processor.postprocess(decoded, output_type="pil")  # pyright: ignore[reportUnknownMemberType]
    assert isinstance(reference, list)
    assert np.abs(np.asarray(images[0], dtype=np.int16) - np.asarray(reference[0], dtype=np.int16)).max() <= 1


def test_lcm_schedule_without_guidance_matches_diffusers(twins: Twins) -> None:
    # LCM-LoRA SDXL's set-up (the LoRA aside): diffusers' LCMScheduler from SDXL's config, 4 steps, guidance 1 (none).
    from diffusers.schedulers.scheduling_lcm import LCMScheduler

    from refiners.foundationals.latent_diffusion import LCMSolver

    expected = reference_latents(
        twins, LCMScheduler.from_config(SCHEDULER_CONFIG), prompt=PROMPTS[0], num_inference_steps=4, guidance_scale=1.0
    )
    model = sdxl(twins, LCMSolver(num_inference_steps=4))
    images = model.generate(
        PROMPTS[0], num_inference_steps=4, guidance_scale=1.0, height=HEIGHT, width=WIDTH, seed=SEED, progress=False
    )
    decoded = twins.pipeline.vae.decode(expected / 0.13025).sample.detach()
    reference = twins.pipeline.image_processor.postprocess(decoded, output_type="pil")  # pyright: ignore[reportUnknownMemberType]
    assert isinstance(reference, list)
    assert np.abs(np.asarray(images[0], dtype=np.int16) - np.asarray(reference[0], dtype=np.int16)).max() <= 1
