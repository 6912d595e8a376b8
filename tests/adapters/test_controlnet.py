"""ControlNet adapters generate what diffusers' ControlNet pipelines generate, from the same converted files.

The references are `StableDiffusionControlNetPipeline` (one ControlNet, two with their own scales, a step range, guess
mode) and `StableDiffusionXLControlNetPipeline`, on the toy SD1.5 and SDXL models (tests/toy_models.py,
tests/toy_sdxl.py). Each ControlNet is diffusers' `ControlNetModel.from_unet(pipeline.unet)` with its zero
convolutions randomised (else it would add zeros), saved with `save_pretrained` and converted by
`refiners-convert controlnet`'s function. A short DDIM run on both sides from the same noise and text embeddings: the
final latents agree to 1e-4 of their scale.
"""

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline
from diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl import StableDiffusionXLControlNetPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from PIL import Image
from torch import Tensor
from toy_models import TEXT_WIDTH, build_reference, convert_reference, toy_sd
from toy_sdxl import POOLED_DIM, build_twins

import refiners.adapters.controlnet as controlnet_package
from refiners.adapters.controlnet import SD1ControlnetAdapter, SDXLControlnetAdapter
from refiners.converters.cli import main
from refiners.converters.controlnet import convert_controlnet
from refiners.converters.toy import TOY_VAE_CONFIG, save_toy_stable_diffusion_1
from refiners.fluxion.utils import tensor_to_image
from refiners.foundationals.latent_diffusion import DDIM, StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RELATIVE_ATOL = 1e-4
STEPS = 4
SIZE = 128  # four resolutions: 2x2 latents at the lowest (at 1x1 its GroupNorms are ill-conditioned)
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


def randomise_zero_convolutions(controlnet: ControlNetModel, seed: int) -> None:
    """diffusers initialises the condition's last convolution and the zero convolutions to zero: the ControlNet would
    add nothing. Random weights make it move the output (and a swapped projection show)."""
    generator = torch.Generator().manual_seed(seed)
    zero = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    with torch.no_grad():
        for module in zero:
            for parameter in module.parameters():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
        for parameter in controlnet.controlnet_cond_embedding.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def build_controlnet(unet: Any, seed: int, folder: Path) -> tuple[ControlNetModel, Path]:
    """A diffusers ControlNet of `unet`, randomised, saved as a user downloads it and converted with ours."""
    controlnet = ControlNetModel.from_unet(unet).eval()
    randomise_zero_convolutions(controlnet, seed)
    controlnet.save_pretrained(folder / "diffusers")
    converted, _ = convert_controlnet(folder / "diffusers", folder / "controlnet.safetensors")
    return controlnet, converted


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


def condition_image(seed: int, size: int = SIZE) -> Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- SD1 -----------------------------------------------------------------------------------------------------------


@dataclass
class SD1Twins:
    pipeline: StableDiffusionControlNetPipeline
    controlnets: list[ControlNetModel]
    files: list[Path]
    sd: StableDiffusion_1
    noise: Tensor
    positive: Tensor
    negative: Tensor


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> SD1Twins:
    reference = build_reference()
    root = tmp_path_factory.mktemp("controlnets")
    controlnets, files = [], []
    for seed in (1, 2):
        controlnet, file = build_controlnet(reference.unet, seed, root / f"controlnet-{seed}")
        controlnets.append(controlnet)
        files.append(file)
    torch.manual_seed(0)
    pipeline = StableDiffusionControlNetPipeline(
        vae=AutoencoderKL(**TOY_VAE_CONFIG).eval(),
        text_encoder=reference.text_encoder,
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        unet=reference.unet,
        controlnet=controlnets[0],
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),  # pyright: ignore[reportArgumentType]
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    sd = toy_sd(convert_reference(reference))
    sd.solver = DDIM(num_inference_steps=STEPS)
    generator = torch.Generator().manual_seed(3)
    return SD1Twins(
        pipeline=pipeline,
        controlnets=controlnets,
        files=files,
        sd=sd,
        noise=torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator),
        positive=torch.randn(1, 77, TEXT_WIDTH, generator=generator),
        negative=torch.randn(1, 77, TEXT_WIDTH, generator=generator),
    )


