"""ControlNet, T2I-Adapter, IP-Adapter, textual inversion and a LoRA on one model (issue #12), on the toy SD1.5.

All five, injected in any order, generate the same latents, each moving them; one diffusers pipeline holding the
same set (ControlNet + IP-Adapter + LoRA + textual inversion in `StableDiffusionControlNetPipeline`; T2I-Adapter +
LoRA + textual inversion in `StableDiffusionAdapterPipeline`, which loads neither an IP-Adapter nor, itself, a LoRA:
they go into its components) generates what ours does from the same files, within 1e-4 of the latents' scale;
ejecting all, in any order, gives the original model back exactly. Each file is written by the reference's own code
from random weights (zero-initialised layers randomised) and converted or read by ours.
"""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from diffusers.models.adapter import T2IAdapter
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import StableDiffusionAdapterPipeline
from ip_adapter_files import h94_weights
from peft import LoraConfig  # pyright: ignore[reportMissingTypeStubs]
from peft.utils import get_peft_model_state_dict  # pyright: ignore[reportMissingTypeStubs]
from PIL import Image
from torch import Tensor
from toy_models import UNET_CHANNELS
from toy_sd1 import ours, reference, save_toy_sd1
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from refiners.adapters.controlnet import CONTROLNET_CONTEXT, SD1ControlnetAdapter
from refiners.adapters.controlnet.adapter import CONTROLNET_RESIDUALS_CONTEXT
from refiners.adapters.ip_adapter import SD1IPAdapter
from refiners.adapters.ip_adapter.ip_adapter import IP_ADAPTER_CONTEXT
from refiners.adapters.lora import SD1LoraAdapter
from refiners.adapters.t2i_adapter import SD1T2IAdapter
from refiners.adapters.t2i_adapter.adapter import T2I_ADAPTER_CONTEXT
from refiners.adapters.textual_inversion import TextualInversion
from refiners.converters.clip_image import convert_clip_image
from refiners.converters.controlnet import convert_controlnet
from refiners.converters.t2i_adapter import convert_t2i_adapter
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.clip import CLIPImageEncoder, CLIPTextEncoder
from refiners.foundationals.latent_diffusion import StableDiffusion_1

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",
    "ignore:The following (rank|alpha)_pattern keys:RuntimeWarning",
)

STEPS = 3
SIZE = 128  # 2x2 latents at the toy UNet's lowest resolution
GUIDANCE = 7.5
SEED = 1
TOKEN = "<cat-toy>"
PROMPT = f"a photo of {TOKEN} on a table"
SCALES = {"controlnet": 0.8, "t2i": 0.9, "ip": 0.7, "lora": 0.8}
ALL = ("controlnet", "t2i", "ip", "lora", "ti")
# A CLIP ViT-H image encoder at toy width (OpenCLIP's exact GeLU, 14-pixel patches of 224-pixel images).
IMAGE_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 14,
    "projection_dim": 40,
    "hidden_act": "gelu",
    "image_size": 224,
}
# Every kind of layer a LoRA updates, the UNet's first convolution included (where the ControlNet is injected too).
LORA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1", "time_emb_proj", "conv_in"]
LORA_TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


class Ejectable(Protocol):
    def eject(self) -> None: ...


@dataclass
class Files:
    """The toy SD1.5 and one file per adapter, as a user has them, with what the references need."""

    diffusers_folder: Path
    converted: Path
    controlnet: ControlNetModel
    controlnet_file: Path
    t2i: T2IAdapter
    t2i_file: Path
    ip_file: Path
    image_encoder: CLIPVisionModelWithProjection
    our_image_encoder: CLIPImageEncoder
    lora_file: Path
    ti_file: Path
    control_image: Tensor
    t2i_image: Tensor
    ip_image: Image.Image


def randomised_controlnet(unet: Any) -> ControlNetModel:
    """diffusers' ControlNet of `unet`, its zero convolutions random (else it would add zeros)."""
    controlnet = ControlNetModel.from_unet(unet).eval()
    generator = torch.Generator().manual_seed(11)
    zero = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for module in [*zero, controlnet.controlnet_mid_block]:
            for parameter in module.parameters():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return controlnet


def random_t2i_adapter() -> T2IAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        adapter = T2IAdapter(adapter_type="full_adapter", channels=list(UNET_CHANNELS), num_res_blocks=2).eval()
        with torch.no_grad():  # larger features than the default init's, so that they move the output well
            for parameter in adapter.parameters():
                parameter.mul_(2.0)
    return adapter


