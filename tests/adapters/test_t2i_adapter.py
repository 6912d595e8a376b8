"""T2I-Adapters generate what diffusers' adapter pipelines generate, from the same converted files.

The references are `StableDiffusionAdapterPipeline` (a full adapter, a light one, two at once: diffusers'
`MultiAdapter`) and `StableDiffusionXLAdapterPipeline` (`full_adapter_xl`, acting on the first part of the steps only),
on the toy SD1.5 and SDXL models (tests/toy_models.py, tests/toy_sdxl.py). Each T2I-Adapter is diffusers' `T2IAdapter`
of the toy UNet's widths with random weights, saved with `save_pretrained` and converted by `refiners-convert
t2i-adapter`'s function. A short DDIM run on both sides from the same noise and text embeddings: the final latents
agree to 1e-4 of their scale, and differ from those without the adapter by far more.
"""

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.adapter import MultiAdapter, T2IAdapter
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import StableDiffusionAdapterPipeline
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_xl_adapter import StableDiffusionXLAdapterPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from PIL import Image
from torch import Tensor
from toy_models import TEXT_WIDTH, UNET_CHANNELS, build_reference, convert_reference, toy_sd
from toy_sdxl import POOLED_DIM, build_twins

import refiners.adapters.t2i_adapter as t2i_adapter_package
from refiners.adapters.t2i_adapter import SD1T2IAdapter, SDXLT2IAdapter
from refiners.converters.cli import main
from refiners.converters.t2i_adapter import convert_t2i_adapter
from refiners.converters.toy import TOY_VAE_CONFIG, save_toy_stable_diffusion_1
from refiners.fluxion.utils import tensor_to_image
from refiners.foundationals.latent_diffusion import DDIM, StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RELATIVE_ATOL = 1e-4
STEPS = 4
SIZE = 128  # four resolutions: 2x2 latents at the lowest (at 1x1 the toy's GroupNorms are ill-conditioned)
# SD1.5's scheduler config, as DDIM reads it.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
# diffusers' configs of the kinds, at the toy UNets' widths.
FULL_CONFIG: dict[str, Any] = {"adapter_type": "full_adapter", "channels": list(UNET_CHANNELS), "num_res_blocks": 2}
LIGHT_CONFIG: dict[str, Any] = {
    "adapter_type": "light_adapter",
    "channels": list(UNET_CHANNELS[:3]),
    "num_res_blocks": 2,
}