def diffusers_sd1(twins: SD1Twins, controlnets: list[ControlNetModel], images: list[Tensor], **kwargs: Any) -> Tensor:
    components: dict[str, Any] = {
        **twins.pipeline.components,
        "controlnet": controlnets if len(controlnets) > 1 else controlnets[0],
    }
    pipeline = StableDiffusionControlNetPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        output: Any = pipeline(
            prompt_embeds=twins.positive,
            negative_prompt_embeds=twins.negative,
            image=images if len(images) > 1 else images[0],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            latents=twins.noise.clone(),
            output_type="latent",
            **kwargs,
        )
    return output.images


def ours_sd1(sd: StableDiffusion_1, twins: SD1Twins) -> Tensor:
    embedding = torch.cat([twins.negative, twins.positive])
    x = sd.init_latents((SIZE, SIZE), noise=twins.noise.clone())
    with torch.no_grad():
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
    return x


def test_one_controlnet_matches_diffusers(sd1: SD1Twins) -> None:
    image = condition_image(4)
    expected = diffusers_sd1(sd1, sd1.controlnets[:1], [image], controlnet_conditioning_scale=0.8)
    adapter = SD1ControlnetAdapter(sd1.sd.unet, name="canny", scale=0.8, weights=sd1.files[0]).inject()
    try:
        adapter.set_controlnet_condition(image)
        actual = ours_sd1(sd1.sd, sd1)
    finally:
        adapter.eject()
    assert_matches(actual, expected)
    without = ours_sd1(sd1.sd, sd1)
    assert (without - expected).abs().max() > 100 * RELATIVE_ATOL * expected.abs().max()  # the ControlNet acts


def test_two_controlnets_with_their_own_scales_match_diffusers(sd1: SD1Twins) -> None:
    images = [condition_image(5), condition_image(6)]
    expected = diffusers_sd1(sd1, sd1.controlnets, images, controlnet_conditioning_scale=[0.7, 1.3])
    adapters = [
        SD1ControlnetAdapter(sd1.sd.unet, name=name, scale=scale, weights=file).inject()
        for name, scale, file in zip(["canny", "depth"], [0.7, 1.3], sd1.files, strict=True)
    ]
    for adapter, image in zip(adapters, images, strict=True):
        adapter.set_controlnet_condition(image)
    try:
        actual = ours_sd1(sd1.sd, sd1)
    finally:
        for adapter in adapters:
            adapter.eject()
    assert_matches(actual, expected)


def test_a_step_range_and_guess_mode_match_diffusers(sd1: SD1Twins) -> None:
    image = condition_image(7)
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (
            {"control_guidance_start": 0.25, "control_guidance_end": 0.75},
            {"guidance_start": 0.25, "guidance_end": 0.75},
        ),
        ({"guess_mode": True}, {"guess_mode": True}),
    ]
    for kwargs, adapter_kwargs in cases:
        expected = diffusers_sd1(sd1, sd1.controlnets[:1], [image], **kwargs)
        adapter = SD1ControlnetAdapter(sd1.sd.unet, weights=sd1.files[0], **adapter_kwargs).inject()
        adapter.set_controlnet_condition(image)
        try:
            actual = ours_sd1(sd1.sd, sd1)
        finally:
            adapter.eject()
        assert_matches(actual, expected)


def test_one_condition_image_per_latent_matches_diffusers(sd1: SD1Twins) -> None:
    """Two prompts, two latents, two condition images: each latent is steered by its own."""
    images = torch.cat([condition_image(14), condition_image(15)])
    generator = torch.Generator().manual_seed(16)
    twins = SD1Twins(
        pipeline=sd1.pipeline,
        controlnets=sd1.controlnets,
        files=sd1.files,
        sd=sd1.sd,
        noise=torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator),
        positive=torch.randn(2, 77, TEXT_WIDTH, generator=generator),
        negative=torch.randn(2, 77, TEXT_WIDTH, generator=generator),
    )
    expected = diffusers_sd1(twins, sd1.controlnets[:1], [images])
    adapter = SD1ControlnetAdapter(sd1.sd.unet, weights=sd1.files[0]).inject()
    adapter.set_controlnet_condition(images)
    try:
        actual = ours_sd1(sd1.sd, twins)
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
    adapter = SD1ControlnetAdapter(unet, weights=sd1.files[0]).inject()
    adapter.set_controlnet_condition(condition_image(8))
    assert len(unet.state_dict()) > len(state)  # the ControlNet's weights, under the adapter
    with torch.no_grad():
        assert not torch.equal(unet(x), before)
    adapter.eject()
    assert list(unet.modules()) == modules and repr(unet) == representation
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(unet(x), before)