def save_lora(pipeline: StableDiffusionPipeline, folder: Path) -> Path:
    """A LoRA of the UNet and the text encoder trained with PEFT (random `up` weights), saved as diffusers does."""
    unet, text_encoder = copy.deepcopy(pipeline.unet), copy.deepcopy(pipeline.text_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(13)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=LORA_UNET_TARGETS, init_lora_weights=False))
        text_encoder.add_adapter(  # pyright: ignore[reportUnknownMemberType]
            LoraConfig(r=2, lora_alpha=3, target_modules=LORA_TEXT_TARGETS, init_lora_weights=False)
        )
    unet_layers: dict[str, Any] = get_peft_model_state_dict(unet)
    text_layers: dict[str, Any] = get_peft_model_state_dict(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("composition")
    diffusers_folder, converted = save_toy_sd1(root)
    pipeline = reference(StableDiffusionPipeline, diffusers_folder)
    controlnet = randomised_controlnet(pipeline.unet)
    controlnet.save_pretrained(root / "controlnet")
    controlnet_file, _ = convert_controlnet(root / "controlnet", root / "controlnet.safetensors")
    t2i = random_t2i_adapter()
    t2i.save_pretrained(root / "t2i")
    t2i_file, _ = convert_t2i_adapter(root / "t2i", root / "t2i.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(14)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).eval()
    image_encoder.save_pretrained(root / "image_encoder")
    encoder_file, _, _ = convert_clip_image(root / "image_encoder", root / "clip_image.safetensors")
    ip_file = root / "ip-adapter.safetensors"
    save_to_safetensors(ip_file, h94_weights(pipeline.unet, IMAGE_ENCODER_CONFIG["projection_dim"], False, seed=15))
    ti_file = root / "learned_embeds.bin"
    width = pipeline.text_encoder.config.hidden_size
    torch.save({TOKEN: torch.randn(1, width, generator=torch.Generator().manual_seed(16))}, ti_file)
    generator = torch.Generator().manual_seed(17)
    pixels = torch.randint(0, 256, (SIZE, 96, 3), generator=generator, dtype=torch.uint8)
    return Files(
        diffusers_folder=diffusers_folder,
        converted=converted,
        controlnet=controlnet,
        controlnet_file=controlnet_file,
        t2i=t2i,
        t2i_file=t2i_file,
        ip_file=ip_file,
        image_encoder=image_encoder,
        our_image_encoder=CLIPImageEncoder.from_safetensors(encoder_file),
        lora_file=save_lora(pipeline, root / "lora"),
        ti_file=ti_file,
        control_image=torch.rand(1, 3, SIZE, SIZE, generator=generator),
        t2i_image=torch.rand(1, 3, SIZE, SIZE, generator=generator),
        ip_image=Image.fromarray(pixels.numpy()),
    )


@pytest.fixture(scope="module")
def sd(files: Files) -> StableDiffusion_1:
    return ours(files.converted)


# -- ours --------------------------------------------------------------------------------------------------------


def inject(name: str, sd: StableDiffusion_1, files: Files) -> Ejectable:
    """Build the adapter `name` on the model as it is now (other adapters in it or not), inject it, give it its
    condition."""
    match name:
        case "controlnet":
            controlnet = SD1ControlnetAdapter(sd.unet, scale=SCALES[name], weights=files.controlnet_file).inject()
            controlnet.set_controlnet_condition(files.control_image)
            return controlnet
        case "t2i":
            t2i = SD1T2IAdapter(sd.unet, scale=SCALES[name], weights=files.t2i_file).inject()
            with torch.no_grad():
                t2i.set_condition_features(t2i.compute_condition_features(files.t2i_image))
            return t2i
        case "ip":
            ip = SD1IPAdapter(sd.unet, files.ip_file, scale=SCALES[name], clip_image_encoder=files.our_image_encoder)
            ip.inject()
            with torch.no_grad():
                ip.set_clip_image_embedding(ip.compute_clip_image_embedding(files.ip_image))
            return ip
        case "lora":
            return SD1LoraAdapter.from_safetensors(sd, files.lora_file, scale=SCALES[name]).inject()
        case _:
            assert isinstance(sd.clip_text_encoder, CLIPTextEncoder)
            return TextualInversion.from_file(sd.clip_text_encoder, files.ti_file, token=TOKEN).inject()


def inject_all(order: tuple[str, ...], sd: StableDiffusion_1, files: Files) -> dict[str, Ejectable]:
    return {name: inject(name, sd, files) for name in order}


def generate(sd: StableDiffusion_1) -> Tensor:
    with torch.no_grad():
        return sd.generate_latents(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=SIZE,
            width=SIZE,
            seed=SEED,
            progress=False,
        )


def with_adapters(order: tuple[str, ...], sd: StableDiffusion_1, files: Files) -> Tensor:
    """The latents generated with the adapters of `order` injected in that order; all ejected after."""
    adapters = inject_all(order, sd, files)
    try:
        return generate(sd)
    finally:
        for adapter in reversed(adapters.values()):
            adapter.eject()


def scale_of(expected: Tensor) -> float:
    return expected.abs().max().item()


def difference(actual: Tensor, expected: Tensor) -> float:
    """The largest difference, as a fraction of the expected latents' scale."""
    return (actual - expected).abs().max().item() / scale_of(expected)


# -- all five, in any order --------------------------------------------------------------------------------------


def test_all_five_in_any_order_generate_the_same_and_each_acts(sd: StableDiffusion_1, files: Files) -> None:
    orders = [ALL, tuple(reversed(ALL)), ("lora", "ip", "controlnet", "ti", "t2i")]
    first, *others = [with_adapters(order, sd, files) for order in orders]
    for order, latents in zip(orders[1:], others, strict=True):
        assert difference(latents, first) <= 1e-6, f"{order}: {difference(latents, first):.3g} of the scale"
        print(f"{order} against {ALL}: {difference(latents, first):.3g} of the scale")
    for left_out in ALL:
        without = with_adapters(tuple(name for name in ALL if name != left_out), sd, files)
        assert difference(without, first) > 1e-2, f"{left_out} moves the latents by {difference(without, first):.3g}"
        print(f"without {left_out}: {difference(without, first):.3g} of the scale")
    adapters = inject_all(ALL, sd, files)
    try:
        with torch.no_grad():
            images = sd.generate(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, seed=SEED, progress=False)
    finally:
        for adapter in adapters.values():
            adapter.eject()
    assert [image.size for image in images] == [(SIZE, SIZE)]


# -- diffusers, where one pipeline holds the set -----------------------------------------------------------------


def diffusers_base(files: Files) -> StableDiffusionPipeline:
    """The toy SD1.5 in diffusers with the LoRA (at its scale) and the textual inversion loaded."""
    pipeline = reference(StableDiffusionPipeline, files.diffusers_folder)
    pipeline.load_lora_weights(str(files.lora_file), adapter_name="lora")
    pipeline.set_adapters("lora", SCALES["lora"])
    pipeline.load_textual_inversion(str(files.ti_file))
    return pipeline


def diffusers_latents(pipeline: Any, **kwargs: Any) -> Tensor:
    with torch.no_grad():
        output = pipeline(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
            **kwargs,
        )
    return output.images


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale_of(expected), rtol=0)


def test_controlnet_ip_adapter_lora_and_textual_inversion_match_one_diffusers_pipeline(
    sd: StableDiffusion_1, files: Files
) -> None:
    base = diffusers_base(files)
    components: dict[str, Any] = {**base.components, "controlnet": files.controlnet}
    pipeline = StableDiffusionControlNetPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.register_modules(image_encoder=files.image_encoder, feature_extractor=CLIPImageProcessor())
    pipeline.load_ip_adapter(
        str(files.ip_file.parent),
        subfolder="",
        weight_name=files.ip_file.name,
        image_encoder_folder=None,
        low_cpu_mem_usage=False,
    )
    pipeline.set_ip_adapter_scale(SCALES["ip"])
    expected = diffusers_latents(
        pipeline,
        image=files.control_image,
        controlnet_conditioning_scale=SCALES["controlnet"],
        ip_adapter_image=files.ip_image,
    )
    actual = with_adapters(("lora", "ip", "controlnet", "ti"), sd, files)
    assert_matches(actual, expected)
    print(f"ControlNet + IP-Adapter + LoRA + TI: {difference(actual, expected):.3g} of the scale")


def test_t2i_adapter_lora_and_textual_inversion_match_one_diffusers_pipeline(
    sd: StableDiffusion_1, files: Files
) -> None:
    base = diffusers_base(files)
    pipeline = StableDiffusionAdapterPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        adapter=files.t2i,
        scheduler=base.scheduler,
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    expected = diffusers_latents(pipeline, image=files.t2i_image, adapter_conditioning_scale=SCALES["t2i"])
    actual = with_adapters(("t2i", "ti", "lora"), sd, files)
    assert_matches(actual, expected)
    print(f"T2I-Adapter + LoRA + TI: {difference(actual, expected):.3g} of the scale")


# -- ejecting ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ejection",
    [("ti", "controlnet", "lora", "t2i", "ip"), ("ip", "lora", "t2i", "controlnet", "ti")],
    ids=["one-order", "another"],
)
def test_ejecting_all_in_any_order_gives_back_the_exact_model(
    sd: StableDiffusion_1, files: Files, ejection: tuple[str, ...]
) -> None:
    # The models, not the pipeline: `generate` gives it a new solver of its number of steps.
    models = torch.nn.ModuleDict({"unet": sd.unet, "text_encoder": sd.clip_text_encoder, "lda": sd.lda})
    modules, representation = list(models.modules()), repr(models)
    state = {key: value.clone() for key, value in models.state_dict().items()}
    before = generate(sd)
    adapters = inject_all(ALL, sd, files)
    assert len(models.state_dict()) > len(state)
    for name in ejection:
        adapters[name].eject()
    assert list(models.modules()) == modules and repr(models) == representation
    after = models.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[key], value) for key, value in state.items())
    # Nor does the UNet keep tensors of the adapters: their images, tokens and features are gone with them.
    kept = {
        (context, key)
        for context in (CONTROLNET_CONTEXT, CONTROLNET_RESIDUALS_CONTEXT, IP_ADAPTER_CONTEXT, T2I_ADAPTER_CONTEXT)
        for key, value in sd.unet.provider.contexts.get(context, {}).items()
        if isinstance(value, torch.Tensor)
    }
    assert not kept, kept
    assert torch.equal(generate(sd), before)
