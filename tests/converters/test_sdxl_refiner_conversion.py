"""`refiners-convert sdxl` on the refiner (a folder without CLIP-L, or its SGM single file) and on an LCM SDXL UNet:
`from_folder` then generates what diffusers does from the same files."""

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from PIL import Image
from toy_sdxl import SCHEDULER_CONFIG, UNET_CONFIG, build_pipeline, build_refiner_pipeline, write_sgm_checkpoint

from refiners.converters.cli import main
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.latent_diffusion import DDIM, LCMSolver
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
    SDXL_SOLVER_PARAMS,
    StableDiffusion_XL,
    StableDiffusion_XL_Refiner,
)

FILES = ("clip_text.safetensors", "autoencoder.safetensors", "unet.safetensors")


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("refiner") / "toy-refiner"
    pipeline = build_refiner_pipeline(build_pipeline())
    pipeline.scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)  # pyright: ignore[reportAttributeAccessIssue]
    pipeline.save_pretrained(folder)
    return folder


def test_a_refiner_folder_converts_and_refines_as_diffusers(
    refiner_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "converted"
    assert main(["sdxl", "--from", str(refiner_folder), "--to", str(out)]) == 0
    err = capsys.readouterr().err
    assert "clip-text: OpenCLIP-G (a refiner)" in err
    assert f"load it with StableDiffusion_XL_Refiner.from_folder({str(out)!r})" in err
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(out / "clip_text.safetensors"))
    assert config is not None and config.class_name == "RefinerTextEncoder"

    with pytest.raises(
        ValueError, match=r"holds an SDXL refiner.*load it with StableDiffusion_XL_Refiner\.from_folder"
    ):
        StableDiffusion_XL.from_folder(out)
    refiner = StableDiffusion_XL_Refiner.from_folder(out, solver=DDIM(10, params=SDXL_SOLVER_PARAMS))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 96, 3), dtype=np.uint8))
    latents = refiner.generate_latents("a cute cat", init_image=image, num_inference_steps=10, seed=4, progress=False)
    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    with torch.no_grad():
        output: Any = reference(
            "a cute cat", image=image, num_inference_steps=10, generator=torch.Generator().manual_seed(4),
            output_type="latent",
        )  # fmt: skip
    expected = output.images
    torch.testing.assert_close(latents, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def test_the_refiners_single_file_converts_as_its_folder(refiner_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "toy-refiner.safetensors"
    write_sgm_checkpoint(refiner_folder, path)
    assert not any(key.startswith("conditioner.embedders.1.") for key in load_from_safetensors(path))
    # diffusers' own reader reads the file as this model: its tensors come back.
    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    loaded = StableDiffusionXLImg2ImgPipeline.from_single_file(
        str(path), config=str(refiner_folder), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder_2"):
        expected, actual = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        for key, tensor in expected.items():
            torch.testing.assert_close(actual[key], tensor, atol=0, rtol=0, msg=f"{name}.{key}")
    assert main(["sdxl", "--from", str(path), "--config", str(refiner_folder), "--to", str(tmp_path / "file")]) == 0
    assert main(["sdxl", "--from", str(refiner_folder), "--to", str(tmp_path / "folder")]) == 0
    for file in FILES:
        from_file, from_folder = (load_from_safetensors(tmp_path / d / file) for d in ("file", "folder"))
        assert from_file.keys() == from_folder.keys()
        for key, tensor in from_folder.items():
            assert torch.equal(from_file[key], tensor), (file, key)


def test_check_compares_the_refiners_components(
    refiner_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["sdxl", "--from", str(refiner_folder), "--to", str(tmp_path / "out"), "--check"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "max abs difference" in line]
    assert [line.split(":")[0] for line in lines] == ["clip-text", "autoencoder", "unet"]
    for line in lines:
        match = re.search(r"\(([^ ]+) of the output's scale", line)
        assert match is not None and line.endswith(": ok") and float(match.group(1)) <= 1e-5, line


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "toy-sdxl"
    build_pipeline().save_pretrained(folder)
    return folder


def test_an_lcm_unet_published_alone_converts_with_its_guidance_embedding(
    base_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # latent-consistency/lcm-sdxl is a UNet folder: `--unet` puts it in place of the base's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        unet = UNet2DConditionModel(**UNET_CONFIG, time_cond_proj_dim=8).eval()
    unet.save_pretrained(tmp_path / "lcm-unet")
    out = tmp_path / "out"
    command = ["sdxl", "--from", str(base_folder), "--unet", str(tmp_path / "lcm-unet"), "--to", str(out), "--check"]
    assert main(command) == 0
    checks = [line for line in capsys.readouterr().err.splitlines() if "max abs difference" in line]
    assert len(checks) == 3 and all(line.endswith(": ok") for line in checks), checks
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(out / "unet.safetensors"))
    assert config is not None and config.arguments["guidance_embedding_dim"] == 8
    model = StableDiffusion_XL.from_folder(out, solver=LCMSolver(4))
    kwargs: dict[str, Any] = {"num_inference_steps": 4, "guidance_scale": 8.0, "height": 64, "width": 48}
    latents = model.generate_latents("a cute cat", seed=2, progress=False, **kwargs)
    components: dict[str, Any] = {**StableDiffusionXLPipeline.from_pretrained(base_folder).components, "unet": unet}
    pipeline = StableDiffusionXLPipeline(**components)
    pipeline.scheduler = LCMScheduler.from_config(SCHEDULER_CONFIG)  # pyright: ignore[reportAttributeAccessIssue]
    with torch.no_grad():
        output: Any = pipeline("a cute cat", generator=torch.Generator().manual_seed(2), output_type="latent", **kwargs)
    expected = output.images
    torch.testing.assert_close(latents, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def test_a_unet_file_published_alone_replaces_the_bases(base_folder: Path, tmp_path: Path) -> None:
    # SDXL-Lightning's sdxl_lightning_4step_unet.safetensors: a UNet state dict in diffusers' keys, the base's config.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    save_to_safetensors(tmp_path / "unet.safetensors", unet.state_dict())
    out = tmp_path / "out"
    command = ["sdxl", "--from", str(base_folder), "--unet", str(tmp_path / "unet.safetensors"), "--to", str(out)]
    assert main([*command, "--check"]) == 0
    assert main(["sdxl", "--from", str(base_folder), "--to", str(tmp_path / "base")]) == 0
    converted, base = (load_from_safetensors(folder / "unet.safetensors") for folder in (out, tmp_path / "base"))
    assert converted.keys() == base.keys() and any(not torch.equal(converted[k], base[k]) for k in base)
    for name in ("clip_text.safetensors", "autoencoder.safetensors"):
        left, right = (load_from_safetensors(folder / name) for folder in (out, tmp_path / "base"))
        assert all(torch.equal(left[k], right[k]) for k in right)


def test_the_fp16_fix_vae_takes_the_bases_place(base_folder: Path, tmp_path: Path) -> None:
    # madebyollin/sdxl-vae-fp16-fix: SDXL's autoencoder architecture and scaling factor, other weights, no upcast.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from toy_sdxl import VAE_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        fp16_fix: dict[str, Any] = {**VAE_CONFIG, "force_upcast": False}
        vae: Any = AutoencoderKL(**fp16_fix).eval()
    vae.save_pretrained(tmp_path / "vae-fp16-fix")
    out = tmp_path / "out"
    command = ["sdxl", "--from", str(base_folder), "--vae", str(tmp_path / "vae-fp16-fix"), "--to", str(out)]
    assert main([*command, "--check"]) == 0
    sdxl = StableDiffusion_XL.from_folder(out)
    assert type(sdxl.lda).__name__ == "LatentDiffusionAutoencoder" and sdxl.lda.encoder_scale == 0.13025
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(latents / 0.13025).sample
        actual = sdxl.lda.decode(latents)
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
