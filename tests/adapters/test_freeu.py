"""FreeU equals diffusers' `enable_freeu(s1, s2, b1, b2)` over a DDIM generation, on SD1 and SDXL (toy sizes)."""

from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from toy_sd1 import assert_matches, generator, ours, reference, save_toy_sd1
from toy_sdxl import SCHEDULER_CONFIG, build_twins

from refiners.adapters.freeu import SDFreeUAdapter, fourier_filter
from refiners.foundationals.latent_diffusion import DDIM, LatentDiffusionModel
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL

PROMPT = "a cute cat"
STEPS = 3
# SD1.5's recommended values (the FreeU repository's); at 128x128 the toy SD1's two lowest levels are 2x2 and 4x4.
SD1_BACKBONE, SD1_SKIP = [1.5, 1.6], [0.9, 0.2]
SDXL_BACKBONE, SDXL_SKIP = [1.3, 1.4], [0.9, 0.2]


@pytest.fixture(scope="module")
def sd1_twins(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[StableDiffusionPipeline, LatentDiffusionModel[Any, Any]]:
    diffusers_folder, converted = save_toy_sd1(tmp_path_factory.mktemp("freeu"))
    return reference(StableDiffusionPipeline, diffusers_folder), ours(converted)


def reference_latents(pipeline: Any, freeu: tuple[list[float], list[float]] | None, **kwargs: Any) -> torch.Tensor:
    if freeu is None:
        pipeline.disable_freeu()
    else:
        (b1, b2), (s1, s2) = freeu
        pipeline.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    with torch.no_grad():
        latents = pipeline(PROMPT, num_inference_steps=STEPS, generator=generator(1), output_type="latent", **kwargs)
    pipeline.disable_freeu()
    return latents.images


def our_latents(model: LatentDiffusionModel[Any, Any], **kwargs: Any) -> torch.Tensor:
    return model.generate_latents(PROMPT, num_inference_steps=STEPS, seed=1, progress=False, **kwargs)


def check_freeu(
    pipeline: Any, model: LatentDiffusionModel[Any, Any], backbone: list[float], skip: list[float], **kwargs: Any
) -> None:
    expected = reference_latents(pipeline, (backbone, skip), **kwargs)
    plain = our_latents(model, **kwargs)
    before = repr(model.unet)
    freeu = SDFreeUAdapter(target=model.unet, backbone_scales=backbone, skip_scales=skip).inject()
    assert "FreeUReweighting" in repr(model.unet)
    actual = our_latents(model, **kwargs)
    freeu.eject()
    assert_matches(actual, expected)
    # FreeU moves the output well beyond the tolerance.
    assert (actual - plain).abs().max() > 100 * 1e-4 * expected.abs().max()
    assert_matches(plain, reference_latents(pipeline, None, **kwargs))
    assert repr(model.unet) == before
    assert torch.equal(our_latents(model, **kwargs), plain)


def test_sd1_matches_diffusers(sd1_twins: tuple[StableDiffusionPipeline, LatentDiffusionModel[Any, Any]]) -> None:
    pipeline, model = sd1_twins
    check_freeu(pipeline, model, SD1_BACKBONE, SD1_SKIP, height=128, width=128)


def test_sdxl_matches_diffusers() -> None:
    twins = build_twins()
    twins.pipeline.scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)  # pyright: ignore[reportAttributeAccessIssue]
    twins.pipeline.set_progress_bar_config(disable=True)
    model = StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=STEPS, params=SDXL_SOLVER_PARAMS),
        default_size=64,
    )
    check_freeu(twins.pipeline, model, SDXL_BACKBONE, SDXL_SKIP, height=64, width=64)


def test_fourier_filter_scales_the_mean_of_a_large_map() -> None:
    # On a map larger than 2x2, only the lowest frequencies move: a constant map is scaled, a checkerboard is not.
    constant = torch.ones(1, 1, 8, 8)
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    torch.testing.assert_close(fourier_filter(constant, 0.5), 0.5 * constant)
    torch.testing.assert_close(fourier_filter(checkerboard[None, None], 0.5), checkerboard[None, None])


def test_scales_must_pair_up() -> None:
    from refiners.foundationals.latent_diffusion import SD1UNet
    from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY

    unet = TINY.unet.build((SD1UNet,), device="meta")
    with pytest.raises(ValueError, match="as many backbone_scales as skip_scales"):
        SDFreeUAdapter(target=unet, backbone_scales=[1.5, 1.6], skip_scales=[0.9])
    freeu = SDFreeUAdapter(target=unet, backbone_scales=[1.5], skip_scales=[0.9])
    assert len(freeu.concatenations) == 3  # layers_per_block + 1 up blocks at the lowest level
    with pytest.raises(ValueError, match="not injected"):
        freeu.eject()


def test_docstring_example_runs() -> None:
    import inspect
    import re
    import textwrap

    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(SDFreeUAdapter) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "SDFreeUAdapter's example", "exec"), {"__name__": "example"})
