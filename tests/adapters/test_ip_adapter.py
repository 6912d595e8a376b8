"""IP-Adapter (base and plus, SD1 and SDXL) equals diffusers' `load_ip_adapter` + `set_ip_adapter_scale` over a DDIM
generation, on the toy pipelines, with h94-layout files written here from random weights."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from ip_adapter_files import h94_weights, save_bin
from PIL import Image
from toy_sd1 import ours, reference, save_toy_sd1
from toy_sdxl import SCHEDULER_CONFIG, build_twins
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from refiners.adapters.ip_adapter import IPAdapter, SD1IPAdapter, SDXLIPAdapter
from refiners.converters.clip_image import convert_clip_image
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.clip import CLIPImageEncoder
from refiners.foundationals.latent_diffusion import DDIM, LatentDiffusionModel
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL

PROMPT = "a cute cat"
STEPS = 3
SIZE = 64
# ViT-H's config at toy width (OpenCLIP: exact GeLU), 16-pixel... no: 14-pixel patches of 224-pixel images.
ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "patch_size": 14,
    "projection_dim": 40,
    "hidden_act": "gelu",
    "image_size": 224,
}


@dataclass
class Encoders:
    reference: CLIPVisionModelWithProjection
    ours: CLIPImageEncoder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> Encoders:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER_CONFIG)).eval()
    folder = tmp_path_factory.mktemp("ip_encoder")
    reference.save_pretrained(folder / "image_encoder")
    path, _, _ = convert_clip_image(folder / "image_encoder", folder / "clip_image.safetensors")
    return Encoders(reference, CLIPImageEncoder.from_safetensors(path))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> tuple[StableDiffusionPipeline, LatentDiffusionModel[Any, Any]]:
    diffusers_folder, converted = save_toy_sd1(tmp_path_factory.mktemp("ip_sd1"))
    return reference(StableDiffusionPipeline, diffusers_folder), ours(converted)


def image() -> Image.Image:
    pixels = torch.randint(0, 256, (SIZE, 80, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def load_reference(pipeline: Any, encoders: Encoders, path: Path, scale: Any) -> None:
    pipeline.register_modules(image_encoder=encoders.reference, feature_extractor=CLIPImageProcessor())
    pipeline.load_ip_adapter(
        str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None, low_cpu_mem_usage=False
    )
    pipeline.set_ip_adapter_scale(scale)


def reference_latents(pipeline: Any, num_images_per_prompt: int = 1, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        output = pipeline(
            PROMPT,
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
            num_images_per_prompt=num_images_per_prompt,
            **kwargs,
        )
    return output.images


def our_latents(model: LatentDiffusionModel[Any, Any], num_images_per_prompt: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model.generate_latents(
            PROMPT,
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            seed=1,
            progress=False,
            num_images_per_prompt=num_images_per_prompt,
        )


def check(
    pipeline: Any, model: LatentDiffusionModel[Any, Any], adapter: IPAdapter, scale: Any, images: int = 1
) -> float:
    """Our generation of `images` latents with `adapter` against diffusers' with the same file; returns the max
    difference."""
    before = repr(model.unet)
    plain = our_latents(model, images)
    expected_embedding = pipeline.prepare_ip_adapter_image_embeds([image()], None, "cpu", 1, True)[0]
    expected = reference_latents(pipeline, images, ip_adapter_image=image())
    pipeline.unload_ip_adapter()
    adapter.inject()
    if isinstance(scale, dict):
        adapter.set_block_scales(scale)  # pyright: ignore[reportUnknownArgumentType]
    else:
        adapter.scale = scale
    with torch.no_grad():
        embedding = adapter.compute_clip_image_embedding(image())
        torch.testing.assert_close(embedding, expected_embedding, atol=1e-5 * expected_embedding.abs().max(), rtol=0)
        adapter.set_clip_image_embedding(embedding)
    actual = our_latents(model, images)
    adapter.eject()
    tolerance = 1e-4 * expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance, f"max abs difference {difference:.3g} (tolerance {tolerance:.3g})"
    # The adapter moves the output well beyond the tolerance, and ejecting it gives the model back exactly.
    assert (actual - plain).abs().max() > 100 * tolerance
    assert repr(model.unet) == before
    assert torch.equal(our_latents(model, images), plain)
    print(f"max abs difference {difference:.3g}, {difference / expected.abs().max().item():.3g} of the scale")
    return difference


@pytest.mark.parametrize(
    ("fine_grained", "scale", "suffix", "images"),
    [
        (False, 1.0, ".safetensors", 1),
        (True, 0.6, ".bin", 2),  # two latents for the prompt: the image tokens serve both
        (False, {"down": {"block_1": [0.0, 1.0]}, "up": {"block_2": [0.5, 1.0, 0.0]}}, ".bin", 1),
    ],
    ids=["base", "plus", "per_block"],
)
def test_sd1_matches_diffusers(
    sd1: tuple[StableDiffusionPipeline, LatentDiffusionModel[Any, Any]],
    encoders: Encoders,
    tmp_path: Path,
    fine_grained: bool,
    scale: Any,
    suffix: str,
    images: int,
) -> None:
    pipeline, model = sd1
    clip_dim = ENCODER_CONFIG["hidden_size"] if fine_grained else ENCODER_CONFIG["projection_dim"]
    tensors = h94_weights(pipeline.unet, clip_dim, fine_grained)
    safetensors = tmp_path / "ip-adapter.safetensors"
    save_to_safetensors(safetensors, tensors)
    path = safetensors if suffix == ".safetensors" else save_bin(tensors, tmp_path / "ip-adapter.bin")
    load_reference(pipeline, encoders, safetensors, scale)
    adapter = SD1IPAdapter(target=model.unet, weights=path, fine_grained=fine_grained, clip_image_encoder=encoders.ours)
    check(pipeline, model, adapter, scale, images)


@pytest.mark.parametrize("fine_grained", [False, True], ids=["base", "plus"])
def test_sdxl_matches_diffusers(encoders: Encoders, tmp_path: Path, fine_grained: bool) -> None:
    twins = build_twins()
    pipeline: Any = twins.pipeline
    pipeline.scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    pipeline.set_progress_bar_config(disable=True)
    model = StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=STEPS, params=SDXL_SOLVER_PARAMS),
        default_size=SIZE,
    )
    clip_dim = ENCODER_CONFIG["hidden_size"] if fine_grained else ENCODER_CONFIG["projection_dim"]
    path = tmp_path / "ip-adapter_sdxl.safetensors"
    save_to_safetensors(path, h94_weights(pipeline.unet, clip_dim, fine_grained))
    load_reference(pipeline, encoders, path, 0.8)
    adapter = SDXLIPAdapter(
        target=model.unet, weights=path, scale=0.8, fine_grained=fine_grained, clip_image_encoder=encoders.ours
    )
    check(pipeline, model, adapter, 0.8)


def test_the_wrong_family_or_encoder_is_refused(
    sd1: tuple[StableDiffusionPipeline, LatentDiffusionModel[Any, Any]], encoders: Encoders
) -> None:
    pipeline, model = sd1
    sdxl_unet: Any = build_twins().pipeline.unet
    sdxl_weights = h94_weights(sdxl_unet, ENCODER_CONFIG["projection_dim"], False)
    with pytest.raises(ValueError, match=r"take 80-wide context .* this UNet's take 32") as error:
        SD1IPAdapter(target=model.unet, weights=sdxl_weights, clip_image_encoder=encoders.ours)
    assert "SDXLIPAdapter for SDXL" in str(error.value)
    wrong_width = h94_weights(pipeline.unet, 1024, False)
    with pytest.raises(ValueError, match=r"takes a 1024-wide CLIP image embedding but .* gives 40"):
        SD1IPAdapter(target=model.unet, weights=wrong_width, clip_image_encoder=encoders.ours)
    plus = h94_weights(pipeline.unet, ENCODER_CONFIG["hidden_size"], True)
    with pytest.raises(ValueError, match=r"pass fine_grained=True"):
        SD1IPAdapter(target=model.unet, weights=plus, clip_image_encoder=encoders.ours)
    stray = h94_weights(pipeline.unet, ENCODER_CONFIG["projection_dim"], False) | {"image_proj.extra": torch.ones(1)}
    with pytest.raises(ValueError, match=r"1 tensors of the IP-Adapter file are not used: image_proj.extra"):
        SD1IPAdapter(target=model.unet, weights=stray, clip_image_encoder=encoders.ours)


def test_the_readme_ip_adapter_blocks_run(
    encoders: Encoders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's IP-Adapter section word for word (the FaceID block with 3 steps), on the toy SD1 (as `sd15/`) with
    a toy image encoder and a toy FaceID file saved where the Hub ids point, and an h94-layout `.bin` for it."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from ip_adapter_files import FACE_DIM, faceid_weights

    import refiners.converters.clip_image as clip_image
    import refiners.converters.ip_adapter as ip_adapter_converter
    from refiners.converters.cli import main

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("## IP-Adapter")
    section = readme[start : readme.index("\n## ", start)]
    commands = re.findall(r"^uv run (refiners-convert .*?)$", section, flags=re.MULTILINE)
    assert commands == [
        "refiners-convert clip-image --from h94/IP-Adapter/models/image_encoder --to clip_image_h.safetensors",
        "refiners-convert ip-adapter --from h94/IP-Adapter-FaceID/ip-adapter-faceid_sd15.bin --to "
        "faceid_sd15.safetensors",
    ]
    encoder_folder = tmp_path / "hub" / "image_encoder"
    encoders.reference.save_pretrained(encoder_folder)
    monkeypatch.setattr(
        clip_image, "_download", lambda hub_id: encoder_folder if hub_id.startswith("h94/") else Path(hub_id)
    )
    diffusers_folder, _ = save_toy_sd1(tmp_path / "toy")
    unet: Any = UNet2DConditionModel.from_pretrained(diffusers_folder / "unet")
    faceid = save_bin(faceid_weights(unet), tmp_path / "hub" / "ip-adapter-faceid_sd15.bin")
    monkeypatch.setattr(
        ip_adapter_converter, "_download", lambda hub_path: faceid if hub_path.startswith("h94/") else Path(hub_path)
    )
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert main(command.split()[1:]) == 0
    assert main(["sd1", "--from", str(diffusers_folder), "--to", "sd15/"]) == 0
    save_bin(h94_weights(unet, ENCODER_CONFIG["projection_dim"], False), tmp_path / "ip-adapter_sd15.bin")
    image().save(tmp_path / "cat.png")
    torch.save(torch.nn.functional.normalize(torch.randn(FACE_DIM), dim=0), tmp_path / "face.pt")
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2 and "num_inference_steps=30" in blocks[1]
    exec(compile(blocks[0], "README.md, IP-Adapter block", "exec"), {"__name__": "readme"})
    assert Image.open(tmp_path / "ip_cat.png").size == (64, 64)  # the toy's native size
    faceid_block = blocks[1].replace("num_inference_steps=30", "num_inference_steps=3")
    exec(compile(faceid_block, "README.md, IP-Adapter FaceID block", "exec"), {"__name__": "readme"})
    assert Image.open(tmp_path / "face_garden.png").size == (64, 64)


@pytest.mark.parametrize(
    ("fine_grained", "clip_dim", "encoder"),
    [(False, 1280, "CLIPImageEncoderG"), (False, 1024, "CLIPImageEncoderH"), (True, 1664, "CLIPImageEncoderG")],
)
def test_sdxl_picks_the_image_encoder_its_file_was_trained_with(
    fine_grained: bool, clip_dim: int, encoder: str
) -> None:
    """`ip-adapter_sdxl.bin` takes ViT-bigG's embedding, the `vit-h` files ViT-H's: with no encoder given, the file's
    sizes choose it (built on the UNet's device: "meta" here, so nothing is allocated)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from toy_sdxl import UNET_CONFIG

    from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLUNet
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY

    with torch.device("meta"):
        reference_unet = UNet2DConditionModel(**UNET_CONFIG)
    unet = TINY.unet.build((SDXLUNet,), device="meta")
    adapter = SDXLIPAdapter(
        target=unet, weights=h94_weights(reference_unet, clip_dim, fine_grained), fine_grained=fine_grained
    )
    assert type(adapter.clip_image_encoder).__name__ == encoder
    assert adapter.clip_image_encoder.device.type == "meta"


def test_two_ip_adapters_at_once_match_diffusers(
    sd1: tuple[StableDiffusionPipeline, LatentDiffusionModel[Any, Any]], encoders: Encoders, tmp_path: Path
) -> None:
    """A base and a plus IP-Adapter on one UNet, each with its image and scale, as diffusers' lists of them."""
    pipeline_: Any = sd1[0]
    model = sd1[1]
    base = tmp_path / "base.safetensors"
    plus = tmp_path / "plus.safetensors"
    save_to_safetensors(base, h94_weights(pipeline_.unet, ENCODER_CONFIG["projection_dim"], False, seed=1))
    save_to_safetensors(plus, h94_weights(pipeline_.unet, ENCODER_CONFIG["hidden_size"], True, seed=2))
    second_image = image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pipeline_.register_modules(image_encoder=encoders.reference, feature_extractor=CLIPImageProcessor())
    pipeline_.load_ip_adapter(
        [str(tmp_path)] * 2,
        subfolder=["", ""],
        weight_name=[base.name, plus.name],
        image_encoder_folder=None,
        low_cpu_mem_usage=False,
    )
    pipeline_.set_ip_adapter_scale([0.7, 0.5])
    expected = reference_latents(pipeline_, ip_adapter_image=[image(), second_image])
    pipeline_.unload_ip_adapter()
    plain = our_latents(model)
    adapters = [
        SD1IPAdapter(model.unet, base, scale=0.7, clip_image_encoder=encoders.ours, name="base").inject(),
        SD1IPAdapter(
            model.unet, plus, scale=0.5, fine_grained=True, clip_image_encoder=encoders.ours, name="plus"
        ).inject(),
    ]
    with pytest.raises(ValueError, match="already has an IP-Adapter named 'base'"):
        SD1IPAdapter(model.unet, base, clip_image_encoder=encoders.ours, name="base").inject()
    with torch.no_grad():
        for adapter, prompt_image in zip(adapters, [image(), second_image], strict=True):
            adapter.set_clip_image_embedding(adapter.compute_clip_image_embedding(prompt_image))
    actual = our_latents(model)
    adapters[0].eject()  # in any order
    adapters[1].eject()
    tolerance = 1e-4 * expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance, f"max abs difference {difference:.3g} (tolerance {tolerance:.3g})"
    assert (actual - plain).abs().max() > 100 * tolerance
    assert torch.equal(our_latents(model), plain)
    print(f"max abs difference {difference:.3g}, {difference / expected.abs().max().item():.3g} of the scale")
