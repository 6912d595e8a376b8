"""`refiners-convert sdxl` on a diffusers SDXL folder, then `StableDiffusion_XL.from_folder`: the same images as
diffusers' pipeline from the same folder."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from toy_sdxl import SCHEDULER_CONFIG, build_pipeline

from refiners.converters.cli import main
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.latent_diffusion import DDIM
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl") / "toy-sdxl"
    pipeline = build_pipeline()
    pipeline.scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)  # pyright: ignore[reportAttributeAccessIssue]
    pipeline.save_pretrained(folder)
    return folder


def test_convert_then_from_folder_generates_as_diffusers(
    sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "converted"
    assert main(["sdxl", "--from", str(sdxl_folder), "--to", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [
        str(out / n) for n in ("clip_text.safetensors", "autoencoder.safetensors", "unet.safetensors")
    ]
    assert "left out CLIP-L's last layer and final norm" in captured.err
    assert f"load it with StableDiffusion_XL.from_folder({str(out)!r})" in captured.err
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(out / "unet.safetensors"))
    assert config is not None and config.class_name == "SDXLUNet" and config.arguments["channels"] == (32, 64, 64)

    model = StableDiffusion_XL.from_folder(out, solver=DDIM(num_inference_steps=3, params=SDXL_SOLVER_PARAMS))
    assert model.default_size == 64  # the toy UNet's sample_size (8) times 8
    images = model.generate(
        "a cute cat", negative_prompt="blurry", num_inference_steps=3, height=64, width=48, seed=3, progress=False
    )

    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    with torch.no_grad():
        expected = reference(
            "a cute cat",
            negative_prompt="blurry",
            num_inference_steps=3,
            height=64,
            width=48,
            generator=torch.Generator().manual_seed(3),
        ).images[0]  # pyright: ignore[reportAttributeAccessIssue]
    difference = np.abs(np.asarray(images[0], dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1


def test_an_sd1_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from refiners.converters.toy import save_toy_stable_diffusion_1

    folder = save_toy_stable_diffusion_1(tmp_path / "sd1")
    capsys.readouterr()  # diffusers' own output while saving
    assert main(["sdxl", "--from", str(folder), "--to", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"refiners-convert: error: .* is not a Stable Diffusion XL model: it has no text_encoder_2/ \(OpenCLIP-G\)\. For Stable Diffusion 1\.x, use refiners-convert sd1\.",
        message,
    )


def test_from_folder_names_the_command_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"create it (and the other files) with `refiners-convert sdxl --from SOURCE --to {tmp_path}`"),
    ):
        StableDiffusion_XL.from_folder(tmp_path)
