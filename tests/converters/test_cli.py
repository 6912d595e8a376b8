"""`refiners-convert` on a Stable Diffusion 1.5 diffusers folder: the converted models compute what diffusers and
transformers compute.

The folder (conftest.py) has random weights in the real SD1.5 configs and the reference outputs on fixed inputs;
`refiners-convert sd1` converts it once for the session, then each component is loaded into our model (built on the
meta device, one full-size model at a time) and run on the same inputs. The component commands, `--dtype`,
`--check` (against the reference, and failing on a wrong key map), the console script and the CLI errors are
checked on the same folder.
"""

import gc
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

import refiners.converters.cli as cli
import refiners.converters.stable_diffusion as stable_diffusion
from refiners.converters.cli import main
from refiners.converters.engine import KeyMap
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTextEncoderL, CLIPTokenizer
from refiners.foundationals.latent_diffusion.auto_encoder import SD1Autoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet

# Relative to the output's scale: atol = RELATIVE_ATOL * max |reference|.
RELATIVE_ATOL = 1e-4


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


@pytest.fixture(scope="module")
def converted(sd15_converted: Path) -> Path:
    """`refiners-convert sd1` of the diffusers folder (a session fixture of conftest.py, shared by the workers)."""
    return sd15_converted


def assert_same_tensors(actual: Path, expected: Path, cast: torch.dtype | None = None) -> None:
    with safe_open(str(actual), framework="pt") as a, safe_open(str(expected), framework="pt") as e:
        keys: list[str] = e.keys()
        assert sorted(a.keys()) == sorted(keys)
        for key in keys:
            reference = e.get_tensor(key)
            assert torch.equal(a.get_tensor(key), reference.to(cast) if cast is not None else reference), key


def test_sd1_writes_the_three_files(converted: Path) -> None:
    assert sorted(path.name for path in converted.iterdir()) == [
        "autoencoder.safetensors",
        "clip_text.safetensors",
        "unet.safetensors",
    ]


def test_clip_text_encodes_text_as_transformers(
    sd15_folder: Path, sd15_expected: dict[str, Tensor], sd15_prompt: str, converted: Path
) -> None:
    # The tokenizer comes from the file's metadata: the encoder takes the prompt's text.
    encoder = CLIPTextEncoderL(device="meta").load_from_safetensors(converted / "clip_text.safetensors")
    tokenizer = encoder.tokenizer
    assert tokenizer is not None
    vocabulary, merges = sd15_folder / "tokenizer" / "vocab.json", sd15_folder / "tokenizer" / "merges.txt"
    assert load_metadata_from_safetensors(converted / "clip_text.safetensors") == (
        CLIPTokenizer(vocabulary, merges).to_metadata() | ModelConfig.of(CLIPTextEncoderL).to_metadata()
    )
    assert torch.equal(tokenizer(sd15_prompt), sd15_expected["prompt_ids"])
    with torch.no_grad():
        assert_matches(encoder(sd15_prompt), sd15_expected["text_output"])


def test_autoencoder_matches_diffusers(sd15_expected: dict[str, Tensor], converted: Path) -> None:
    autoencoder = SD1Autoencoder(device="meta").load_from_safetensors(converted / "autoencoder.safetensors")
    with torch.no_grad():
        assert_matches(autoencoder(sd15_expected["image"]), sd15_expected["reconstruction"])


def test_unet_matches_diffusers(sd15_expected: dict[str, Tensor], converted: Path) -> None:
    unet = SD1UNet(in_channels=4, device="meta").load_from_safetensors(converted / "unet.safetensors")
    unet.set_timestep(sd15_expected["timesteps"])
    unet.set_clip_text_embedding(sd15_expected["text_embedding"])
    with torch.no_grad():
        assert_matches(unet(sd15_expected["latents"]), sd15_expected["noise"])
    del unet
    gc.collect()


