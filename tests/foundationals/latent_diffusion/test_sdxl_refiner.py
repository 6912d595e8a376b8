"""The SDXL refiner and the base-to-refiner hand-off equal diffusers' `StableDiffusionXLImg2ImgPipeline` (toy sizes).

The refiner conditions on OpenCLIP-G alone, and its time ids hold an aesthetic score: the negative prompt's lower one
(2.5) than the prompt's (6.0), so the two halves of the guided batch have different time ids.
"""

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from PIL import Image
from toy_sdxl import SCHEDULER_CONFIG, Twins, build_refiner_pipeline, build_twins, our_refiner

from refiners.foundationals.latent_diffusion import DDIM, Euler, Solver
from refiners.foundationals.latent_diffusion.model import batch_conditioning
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
    SDXL_SOLVER_PARAMS,
    StableDiffusion_XL,
    StableDiffusion_XL_Refiner,
)

HEIGHT, WIDTH = 128, 96  # the refiner has four resolutions: 2x2 latents at the lowest (1x1 is ill-conditioned)
SEED = 3
PROMPT = "a cute cat"


@pytest.fixture(scope="module")
def twins() -> Twins:
    return build_twins()


@pytest.fixture(scope="module")
def refiner_pipeline(twins: Twins) -> StableDiffusionXLImg2ImgPipeline:
    return build_refiner_pipeline(twins.pipeline)


@pytest.fixture(scope="module")
def refiner(refiner_pipeline: StableDiffusionXLImg2ImgPipeline, twins: Twins) -> StableDiffusion_XL_Refiner:
    return our_refiner(refiner_pipeline, twins.lda)


def base(twins: Twins, solver: Solver) -> StableDiffusion_XL:
    return StableDiffusion_XL(
        unet=twins.unet, lda=twins.lda, clip_text_encoder=twins.text_encoder, solver=solver, default_size=64
    )


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def latents_of(output: Any) -> torch.Tensor:
    latents = output.images
    assert isinstance(latents, torch.Tensor)
    return latents


def test_refiner_text_embeddings_match_diffusers(
    refiner_pipeline: StableDiffusionXLImg2ImgPipeline, refiner: StableDiffusion_XL_Refiner
) -> None:
    with torch.no_grad():
        encoded: Any = refiner_pipeline.encode_prompt(
            PROMPT, negative_prompt="blurry", device=torch.device("cpu"), do_classifier_free_guidance=True
        )
        positive, negative, pooled, negative_pooled = encoded
        embedding, ours_pooled = refiner.compute_clip_text_embedding(PROMPT, negative_text="blurry")
    assert embedding.shape == (2, 77, 48)  # OpenCLIP-G's penultimate hidden states alone
    assert_matches(embedding, torch.cat([negative, positive]))
    assert_matches(ours_pooled, torch.cat([negative_pooled, pooled]))


def test_refiner_image_to_image_matches_diffusers(
    refiner_pipeline: StableDiffusionXLImg2ImgPipeline, refiner: StableDiffusion_XL_Refiner
) -> None:
    # The refiner on its own: an image, strength 0.3 (both defaults), the empty negative prompt (not zeros).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    refiner_pipeline.scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    with torch.no_grad():
        expected = latents_of(
            refiner_pipeline(PROMPT, image=image, num_inference_steps=10, generator=generator(), output_type="latent")
        )
    refiner.solver = DDIM(10, params=SDXL_SOLVER_PARAMS)
    latents = refiner.generate_latents(PROMPT, init_image=image, num_inference_steps=10, seed=SEED, progress=False)
    assert len(refiner.steps) == 3  # int(10 * 0.3)
    assert_matches(latents, expected)


