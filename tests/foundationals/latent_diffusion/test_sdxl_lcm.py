"""The LCM SDXL UNet (a guidance embedding, diffusers' `time_cond_proj_dim`) equals diffusers' (toy sizes).

A guidance-distilled UNet takes the guidance scale as an input: diffusers' SDXL pipeline then runs one batch (no
negative prompt) and gives the UNet `get_guidance_scale_embedding(guidance_scale - 1)`; so does ours.
"""

from typing import Any

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from toy_sdxl import SCHEDULER_CONFIG, UNET_CONFIG, Twins, build_twins, our_unet

from refiners.foundationals.latent_diffusion import LCMSolver
from refiners.foundationals.latent_diffusion.range_adapter import compute_guidance_scale_embedding
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL

HEIGHT, WIDTH = 64, 48
SEED = 5
PROMPTS = ["a cute cat", "a red car"]
GUIDANCE_DIM = 8


@pytest.fixture(scope="module")
def twins() -> Twins:
    twins = build_twins()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        lcm_unet = UNet2DConditionModel(**UNET_CONFIG, time_cond_proj_dim=GUIDANCE_DIM).eval()
    components: dict[str, Any] = {**twins.pipeline.components, "unet": lcm_unet}
    twins.pipeline = StableDiffusionXLPipeline(**components)
    twins.pipeline.scheduler = LCMScheduler.from_config(SCHEDULER_CONFIG)  # pyright: ignore[reportAttributeAccessIssue]
    twins.unet = our_unet(twins.pipeline)
    return twins


def lcm(twins: Twins) -> StableDiffusion_XL:
    return StableDiffusion_XL(
        unet=twins.unet, lda=twins.lda, clip_text_encoder=twins.text_encoder, solver=LCMSolver(4), default_size=64
    )


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def test_guidance_scale_features_equal_diffusers(twins: Twins) -> None:
    scales = torch.tensor([1.0, 2.5, 8.0])
    expected = twins.pipeline.get_guidance_scale_embedding(scales - 1, embedding_dim=256)
    torch.testing.assert_close(compute_guidance_scale_embedding(scales, 256), expected, atol=0, rtol=0)


def test_lcm_unet_matches_diffusers(twins: Twins) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 6, generator=generator)
    embedding, pooled = torch.randn(2, 77, 80, generator=generator), torch.randn(2, 48, generator=generator)
    time_ids = torch.tensor([[64.0, 48, 0, 0, 64, 48]] * 2)
    condition = twins.pipeline.get_guidance_scale_embedding(torch.tensor([7.0, 7.0]), embedding_dim=GUIDANCE_DIM)
    added: dict[str, Any] = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        expected = twins.pipeline.unet(
            x, 500, encoder_hidden_states=embedding, timestep_cond=condition, added_cond_kwargs=added
        ).sample
        twins.unet.set_timestep(500)
        twins.unet.set_clip_text_embedding(embedding)
        twins.unet.set_pooled_text_embedding(pooled)
        twins.unet.set_time_ids(time_ids)
        twins.unet.set_guidance_scale(8.0)
        ours = twins.unet(x)
        twins.unet.set_guidance_scale(2.0)
        other = twins.unet(x)
    assert_matches(ours, expected)
    assert (other - ours).abs().max() > 1e-2 * expected.abs().max()  # the guidance scale is an input


def test_lcm_generation_matches_diffusers(twins: Twins) -> None:
    # latent-consistency/lcm-sdxl's set-up: LCMScheduler, 4 steps, guidance 8 embedded (one batch, no negative).
    with torch.no_grad():
        output: Any = twins.pipeline(
            PROMPTS,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=4,
            guidance_scale=8.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(SEED),
        )
    expected = output.images
    model = lcm(twins)
    latents = model.generate_latents(
        PROMPTS, num_inference_steps=4, guidance_scale=8.0, height=HEIGHT, width=WIDTH, seed=SEED, progress=False
    )
    assert_matches(latents, expected)
    # Step by step: the text embedding has the prompts' rows only, condition_scale is the embedded guidance.
    with torch.no_grad():
        embedding, pooled = model.clip_text_encoder(PROMPTS)
        time_ids = model.default_time_ids((HEIGHT, WIDTH), target_size=(HEIGHT, WIDTH))
        generator = torch.Generator().manual_seed(SEED)
        x = model.init_latents((HEIGHT, WIDTH), batch_size=2, generator=generator)
        for step in model.steps:
            x = model(
                x, step, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids,
                condition_scale=8.0, generator=generator,
            )  # fmt: skip
    assert_matches(x, expected)


def test_a_negative_prompt_is_refused_by_a_guidance_embedding(twins: Twins) -> None:
    with pytest.raises(ValueError, match=r"does not run \(it embeds the guidance scale: LCM\)"):
        lcm(twins).generate("a cat", negative_prompt="blurry", progress=False)
    with pytest.raises(ValueError, match="has no guidance embedding"):
        build_twins().unet.set_guidance_scale(8.0)
