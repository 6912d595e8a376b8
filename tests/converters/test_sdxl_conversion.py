"""`refiners-convert sdxl` on a diffusers SDXL folder, then `StableDiffusion_XL.from_folder`: the same images as
diffusers' pipeline from the same folder."""

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from toy_sdxl import SCHEDULER_CONFIG, build_pipeline

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
    """The README's SDXL section word for word, on the toy: converted as `sdxl/`, a kohya LoRA as `sdxl_lora.safetensors`."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Stable Diffusion XL") : readme.index("## Import paths")]
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
    namespace: dict[str, Any] = {"__name__": "readme"}
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md, SDXL block {index}", "exec"), namespace)
    from PIL import Image

    assert Image.open(tmp_path / "sdxl_cat.png").size == (64, 64)  # the toy's native size
    assert Image.open(tmp_path / "sdxl_cat_by_hand.png").size == (64, 64)


# -- single files (SGM layout) ---------------------------------------------------------------------------------------


def _sgm_checkpoint(folder: Path, path: Path) -> None:
    """Write the diffusers folder's model as an SGM single file, as Stability's checkpoints lay it out."""
    from refiners.converters.single_file import SGM_PREFIXES, ldm_autoencoder_renaming
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import SDXLUNet
    from refiners.foundationals.latent_diffusion.unet_names import unet_renaming

    def component(name: str, file: str) -> dict[str, torch.Tensor]:
        from refiners.fluxion.utils import load_from_safetensors

        return load_from_safetensors(folder / name / file)

    tensors: dict[str, torch.Tensor] = {}
    unet_renaming_ = unet_renaming(TINY.unet.build((SDXLUNet,), device="meta"))
    for key, tensor in component("unet", "diffusion_pytorch_model.safetensors").items():
        original = unet_renaming_.to_original(key)
        assert original is not None, key
        tensors[SGM_PREFIXES["unet"] + original] = tensor
    vae_renaming = ldm_autoencoder_renaming(4, 1)
    for key, tensor in component("vae", "diffusion_pytorch_model.safetensors").items():
        original = vae_renaming.to_original(key)
        assert original is not None, key
        module = key.rpartition(".")[0]
        as_conv = module in vae_renaming.conv_as_linear and key.endswith(".weight")
        tensors[SGM_PREFIXES["vae"] + original] = tensor[:, :, None, None] if as_conv else tensor
    for key, tensor in component("text_encoder", "model.safetensors").items():
        # transformers 5 saves a CLIPTextModel without its `text_model.` wrapper; SGM files have it.
        tensors[SGM_PREFIXES["text_encoder"] + "text_model." + key.removeprefix("text_model.")] = tensor
    g, prefix = component("text_encoder_2", "model.safetensors"), SGM_PREFIXES["text_encoder_2"]
    for key, tensor in g.items():
        name = key.removeprefix("text_model.")
        if name.startswith("encoder.layers."):
            index, _, rest = name.removeprefix("encoder.layers.").partition(".")
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rpartition(".")[2]
                parts = [g[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                tensors[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
            elif rest.startswith("self_attn.out_proj."):
                tensors[f"{block}attn.out_proj.{rest.rpartition('.')[2]}"] = tensor
            elif not rest.startswith("self_attn."):
                names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
                module, _, parameter = rest.rpartition(".")
                tensors[f"{block}{names[module]}.{parameter}"] = tensor
        elif name == "embeddings.token_embedding.weight":
            tensors[f"{prefix}token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            tensors[f"{prefix}positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            tensors[f"{prefix}ln_final.{name.rpartition('.')[2]}"] = tensor
        elif name == "text_projection.weight":
            tensors[f"{prefix}text_projection"] = tensor.t().contiguous()
        else:
            assert name == "embeddings.position_ids", name
    tensors[f"{prefix}logit_scale"] = torch.tensor(4.6052)
    save_to_safetensors(path, tensors)


def test_a_single_file_converts_as_its_folder(sdxl_folder: Path, tmp_path: Path) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    path = tmp_path / "toy-sdxl.safetensors"
    _sgm_checkpoint(sdxl_folder, path)
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