def build_t2i_adapter(config: dict[str, Any], seed: int, folder: Path) -> tuple[T2IAdapter, Path]:
    """A diffusers T2I-Adapter with random weights (seeded), saved as a user downloads it and converted with ours."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = T2IAdapter(**config).eval()
        with torch.no_grad():  # larger features than the default init's, so that they move the output well
            for parameter in adapter.parameters():
                parameter.mul_(2.0)
    adapter.save_pretrained(folder / "diffusers")
    converted, _ = convert_t2i_adapter(folder / "diffusers", folder / "t2i_adapter.safetensors")
    return adapter, converted


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


def assert_moves(without: Tensor, expected: Tensor) -> None:
    assert (without - expected).abs().max() > 10 * RELATIVE_ATOL * expected.abs().max()


def condition_image(seed: int, size: int = SIZE) -> Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- SD1 -----------------------------------------------------------------------------------------------------------


@dataclass
class SD1Twins:
    pipeline: StableDiffusionAdapterPipeline
    adapters: dict[str, tuple[T2IAdapter, Path]]
    sd: StableDiffusion_1
    noise: Tensor
    positive: Tensor
    negative: Tensor


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> SD1Twins:
    reference = build_reference()
    root = tmp_path_factory.mktemp("t2i_adapters")
    adapters = {
        "full": build_t2i_adapter(FULL_CONFIG, 1, root / "full"),
        "light": build_t2i_adapter(LIGHT_CONFIG, 2, root / "light"),
        "full-2": build_t2i_adapter(FULL_CONFIG, 3, root / "full-2"),
    }
    torch.manual_seed(0)
    pipeline = StableDiffusionAdapterPipeline(
        vae=AutoencoderKL(**TOY_VAE_CONFIG).eval(),
        text_encoder=reference.text_encoder,
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        unet=reference.unet,
        adapter=adapters["full"][0],
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),  # pyright: ignore[reportArgumentType]
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    sd = toy_sd(convert_reference(reference))
    sd.solver = DDIM(num_inference_steps=STEPS)
    generator = torch.Generator().manual_seed(4)
    return SD1Twins(
        pipeline=pipeline,
        adapters=adapters,
        sd=sd,
        noise=torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator),
        positive=torch.randn(1, 77, TEXT_WIDTH, generator=generator),
        negative=torch.randn(1, 77, TEXT_WIDTH, generator=generator),
    )


def diffusers_sd1(
    twins: SD1Twins, adapter: T2IAdapter | MultiAdapter, image: Tensor | list[Tensor], **kwargs: Any
) -> Tensor:
    components: dict[str, Any] = {**twins.pipeline.components, "adapter": adapter}
    pipeline = StableDiffusionAdapterPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        output: Any = pipeline(
            prompt_embeds=twins.positive,
            negative_prompt_embeds=twins.negative,
            image=image,  # pyright: ignore[reportArgumentType]  # a list of tensors for a MultiAdapter
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            latents=twins.noise.clone(),
            output_type="latent",
            **kwargs,
        )
    return output.images


def ours_sd1(twins: SD1Twins) -> Tensor:
    sd = twins.sd
    embedding = torch.cat([twins.negative, twins.positive])
    x = sd.init_latents((SIZE, SIZE), noise=twins.noise.clone())
    with torch.no_grad():
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
    return x


@pytest.mark.parametrize("kind", ["full", "light"])
def test_one_t2i_adapter_matches_diffusers(sd1: SD1Twins, kind: str) -> None:
    image = condition_image(5)
    reference, file = sd1.adapters[kind]
    expected = diffusers_sd1(sd1, reference, image, adapter_conditioning_scale=0.8)
    adapter = SD1T2IAdapter(sd1.sd.unet, name="depth", scale=0.8, weights=file).inject()
    try:
        adapter.set_condition_features(adapter.compute_condition_features(image))
        actual = ours_sd1(sd1)
    finally:
        adapter.eject()
    assert_matches(actual, expected)
    assert_moves(ours_sd1(sd1), expected)


def test_two_t2i_adapters_with_their_own_scales_match_diffusers_multi_adapter(sd1: SD1Twins) -> None:
    images = [condition_image(6), condition_image(7)]
    (first, first_file), (second, second_file) = sd1.adapters["full"], sd1.adapters["full-2"]
    expected = diffusers_sd1(sd1, MultiAdapter([first, second]), images, adapter_conditioning_scale=[0.7, 1.3])
    adapters = [
        SD1T2IAdapter(sd1.sd.unet, name=name, scale=scale, weights=file).inject()
        for name, scale, file in [("depth", 0.7, first_file), ("sketch", 1.3, second_file)]
    ]
    try:
        for adapter, image in zip(adapters, images, strict=True):
            adapter.set_condition_features(adapter.compute_condition_features(image))
        actual = ours_sd1(sd1)
    finally:
        for adapter in adapters:
            adapter.eject()
    assert_matches(actual, expected)
    alone = diffusers_sd1(sd1, first, images[0], adapter_conditioning_scale=0.7)
    assert_moves(alone, expected)  # the second adapter acts


def test_one_condition_image_per_latent_matches_diffusers(sd1: SD1Twins) -> None:
    """Two prompts, two latents, two condition images: each latent is steered by its own."""
    images = torch.cat([condition_image(16), condition_image(17)])
    generator = torch.Generator().manual_seed(18)
    twins = SD1Twins(
        pipeline=sd1.pipeline,
        adapters=sd1.adapters,
        sd=sd1.sd,
        noise=torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator),
        positive=torch.randn(2, 77, TEXT_WIDTH, generator=generator),
        negative=torch.randn(2, 77, TEXT_WIDTH, generator=generator),
    )
    reference, file = sd1.adapters["full"]
    expected = diffusers_sd1(twins, reference, images)
    adapter = SD1T2IAdapter(sd1.sd.unet, name="depth", weights=file).inject()
    try:
        adapter.set_condition_features(adapter.compute_condition_features(images))
        actual = ours_sd1(twins)
    finally:
        adapter.eject()
    assert_matches(actual, expected)


def test_eject_gives_back_the_exact_model(sd1: SD1Twins) -> None:
    unet = sd1.sd.unet
    modules, state = list(unet.modules()), {k: v.clone() for k, v in unet.state_dict().items()}
    representation = repr(unet)
    unet.set_timestep(500)
    unet.set_clip_text_embedding(torch.cat([sd1.negative, sd1.positive]))
    x = torch.cat([sd1.noise, sd1.noise])
    with torch.no_grad():
        before = unet(x)
    adapters = [SD1T2IAdapter(unet, name=name, weights=sd1.adapters[name][1]).inject() for name in ("full", "light")]
    for adapter in adapters:
        adapter.set_condition_features(adapter.compute_condition_features(condition_image(8)))
    with torch.no_grad():
        assert not torch.equal(unet(x), before)
    for adapter in adapters:  # in the order injected: each ejects from under the other
        adapter.eject()
    assert list(unet.modules()) == modules and repr(unet) == representation
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(unet(x), before)


def test_a_condition_image_of_another_size_is_one_clear_error(sd1: SD1Twins) -> None:
    adapter = SD1T2IAdapter(sd1.sd.unet, name="depth", weights=sd1.adapters["full"][1]).inject()
    adapter.set_condition_features(adapter.compute_condition_features(condition_image(9, size=64)))
    try:
        with pytest.raises(Exception, match=r"is 64x64 .* resize the condition image to 128x128\n"):
            ours_sd1(sd1)
    finally:
        adapter.eject()


def test_bad_inputs_are_refused_with_one_clear_line(sd1: SD1Twins, tmp_path: Path) -> None:
    unet, file = sd1.sd.unet, sd1.adapters["full"][1]
    adapter = SD1T2IAdapter(unet, name="depth", weights=file).inject()
    try:
        with pytest.raises(ValueError, match="already injected"):
            SD1T2IAdapter(unet, name="depth", weights=sd1.adapters["light"][1]).inject()
        with pytest.raises(ValueError, match=r"must be \(batch, 3, height, width\)"):
            adapter.compute_condition_features(torch.rand(1, 1, SIZE, SIZE))
        with pytest.raises(ValueError, match="multiples of 8"):
            adapter.compute_condition_features(torch.rand(1, 3, 100, 100))
        with pytest.raises(ValueError, match="takes 4 feature maps"):
            adapter.set_condition_features(adapter.compute_condition_features(condition_image(10))[:3])
    finally:
        adapter.eject()
    with pytest.raises(ValueError, match="not a 'light_adapter'"):
        SD1T2IAdapter(unet, kind="light_adapter", weights=file)
    adapter = SD1T2IAdapter(unet, weights=file).inject()
    try:
        with pytest.raises(Exception, match="has no condition features"):
            ours_sd1(sd1)
    finally:
        adapter.eject()


def test_the_docstring_example_runs() -> None:
    assert t2i_adapter_package.__doc__ is not None
    (example,) = re.findall(r"```py\n(.*?)```", t2i_adapter_package.__doc__, flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "refiners.adapters.t2i_adapter's example", "exec"), {"__name__": "example"})


# -- SDXL ----------------------------------------------------------------------------------------------------------


def test_sdxl_t2i_adapter_on_part_of_the_steps_matches_diffusers(tmp_path: Path) -> None:
    twins = build_twins()
    channels = list(twins.unet.topology.channels)
    config = {"adapter_type": "full_adapter_xl", "channels": [*channels, channels[-1]], "downscale_factor": 16}
    reference, file = build_t2i_adapter(config, 11, tmp_path)
    components: dict[str, Any] = {**twins.pipeline.components, "adapter": reference}
    components["scheduler"] = DDIMScheduler.from_config({**twins.pipeline.scheduler.config})
    pipeline = StableDiffusionXLAdapterPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(12)
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    width = twins.unet.context_embedding_dim
    positive, negative = (torch.randn(1, 77, width, generator=generator) for _ in range(2))
    pooled, negative_pooled = (torch.randn(1, POOLED_DIM, generator=generator) for _ in range(2))
    image = condition_image(13)
    with torch.no_grad():
        output: Any = pipeline(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            image=image,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            latents=noise.clone(),
            output_type="latent",
            adapter_conditioning_scale=0.9,
            adapter_conditioning_factor=0.5,
        )
    expected: Tensor = output.images
    sd = StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=STEPS),
        default_size=SIZE,
    )
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)

    def ours(factor: float) -> Tensor:
        adapter = SDXLT2IAdapter(
            sd.unet, name="canny", scale=0.9, weights=file, adapter_conditioning_factor=factor
        ).inject()
        adapter.set_condition_features(adapter.compute_condition_features(image))
        x = sd.init_latents((SIZE, SIZE), noise=noise.clone())
        with torch.no_grad():
            for step in sd.steps:
                x = sd(
                    x,
                    step=step,
                    clip_text_embedding=torch.cat([negative, positive]),
                    pooled_text_embedding=torch.cat([negative_pooled, pooled]),
                    time_ids=time_ids,
                    condition_scale=5.0,
                )
        adapter.eject()
        return x

    assert_matches(ours(0.5), expected)
    assert_moves(ours(0.0), expected)  # it acts on the first half
    assert_moves(ours(1.0), expected)  # and not on the second


def test_an_sdxl_t2i_adapter_is_refused_by_sd1_with_both_sizes(sd1: SD1Twins, tmp_path: Path) -> None:
    config = {"adapter_type": "full_adapter_xl", "channels": [32, 64, 96, 96], "downscale_factor": 16}
    _, file = build_t2i_adapter(config, 14, tmp_path)
    with pytest.raises(ValueError, match="holds a FullT2IEncoderXL") as error:
        SD1T2IAdapter(sd1.sd.unet, weights=file)
    message = str(error.value)
    assert "\n" not in message and "FullT2IEncoderXL" in message and "SDXLT2IAdapter" in message
    assert "(32, 64, 96, 96)" in message and str(UNET_CHANNELS) in message


# -- the README ----------------------------------------------------------------------------------------------------


def test_the_readme_t2i_adapter_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's T2I-Adapter section, on the toy SD1 model: its command converts a toy T2I-Adapter saved where the
    Hub id points (a local folder is read first), its block generates with it (in 3 steps instead of 30)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("## T2I-Adapter")
    section = readme[start : readme.index("\n## ", start)]
    commands = re.findall(r"^uv run (refiners-convert t2i-adapter .*)$", section, flags=re.MULTILINE)
    assert commands == ["refiners-convert t2i-adapter --from TencentARC/t2iadapter_depth_sd15v2 --to depth.safetensors"]
    monkeypatch.chdir(tmp_path)
    save_toy_stable_diffusion_1(tmp_path / "toy")
    assert main(["sd1", "--from", str(tmp_path / "toy"), "--to", "sd15/"]) == 0
    unet: Any = UNet2DConditionModel.from_pretrained(tmp_path / "toy" / "unet")
    T2IAdapter(adapter_type="full_adapter", channels=list(unet.config.block_out_channels)).save_pretrained(
        tmp_path / "TencentARC" / "t2iadapter_depth_sd15v2"
    )
    assert main(shlex.split(commands[0])[1:]) == 0
    size = 8 * unet.config.sample_size
    tensor_to_image(condition_image(15, size)).save("depth_map.png")
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1
    block = blocks[0].replace("num_inference_steps=30", "num_inference_steps=3")  # the rest word for word
    assert block != blocks[0]
    exec(compile(block, "README.md, T2I-Adapter block", "exec"), {"__name__": "readme"})
    assert Image.open("t2i_adapter_room.png").size == (size, size)
