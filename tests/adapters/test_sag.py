"""Self-attention guidance equals diffusers' `StableDiffusionSAGPipeline` over a DDIM generation (toy SD1), and keeps
its defining properties on SDXL (no reference there)."""

from typing import Any

import pytest
import torch
from toy_sd1 import assert_matches, generator, ours, reference, save_toy_sd1
from toy_sdxl import build_twins

from refiners.adapters.sag import SelfAttentionGuidance, gaussian_blur
from refiners.foundationals.latent_diffusion import DDIM, LatentDiffusionModel
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL

PROMPT = "a cute cat"
STEPS = 3
# At 128x128 the toy SD1's middle block is 2x2: some of its positions get more than their share of attention.
SIZE = 128
# Above diffusers' default (0.75), so that the toy's output moves well beyond the tolerance.
SCALE = 3.0


@pytest.fixture(scope="module")
def sd1_twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LatentDiffusionModel[Any, Any]]:
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    diffusers_folder, converted = save_toy_sd1(tmp_path_factory.mktemp("sag"))
    return reference(StableDiffusionSAGPipeline, diffusers_folder), ours(converted)


@pytest.fixture(scope="module")
def sdxl() -> StableDiffusion_XL:
    twins = build_twins()
    return StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=STEPS, params=SDXL_SOLVER_PARAMS),
        default_size=64,
    )


def our_latents(model: LatentDiffusionModel[Any, Any], **kwargs: Any) -> torch.Tensor:
    return model.generate_latents(PROMPT, num_inference_steps=STEPS, seed=1, progress=False, **kwargs)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["guided", "unguided"])
def test_sd1_matches_diffusers(sd1_twins: tuple[Any, LatentDiffusionModel[Any, Any]], guidance_scale: float) -> None:
    pipeline, model = sd1_twins
    kwargs: dict[str, Any] = {"height": SIZE, "width": SIZE, "guidance_scale": guidance_scale}
    with torch.no_grad():
        expected = pipeline(
            PROMPT, num_inference_steps=STEPS, sag_scale=SCALE, generator=generator(1), output_type="latent", **kwargs
        ).images
    plain = our_latents(model, **kwargs)
    before = repr(model.unet)
    sag = SelfAttentionGuidance(target=model, scale=SCALE).inject()
    actual = our_latents(model, **kwargs)
    sag.eject()
    assert_matches(actual, expected)
    assert (actual - plain).abs().max() > 100 * 1e-4 * expected.abs().max()
    assert repr(model.unet) == before and model.guidance_terms == []
    assert torch.equal(our_latents(model, **kwargs), plain)


def test_sdxl_scale_0_is_the_plain_generation(sdxl: StableDiffusion_XL) -> None:
    plain = our_latents(sdxl)
    sag = SelfAttentionGuidance(target=sdxl, scale=0.0).inject()
    assert torch.equal(our_latents(sdxl), plain)
    sag.scale = 1.0
    guided = our_latents(sdxl)
    assert (guided - plain).abs().max() > 1e-2 * plain.abs().max()
    sag.eject()
    assert torch.equal(our_latents(sdxl), plain)


def test_sdxl_nothing_to_degrade_means_no_guidance(sdxl: StableDiffusion_XL) -> None:
    # A 1x1 blur leaves the predicted clean latents as they are: noised again with the predicted noise, they are the
    # step's latents, and the extra pass predicts the negative prompt's noise again: the term vanishes (but rounding).
    plain = our_latents(sdxl)
    sag = SelfAttentionGuidance(target=sdxl, scale=1.0, kernel_size=1).inject()
    guided = our_latents(sdxl)
    sag.eject()
    torch.testing.assert_close(guided, plain, atol=1e-4 * plain.abs().max().item(), rtol=0)


def test_sdxl_records_the_middle_attention_map(sdxl: StableDiffusion_XL) -> None:
    sag = SelfAttentionGuidance(target=sdxl, scale=1.0).inject()
    our_latents(sdxl, height=64, width=64)
    attention = sag.recorder.attention_map
    sag.eject()
    # The last pass is the degraded one (negative rows only): one row, the heads, 2x2 queries over a 2x2 map.
    heads = sdxl.unet.topology.num_attention_heads[-1]
    assert attention.shape == (1, heads, 4, 2, 2)
    torch.testing.assert_close(attention.sum(dim=(-2, -1)), torch.ones(1, heads, 4))


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    constant = torch.full((1, 2, 8, 8), 3.0)
    torch.testing.assert_close(gaussian_blur(constant), constant)
    impulse = torch.zeros(1, 1, 17, 17)
    impulse[..., 8, 8] = 1.0
    blurred = gaussian_blur(impulse)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    assert blurred[..., 8, 8] < 1.0 and blurred[..., 8, 9] > 0.0


def test_injection_errors(sdxl: StableDiffusion_XL) -> None:
    sag = SelfAttentionGuidance(target=sdxl)
    with pytest.raises(ValueError, match="not injected"):
        sag.eject()
    sag.inject()
    with pytest.raises(ValueError, match="already injected"):
        sag.inject()
    sag.eject()


def test_docstring_example_runs() -> None:
    import inspect
    import re
    import textwrap

    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(SelfAttentionGuidance) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "SelfAttentionGuidance's example", "exec"), {"__name__": "example"})