@pytest.mark.parametrize(("solver", "scheduler"), [(DDIM, DDIMScheduler), (Euler, EulerDiscreteScheduler)])
def test_base_to_refiner_hand_off_matches_diffusers(
    twins: Twins,
    refiner_pipeline: StableDiffusionXLImg2ImgPipeline,
    refiner: StableDiffusion_XL_Refiner,
    solver: type[Solver],
    scheduler: Any,
) -> None:
    # diffusers' ensemble of experts: the base stops at 70% of the schedule, the refiner denoises the rest.
    twins.pipeline.scheduler = scheduler.from_config(SCHEDULER_CONFIG)
    refiner_pipeline.scheduler = scheduler.from_config(SCHEDULER_CONFIG)
    kwargs: dict[str, Any] = {"num_inference_steps": 10, "output_type": "latent", "negative_prompt": "blurry"}
    options: dict[str, Any] = {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}
    with torch.no_grad():
        handed = latents_of(
            twins.pipeline(PROMPT, height=HEIGHT, width=WIDTH, denoising_end=0.7, generator=generator(), **kwargs)
        )
        expected = latents_of(refiner_pipeline(PROMPT, image=handed, denoising_start=0.7, **options, **kwargs))
    sdxl = base(twins, solver(10, params=SDXL_SOLVER_PARAMS))
    ours_handed = sdxl.generate_latents(
        PROMPT, "blurry", 10, height=HEIGHT, width=WIDTH, seed=SEED, progress=False, denoising_end=0.7
    )
    assert_matches(ours_handed, handed)
    refiner.solver = solver(10, params=SDXL_SOLVER_PARAMS)
    latents = refiner.generate_latents(
        PROMPT, "blurry", 10, progress=False, init_latents=ours_handed, denoising_start=0.7, **options
    )
    assert refiner.steps == list(range(sdxl.hand_off_step(0.7), 10)) and len(refiner.steps) == 3
    assert_matches(latents, expected)
    # The negative time ids matter: the same score on both halves moves the output, by more than 3 times the parity
    # tolerance (a pipeline that gave the negative half the prompts' time ids would fail the comparison above).
    same = refiner.generate_latents(
        PROMPT, "blurry", 10, progress=False, init_latents=ours_handed, denoising_start=0.7, aesthetic_score=7.0,
        negative_aesthetic_score=7.0,
    )  # fmt: skip
    assert (same - latents).abs().max() > 3 * 1e-4 * expected.abs().max()


def test_refiner_step_by_step_takes_negative_time_ids(refiner: StableDiffusion_XL_Refiner) -> None:
    refiner.solver = DDIM(6, params=SDXL_SOLVER_PARAMS)
    expected = refiner.generate_latents(
        PROMPT, num_inference_steps=6, height=HEIGHT, width=WIDTH, seed=SEED, progress=False
    )
    with torch.no_grad():
        embedding, pooled = refiner.compute_clip_text_embedding(PROMPT)
        time_ids = refiner.default_time_ids(original_size=(HEIGHT, WIDTH))
        negative_time_ids = refiner.default_time_ids(original_size=(HEIGHT, WIDTH), aesthetic_score=2.5)
        assert time_ids.tolist() == [[HEIGHT, WIDTH, 0, 0, 6.0]]
        x = refiner.init_latents((HEIGHT, WIDTH), generator=generator())
        for step in refiner.steps:
            x = refiner(
                x, step, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids,
                negative_time_ids=negative_time_ids,
            )  # fmt: skip
    torch.testing.assert_close(x, expected, atol=0, rtol=0)


def test_negative_rows_go_to_the_negative_half() -> None:
    positive, negative = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    batched = batch_conditioning({}, {"time_ids": positive, "negative_time_ids": negative}, batch=2, guided=True)
    assert batched["time_ids"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    unguided = batch_conditioning({}, {"time_ids": positive, "negative_time_ids": negative}, batch=2, guided=False)
    assert unguided["time_ids"].flatten().tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="negative_time_ids is given without time_ids"):
        batch_conditioning({}, {"negative_time_ids": negative}, batch=1, guided=True)


def test_hand_off_mistakes_are_one_line(twins: Twins, refiner: StableDiffusion_XL_Refiner) -> None:
    sdxl = base(twins, DDIM(10, params=SDXL_SOLVER_PARAMS))
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="init_latents and denoising_start go together"):
        refiner.generate(PROMPT, init_latents=latents, progress=False)
    with pytest.raises(ValueError, match=r"denoising_end must be in \(0, 1\)"):
        sdxl.generate(PROMPT, denoising_end=1.5, progress=False)
    with pytest.raises(ValueError, match="init_latents must be"):
        refiner.generate(PROMPT, init_latents=torch.zeros(1, 4, 6, 6), denoising_start=0.5, height=64, width=64)
    with pytest.raises(TypeError, match="unknown option 'aesthetic_score': its options are original_size"):
        sdxl.generate(PROMPT, aesthetic_score=6.0, progress=False)
    with pytest.raises(ValueError, match="aesthetic score instead of a target size"):
        refiner.generate(PROMPT, target_size=(64, 64), progress=False)