def test_component_commands_and_check(
    sd15_folder: Path, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # From the model's folder and from a component's own folder, each checked against the reference. (The unet
    # command and its check run in test_sd1_sources.py, on an inpainting UNet.)
    for command, source, name in [
        ("clip-text", sd15_folder, "clip_text.safetensors"),
        ("autoencoder", sd15_folder / "vae", "autoencoder.safetensors"),
    ]:
        dest = tmp_path / name
        assert main([command, "--from", str(source), "--to", str(dest), "--check"]) == 0
        out, err = capsys.readouterr()
        assert out.strip() == str(dest)
        assert_same_tensors(dest, converted / name)
        (check,) = [line for line in err.splitlines() if "max abs difference" in line]
        assert check.startswith(f"{command}: max abs difference") and check.endswith("ok")
        dest.unlink()


def test_dtype_casts_the_weights(sd15_folder: Path, converted: Path, tmp_path: Path) -> None:
    for command, name, dtype in [("clip-text", "clip_text", "float16"), ("autoencoder", "autoencoder", "bfloat16")]:
        dest = tmp_path / f"{name}.safetensors"
        assert main([command, "--from", str(sd15_folder), "--to", str(dest), "--dtype", dtype]) == 0
        assert_same_tensors(dest, converted / f"{name}.safetensors", cast=getattr(torch, dtype))


def test_check_fails_on_a_wrong_key_map(
    sd15_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Swapping the two LayerNorms of one layer keeps every shape: only the outputs can tell.
    def swapped(encoder: CLIPTextEncoder, source_prefix: str = "text_model.") -> KeyMap:
        key_map = original(encoder, source_prefix)
        first, second = (f"{source_prefix}encoder.layers.3.layer_norm{n}.weight" for n in (1, 2))
        key_map.mapping[first], key_map.mapping[second] = key_map.mapping[second], key_map.mapping[first]
        return key_map

    original = stable_diffusion.transformers_clip_text_key_map
    monkeypatch.setattr(stable_diffusion, "transformers_clip_text_key_map", swapped)
    dest = tmp_path / "clip_text.safetensors"
    assert main(["clip-text", "--from", str(sd15_folder), "--to", str(dest), "--check"]) == 1
    assert "FAILED, the converted model does not compute what the reference computes" in capsys.readouterr().err


def test_check_needs_the_reference_extra(
    sd15_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "missing_reference_packages", lambda: ["diffusers"])
    dest = tmp_path / "vae.safetensors"
    assert main(["autoencoder", "--from", str(sd15_folder), "--to", str(dest), "--check"]) == 1
    assert 'install the reference extra (pip install "refiners-converters[reference]")' in capsys.readouterr().err
    assert not dest.exists()


def test_console_script(sd15_folder: Path, converted: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "refiners-convert"
    dest = tmp_path / "clip_text.safetensors"
    result = subprocess.run(
        [str(script), "clip-text", "--from", str(sd15_folder), "--to", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(dest)
    assert "clip-text: wrote 196 tensors" in result.stderr
    assert_same_tensors(dest, converted / "clip_text.safetensors")


def test_errors_are_reported(sd15_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(sd15_folder / "model_index.json", incomplete)
    shutil.copytree(sd15_folder / "tokenizer", incomplete / "tokenizer")
    assert main(["sd1", "--from", str(incomplete), "--to", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("refiners-convert: error: ") and "has no unet/ folder" in err
    assert not (tmp_path / "out").exists()

    assert main(["unet", "--from", str(tmp_path / "nowhere"), "--to", str(tmp_path / "unet.safetensors")]) == 1
    assert "no such file or folder" in capsys.readouterr().err

    assert main(["unet", "--from", str(sd15_folder), "--to", str(tmp_path / "unet.bin")]) == 1
    assert "the destination must be a .safetensors file" in capsys.readouterr().err

    with pytest.raises(SystemExit) as usage:
        main(["unet", "--from", str(sd15_folder), "--to", "x.safetensors", "--dtype", "float64"])
    assert usage.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_loaded_state_dicts_equal_the_files(converted: Path) -> None:
    # The files hold exactly the models' state dicts (no stray tensors, all of them).
    for name, model in [
        ("clip_text", CLIPTextEncoderL(device="meta")),
        ("autoencoder", SD1Autoencoder(device="meta")),
        ("unet", SD1UNet(device="meta")),
    ]:
        tensors = load_from_safetensors(converted / f"{name}.safetensors")
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in model.state_dict().items()}
        del tensors