def test_a_condition_image_of_another_size_is_one_clear_error(sd1: SD1Twins) -> None:
    adapter = SD1ControlnetAdapter(sd1.sd.unet, name="canny", weights=sd1.files[0]).inject()
    adapter.set_controlnet_condition(condition_image(9, size=48))
    try:
        with pytest.raises(Exception, match=r"resize the condition image to 128x128"):
            ours_sd1(sd1.sd, sd1)
    finally:
        adapter.eject()


def test_a_name_is_injected_once(sd1: SD1Twins) -> None:
    first = SD1ControlnetAdapter(sd1.sd.unet, name="canny", weights=sd1.files[0]).inject()
    try:
        with pytest.raises(ValueError, match="already injected"):
            SD1ControlnetAdapter(sd1.sd.unet, name="canny", weights=sd1.files[1]).inject()
    finally:
        first.eject()


# -- SDXL ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess-mode"])
def test_sdxl_controlnet_matches_diffusers(tmp_path: Path, guess_mode: bool) -> None:
    twins = build_twins()
    controlnet, file = build_controlnet(twins.pipeline.unet, 11, tmp_path)
    components: dict[str, Any] = {**twins.pipeline.components, "controlnet": controlnet}
    components["scheduler"] = DDIMScheduler.from_config({**twins.pipeline.scheduler.config})
    pipeline = StableDiffusionXLControlNetPipeline(**components)
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
            controlnet_conditioning_scale=0.9,
            guess_mode=guess_mode,
        )
    expected: Tensor = output.images
    sd = StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=STEPS),
        default_size=SIZE,
    )
    adapter = SDXLControlnetAdapter(sd.unet, name="canny", scale=0.9, weights=file, guess_mode=guess_mode).inject()
    adapter.set_controlnet_condition(image)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
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
    assert_matches(x, expected)


def test_the_docstring_example_runs() -> None:
    assert controlnet_package.__doc__ is not None
    (example,) = re.findall(r"```py\n(.*?)```", controlnet_package.__doc__, flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "refiners.adapters.controlnet's example", "exec"), {"__name__": "example"})


# -- the README ----------------------------------------------------------------------------------------------------


def test_the_readme_controlnet_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's ControlNet section word for word, on the toy SD1 model: its command converts a toy ControlNet
    saved where the Hub id points (a local folder is read first), its block generates with it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("## ControlNet")
    section = readme[start : readme.index("\n## ", start)]
    commands = re.findall(r"^uv run (refiners-convert controlnet .*)$", section, flags=re.MULTILINE)
    assert commands == ["refiners-convert controlnet --from lllyasviel/control_v11p_sd15_canny --to canny.safetensors"]
    monkeypatch.chdir(tmp_path)
    save_toy_stable_diffusion_1(tmp_path / "toy")
    assert main(["sd1", "--from", str(tmp_path / "toy"), "--to", "sd15/"]) == 0
    unet: Any = UNet2DConditionModel.from_pretrained(tmp_path / "toy" / "unet")
    controlnet = ControlNetModel.from_unet(unet)
    randomise_zero_convolutions(controlnet, 21)
    controlnet.save_pretrained(tmp_path / "lllyasviel" / "control_v11p_sd15_canny")
    assert main(shlex.split(commands[0])[1:]) == 0
    size = 8 * unet.config.sample_size
    tensor_to_image(condition_image(22, size)).save("canny_edges.png")
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    blocks = [block for block in blocks if "from_control_lora" not in block]  # tests/adapters/test_control_lora.py's
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md, ControlNet block", "exec"), {"__name__": "readme"})
    assert Image.open("controlnet_cat.png").size == (size, size)
