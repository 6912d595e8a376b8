"""`refiners-convert sdxl` on a diffusers SDXL folder, then `StableDiffusion_XL.from_folder`: the same images as
diffusers' pipeline from the same folder."""

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from toy_sdxl import SCHEDULER_CONFIG, build_pipeline, build_refiner_pipeline, write_sgm_checkpoint

from refiners.converters.cli import main
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors
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


def test_the_readme_sdxl_blocks_run(
    sdxl_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's SDXL section word for word, on the toy: converted as `sdxl/`, a kohya LoRA as `sdxl_lora.safetensors`,
    the toy refiner as `sdxl-refiner/`."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("## Stable Diffusion XL")
    section = readme[start : readme.index("\n## ", start)]
    commands = re.findall(r"^uv run (refiners-convert sdxl .*?)\s+#", section, flags=re.MULTILINE)
    assert commands == ["refiners-convert sdxl --from path/to/stable-diffusion-xl-base-1.0 --to sdxl/"]
    (tmp_path / "path/to").mkdir(parents=True)
    (tmp_path / "path/to/stable-diffusion-xl-base-1.0").symlink_to(sdxl_folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert main(commands[0].split()[1:]) == 0
    to_q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    generator = torch.Generator().manual_seed(0)
    lora = {f"{to_q}.lora_down.weight": torch.randn(4, 48, generator=generator)}
    lora[f"{to_q}.lora_up.weight"] = torch.randn(48, 4, generator=generator)
    save_to_safetensors(tmp_path / "sdxl_lora.safetensors", lora)
    refiner = tmp_path / "toy-refiner"
    build_refiner_pipeline(build_pipeline()).save_pretrained(refiner)
    assert main(["sdxl", "--from", str(refiner), "--to", "sdxl-refiner/"]) == 0
    namespace: dict[str, Any] = {"__name__": "readme"}
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 3
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md, SDXL block {index}", "exec"), namespace)
    from PIL import Image

    assert Image.open(tmp_path / "sdxl_cat.png").size == (64, 64)  # the toy's native size
    assert Image.open(tmp_path / "sdxl_cat_by_hand.png").size == (64, 64)
    assert Image.open(tmp_path / "sdxl_lion.png").size == (64, 64)


# -- single files (SGM layout) ---------------------------------------------------------------------------------------


def test_a_single_file_converts_as_its_folder(sdxl_folder: Path, tmp_path: Path) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    path = tmp_path / "toy-sdxl.safetensors"
    write_sgm_checkpoint(sdxl_folder, path)
    # The file is what diffusers' own reader reads as this model: its tensors come back.
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl_folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, actual = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        for key, tensor in expected.items():
            torch.testing.assert_close(actual[key], tensor, atol=0, rtol=0, msg=f"{name}.{key}")
    # Ours reads it as the folder it came from: the same files, bit for bit.
    assert main(["sdxl", "--from", str(path), "--config", str(sdxl_folder), "--to", str(tmp_path / "from-file")]) == 0
    assert main(["sdxl", "--from", str(sdxl_folder), "--to", str(tmp_path / "from-folder")]) == 0
    for file in ("clip_text.safetensors", "autoencoder.safetensors", "unet.safetensors"):
        from refiners.fluxion.utils import load_from_safetensors

        from_file, from_folder = (load_from_safetensors(tmp_path / d / file) for d in ("from-file", "from-folder"))
        assert from_file.keys() == from_folder.keys()
        for key, tensor in from_folder.items():
            assert torch.equal(from_file[key], tensor), (file, key)


def test_check_compares_every_component(sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["sdxl", "--from", str(sdxl_folder), "--to", str(tmp_path / "out"), "--check"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "max abs difference" in line]
    assert [line.split(":")[0] for line in lines] == ["clip-text", "autoencoder", "unet"]
    for line in lines:
        match = re.search(r"\(([^ ]+) of the output's scale", line)
        assert match is not None and line.endswith(": ok") and float(match.group(1)) <= 1e-5, line
