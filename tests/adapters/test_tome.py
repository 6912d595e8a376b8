"""ToMe equals `tomesd.apply_patch` on diffusers over a DDIM generation, on SD1 (toy at 128x128: 16x16 latents, 256
tokens at the highest resolution) and SDXL (toy at 64x64: its first level has no transformer, so `max_downsample`
reaches the next ones)."""

from typing import Any

import pytest
import tomesd  # pyright: ignore[reportMissingTypeStubs]
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from toy_sd1 import assert_matches, generator, ours, reference, save_toy_sd1
from toy_sdxl import SCHEDULER_CONFIG, build_twins

from refiners.adapters.tome import MergedSubLayer, ToMeAdapter, ToMeBlock, bipartite_soft_matching
from refiners.foundationals.latent_diffusion import DDIM, LatentDiffusionModel, SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL

PROMPT = "a cute cat"
STEPS = 3
SEED = 7  # of the generators that draw the destinations, on both sides

Twins = tuple[Any, LatentDiffusionModel[Any, Any]]
Settings = dict[str, Any]  # tomesd.apply_patch's keyword arguments

_SUB_LAYERS: dict[str, MergedSubLayer] = {
    "merge_attn": "self_attention",
    "merge_crossattn": "cross_attention",
    "merge_mlp": "feed_forward",
}
_TOMESD_DEFAULTS: Settings = {"merge_attn": True, "merge_crossattn": False, "merge_mlp": False, "use_rand": True}


@pytest.fixture(scope="module")
def sd1_twins(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    diffusers_folder, converted = save_toy_sd1(tmp_path_factory.mktemp("tome"))
    return reference(StableDiffusionPipeline, diffusers_folder), ours(converted)


def reference_latents(pipeline: Any, settings: Settings | None, **kwargs: Any) -> torch.Tensor:
    if settings is not None:
        tomesd.apply_patch(pipeline, **settings)
        pipeline.unet._tome_info["args"]["generator"] = torch.Generator().manual_seed(SEED)
    try:
        with torch.no_grad():
            output = pipeline(PROMPT, num_inference_steps=STEPS, generator=generator(1), output_type="latent", **kwargs)
    finally:
        tomesd.remove_patch(pipeline)
    return output.images


def our_latents(model: LatentDiffusionModel[Any, Any], **kwargs: Any) -> torch.Tensor:
    return model.generate_latents(PROMPT, num_inference_steps=STEPS, seed=1, progress=False, **kwargs)


def our_adapter(model: LatentDiffusionModel[Any, Any], settings: Settings) -> ToMeAdapter:
    settings = _TOMESD_DEFAULTS | settings
    return ToMeAdapter(
        target=model.unet,
        ratio=settings["ratio"],
        max_downsample=settings.get("max_downsample", 1),
        use_rand=settings["use_rand"],
        generator=torch.Generator().manual_seed(SEED),
        merge_in=[sub_layer for flag, sub_layer in _SUB_LAYERS.items() if settings[flag]],
    )


def check_tome(
    pipeline: Any, model: LatentDiffusionModel[Any, Any], settings: Settings, plain: torch.Tensor, **kwargs: Any
) -> None:
    expected = reference_latents(pipeline, settings, **kwargs)
    before_repr, before_keys = repr(model.unet), list(model.unet.state_dict())
    tome = our_adapter(model, settings).inject()
    assert "ToMeBlock" in repr(model.unet)
    actual = our_latents(model, **kwargs)
    tome.eject()
    assert_matches(actual, expected)
    # Merging tokens moves the output well beyond the tolerance.
    assert (actual - plain).abs().max() > 10 * 1e-4 * expected.abs().max()
    assert repr(model.unet) == before_repr and list(model.unet.state_dict()) == before_keys
    assert torch.equal(our_latents(model, **kwargs), plain)


@pytest.fixture(scope="module")
def sd1_plain(sd1_twins: Twins) -> torch.Tensor:
    pipeline, model = sd1_twins
    plain = our_latents(model, height=128, width=128)
    assert_matches(plain, reference_latents(pipeline, None, height=128, width=128))
    return plain


@pytest.mark.parametrize(
    "settings",
    [
        {"ratio": 0.5},  # tomesd's defaults: random destinations, the self-attention alone, the highest resolution
        {"ratio": 0.6, "max_downsample": 2, "use_rand": False, "merge_crossattn": True, "merge_mlp": True},
    ],
    ids=["defaults", "all-sub-layers-two-levels"],
)
def test_sd1_matches_tomesd(sd1_twins: Twins, sd1_plain: torch.Tensor, settings: Settings) -> None:
    pipeline, model = sd1_twins
    check_tome(pipeline, model, settings, sd1_plain, height=128, width=128)


def test_sdxl_matches_tomesd() -> None:
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
    # At 64x64 the transformers' levels have 4x4 and 2x2 tokens: max_downsample=4 merges in both.
    check_tome(twins.pipeline, model, {"ratio": 0.5, "max_downsample": 4}, plain, height=64, width=64)


@pytest.mark.parametrize("use_rand", [False, True])
def test_matching_equals_tomesd_on_a_map_the_cells_do_not_tile(use_rand: bool) -> None:
    tokens = torch.randn(2, 7 * 5, 8)
    sx, sy, r = 2, 3, 12
    merge, unmerge = tomesd.merge.bipartite_soft_matching_random2d(  # pyright: ignore
        tokens, 5, 7, sx, sy, r, no_rand=not use_rand, generator=torch.Generator().manual_seed(SEED)
    )
    draws = torch.Generator().manual_seed(SEED) if use_rand else None
    matching = bipartite_soft_matching(tokens, 7, 5, r, stride_x=sx, stride_y=sy, generator=draws)
    assert matching is not None
    x = torch.randn(2, 7 * 5, 16)
    assert torch.equal(matching.merge(x), merge(x))
    assert matching.merge(x).shape == (2, 7 * 5 - r, 16)
    merged = torch.randn(2, 7 * 5 - r, 16)
    assert torch.equal(matching.unmerge(merged), unmerge(merged))
    assert bipartite_soft_matching(tokens, 7, 5, num_merged=0) is None


def test_levels_and_errors() -> None:
    unet = TINY.unet.build((SD1UNet,), device="meta")
    # Levels 0 and 1: 2 down and 3 up transformers each.
    assert len(ToMeAdapter(target=unet, max_downsample=2).blocks) == 10
    assert len(ToMeAdapter(target=unet, max_downsample=8).blocks) == 10 + 2 + 3 + 1  # level 2, the middle block
    with pytest.raises(ValueError, match="ratio is the share"):
        ToMeAdapter(target=unet, ratio=1.0)
    with pytest.raises(ValueError, match="merge_in takes"):
        ToMeAdapter(target=unet, merge_in=["attention"])  # pyright: ignore[reportArgumentType]
    tome = ToMeAdapter(target=unet)
    assert all(isinstance(block, ToMeBlock) for block in tome.blocks)
    with pytest.raises(ValueError, match="not injected"):
        tome.eject()


def test_docstring_example_runs() -> None:
    import inspect
    import re
    import textwrap

    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(ToMeAdapter) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "ToMeAdapter's example", "exec"), {"__name__": "example"})
