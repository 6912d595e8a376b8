"""MultiDiffusion's panoramas equal diffusers' `StableDiffusionPanoramaPipeline` over a DDIM generation (toy SD1), and
region prompts keep their defining properties."""

from typing import Any

import pytest
import torch
from toy_sd1 import assert_matches, generator, ours, reference, save_toy_sd1

from refiners.adapters.multi_diffusion import DiffusionTarget, MultiDiffusion, Window, panorama_windows
from refiners.foundationals.latent_diffusion import StableDiffusion_1

PROMPT = "a mountain range"
STEPS = 3
# diffusers' pipeline slides 64-pixel windows (in latent pixels: SD1.5's 512 image pixels) every 8; its `get_views`
# takes both as arguments, and the test gives it 16 and 8 so that the toy runs small: a 128x256 panorama has 3
# windows, 4 when they wrap around.
HEIGHT, WIDTH = 128, 256
WINDOW, STRIDE = 16, 8


@pytest.fixture(scope="module")
def sd1_twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, StableDiffusion_1]:
    from diffusers.pipelines.deprecated.stable_diffusion_panorama.pipeline_stable_diffusion_panorama import (
        StableDiffusionPanoramaPipeline,
    )

    diffusers_folder, converted = save_toy_sd1(tmp_path_factory.mktemp("multi_diffusion"))
    pipeline: Any = reference(StableDiffusionPanoramaPipeline, diffusers_folder)

    def get_views(height: int, width: int, circular_padding: bool = False) -> list[tuple[int, int, int, int]]:
        return StableDiffusionPanoramaPipeline.get_views(
            pipeline, height, width, window_size=WINDOW, stride=STRIDE, circular_padding=circular_padding
        )

    pipeline.get_views = get_views
    return pipeline, ours(converted)


def panorama(sd: StableDiffusion_1, windows: list[Window], seed: int = 1) -> torch.Tensor:
    multi_diffusion = MultiDiffusion(sd)
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding(PROMPT)
        targets = [DiffusionTarget(window, {"clip_text_embedding": embedding}) for window in windows]
        sd.set_num_inference_steps(STEPS)
        x = sd.init_latents((HEIGHT, WIDTH), generator=generator(seed))
        for step in sd.steps:
            x = multi_diffusion(x, step, targets)
    return x


@pytest.mark.parametrize("circular", [False, True], ids=["flat", "circular"])
def test_panorama_matches_diffusers(sd1_twins: tuple[Any, StableDiffusion_1], circular: bool) -> None:
    pipeline, sd = sd1_twins
    with torch.no_grad():
        expected = pipeline(
            PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            circular_padding=circular,
            generator=generator(1),
            output_type="latent",
        ).images
    windows = panorama_windows(HEIGHT // 8, WIDTH // 8, window_size=WINDOW, stride=STRIDE, circular=circular)
    assert len(windows) == (4 if circular else 3)
    actual = panorama(sd, windows)
    assert_matches(actual, expected)
    # The windows move the output: a single window over the whole panorama is the plain generation.
    plain = panorama(sd, [Window(0, 0, HEIGHT // 8, WIDTH // 8)])
    if not circular:
        generated = sd.generate_latents(
            PROMPT, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, seed=1, progress=False
        )
        assert torch.equal(plain, generated)
    assert (actual - plain).abs().max() > 100 * 1e-4 * expected.abs().max()


def test_region_prompts_are_the_weighted_mean_of_their_steps() -> None:
    class Step:
        """A stand-in model: each step adds its target's own offset (its "prompt") to the latents."""

        def __call__(self, x: torch.Tensor, step: int, **kwargs: Any) -> torch.Tensor:
            return x + kwargs["clip_text_embedding"]

    multi_diffusion = MultiDiffusion(Step())  # pyright: ignore[reportArgumentType]
    x = torch.zeros(1, 1, 4, 6)
    left = torch.zeros(4, 6)
    left[:, :3] = 1.0
    whole = Window(0, 0, 4, 6)
    background = DiffusionTarget(whole, {"clip_text_embedding": torch.tensor(1.0)}, weight=1.0)
    region = DiffusionTarget(whole, {"clip_text_embedding": torch.tensor(5.0)}, weight=3.0, mask=left)
    box = DiffusionTarget(Window(1, 4, 2, 4), {"clip_text_embedding": torch.tensor(9.0)})  # wraps to column 0 and 1
    out = multi_diffusion(x, 0, [background, region, box])
    expected = torch.ones(4, 6)
    expected[:, :3] = (1 + 3 * 5) / 4
    expected[1:3, 4:] = (1 + 9) / 2
    expected[1:3, :2] = (1 + 3 * 5 + 9) / 5
    torch.testing.assert_close(out[0, 0], expected)
    # A pixel no target covers stays zero.
    torch.testing.assert_close(multi_diffusion(x, 0, [box])[0, 0, 0], torch.zeros(6))


def test_windows_are_diffusers_views() -> None:
    assert panorama_windows(64, 128) == [Window(0, left, 64, 64) for left in range(0, 65, 8)]
    assert panorama_windows(32, 48) == [Window(0, 0, 32, 48)]
    assert panorama_windows(80, 64, stride=16) == [Window(0, 0, 64, 64), Window(16, 0, 64, 64)]
    with pytest.raises(ValueError, match="does not fit"):
        Window(0, 0, 8, 8).crop(torch.zeros(1, 4, 4, 8))


def test_docstring_example_runs() -> None:
    import inspect
    import re
    import textwrap

    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(MultiDiffusion) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "MultiDiffusion's example", "exec"), {"__name__": "example"})


def test_sdxl_windows_take_the_family_conditioning() -> None:
    from toy_sdxl import build_twins

    from refiners.foundationals.latent_diffusion import DDIM
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL

    twins = build_twins()
    sdxl = StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=STEPS, params=SDXL_SOLVER_PARAMS),
        default_size=64,
    )
    multi_diffusion = MultiDiffusion(sdxl)
    with torch.no_grad():
        embedding, pooled = sdxl.compute_clip_text_embedding(PROMPT)
        conditioning = {"clip_text_embedding": embedding, "pooled_text_embedding": pooled}
        conditioning["time_ids"] = sdxl.default_time_ids()
        whole = [DiffusionTarget(Window(0, 0, 8, 16), conditioning, condition_scale=5.0)]
        halves = [DiffusionTarget(Window(0, left, 8, 8), conditioning, condition_scale=5.0) for left in (0, 4, 8)]
        x = plain = wide = sdxl.init_latents((64, 128), generator=generator(1))
        for step in sdxl.steps:
            plain = sdxl(plain, step, condition_scale=5.0, **conditioning)
            x = multi_diffusion(x, step, whole)
            wide = multi_diffusion(wide, step, halves)
    # One window over the whole latents is the plain step; overlapping windows move it.
    assert torch.equal(x, plain)
    assert (wide - plain).abs().max() > 1e-2 * plain.abs().max()
