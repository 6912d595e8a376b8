"""DeepCache equals the `deepcache` package's `DeepCacheSDHelper` on diffusers over a DDIM generation, on SD1 and
SDXL (toy sizes): 6 steps, so that steps reuse the deep feature of a full one."""

from typing import Any

import pytest
import torch
from DeepCache import DeepCacheSDHelper
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from toy_sd1 import assert_matches, generator, ours, reference, save_toy_sd1
from toy_sdxl import SCHEDULER_CONFIG, build_twins

from refiners.adapters.deepcache import DeepCacheAdapter, DeepCacheFeature, DeepCacheSkip
from refiners.fluxion.layers.chain import ChainError
from refiners.foundationals.latent_diffusion import DDIM, LatentDiffusionModel, SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL

PROMPT = "a cute cat"
STEPS = 6

Twins = tuple[Any, LatentDiffusionModel[Any, Any]]


@pytest.fixture(scope="module")
def sd1_twins(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    diffusers_folder, converted = save_toy_sd1(tmp_path_factory.mktemp("deepcache"))
    return reference(StableDiffusionPipeline, diffusers_folder), ours(converted)


def reference_latents(pipeline: Any, cache: tuple[int, int] | None, **kwargs: Any) -> torch.Tensor:
    helper = DeepCacheSDHelper(pipe=pipeline)
    if cache is not None:
        helper.set_params(cache_interval=cache[0], cache_branch_id=cache[1])
        helper.enable()
    try:
        with torch.no_grad():
            output = pipeline(PROMPT, num_inference_steps=STEPS, generator=generator(1), output_type="latent", **kwargs)
    finally:
        if cache is not None:
            helper.disable()
    return output.images


def our_latents(model: LatentDiffusionModel[Any, Any], **kwargs: Any) -> torch.Tensor:
    return model.generate_latents(PROMPT, num_inference_steps=STEPS, seed=1, progress=False, **kwargs)


def check_deepcache(
    pipeline: Any, model: LatentDiffusionModel[Any, Any], cache: tuple[int, int], plain: torch.Tensor, **kwargs: Any
) -> None:
    expected = reference_latents(pipeline, cache, **kwargs)
    before_repr, before_keys = repr(model.unet), list(model.unet.state_dict())
    deepcache = DeepCacheAdapter(target=model.unet, cache_interval=cache[0], cache_branch_id=cache[1]).inject()
    assert "DeepCacheFeature" in repr(model.unet)
    actual = our_latents(model, **kwargs)
    deepcache.eject()
    assert_matches(actual, expected)
    # Reusing the deep feature moves the output well beyond the tolerance.
    assert (actual - plain).abs().max() > 10 * 1e-4 * expected.abs().max()
    assert repr(model.unet) == before_repr and list(model.unet.state_dict()) == before_keys
    assert torch.equal(our_latents(model, **kwargs), plain)


@pytest.fixture(scope="module")
def sd1_plain(sd1_twins: Twins) -> torch.Tensor:
    pipeline, model = sd1_twins
    plain = our_latents(model, height=128, width=128)
    assert_matches(plain, reference_latents(pipeline, None, height=128, width=128))
    return plain


@pytest.mark.parametrize("cache", [(3, 0), (2, 4)], ids=["interval3-branch0", "interval2-branch4"])
def test_sd1_matches_deepcache_helper(sd1_twins: Twins, sd1_plain: torch.Tensor, cache: tuple[int, int]) -> None:
    pipeline, model = sd1_twins
    check_deepcache(pipeline, model, cache, sd1_plain, height=128, width=128)


def test_sdxl_matches_deepcache_helper() -> None:
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
    plain = our_latents(model, height=64, width=64)
    assert_matches(plain, reference_latents(twins.pipeline, None, height=64, width=64))
    check_deepcache(twins.pipeline, model, (3, 0), plain, height=64, width=64)


def test_branch_splits_the_unet() -> None:
    unet = TINY.unet.build((SD1UNet,), device="meta")
    # The deepest branch (level 3, layer 2) caches the middle block alone.
    deepest = DeepCacheAdapter(target=unet, cache_interval=2, cache_branch_id=11)
    assert [type(layer) for layer in deepest.layers] == [DeepCacheFeature]
    assert deepest.feature.target is unet.MiddleBlock
    shallowest = DeepCacheAdapter(target=unet, cache_interval=2, cache_branch_id=0)
    assert all(isinstance(layer, DeepCacheSkip) for layer in shallowest.layers[:-1])
    assert shallowest.feature.target is unet.UpBlocks.layer(10, torch.nn.Module)
    with pytest.raises(ValueError, match=r"cache_branch_id must be in \[0, 12\)"):
        DeepCacheAdapter(target=unet, cache_branch_id=12)
    with pytest.raises(ValueError, match="not injected"):
        shallowest.eject()


def test_needs_the_step() -> None:
    unet = TINY.unet.build((SD1UNet,))
    unet.set_timestep(999)
    unet.set_clip_text_embedding(torch.randn(1, 77, unet.context_embedding_dim))
    deepcache = DeepCacheAdapter(target=unet).inject()
    with pytest.raises(ChainError, match="DeepCache needs the step of the run"), torch.no_grad():
        unet(torch.randn(1, 4, 16, 16))
    deepcache.eject()


def test_docstring_example_runs() -> None:
    import inspect
    import re
    import textwrap

    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(DeepCacheAdapter) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "DeepCacheAdapter's example", "exec"), {"__name__": "example"})
