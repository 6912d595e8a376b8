"""`pip install refiners-foundationals[sd]` is enough to run the seed README's Hello World on converted weights.

The two wheels (refiners-foundationals and the refiners-fluxion it pins) go into a fresh venv that holds only their
declared dependencies, as `tests/test_workspace.py::test_fluxion_alone` does for fluxion alone. There, with neither
diffusers, transformers, refiners-adapters nor refiners-converters importable, the Hello World's Step 3 (minus its
LoRA line: LoRAs belong to refiners-adapters) runs on toy Stable Diffusion 1 weights written here with
`save_to_safetensors`, the tokenizer in the text encoder's metadata as `refiners-convert` stores it. Its final
latents must equal, bit for bit, those of the same script run by the workspace's sources in this process.
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from refiners.fluxion.utils import load_from_safetensors, manual_seed, save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTokenizer
from refiners.foundationals.clip.tokenizer import bytes_to_unicode
from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet

ROOT = Path(__file__).resolve().parents[1]
# What `pip install refiners-foundationals[sd]` must not bring along: the test references and the sibling packages.
ABSENT = ("diffusers", "transformers", "peft", "refiners.adapters", "refiners.converters", "refiners.training")
PROMPT_WORDS = ("a", "cute", "cat")

# The toy SD1 components, built the same way here and in the venv. Everything under `if __name__ == "__main__"` is
# the seed README's Step 3, minus `SD1LoraAdapter...inject()`, with 3 steps on 8x8 latents instead of 30 on 64x64.
HELLO_WORLD = """
import sys
from pathlib import Path

import torch

from refiners.fluxion.utils import load_from_safetensors, manual_seed, save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoder
from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet, StableDiffusion_1


def toy_components(device: str = "meta") -> dict[str, torch.nn.Module]:
    return {
        "unet": SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=32, device=device),
        "lda": LatentDiffusionAutoencoder(0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1, device=device),
        "clip_text_encoder": CLIPTextEncoder(
            embedding_dim=32, vocabulary_size=VOCABULARY_SIZE, num_layers=1, num_attention_heads=4, feedforward_dim=64,
            device=device,
        ),
    }


def hello_world(weights: Path, image_path: Path) -> torch.Tensor:
    # One thread on both sides: the same reductions in the same order, so the latents compare exactly.
    torch.set_num_threads(1)
    sd15 = StableDiffusion_1(**toy_components(), device="meta")
    sd15.clip_text_encoder.load_from_safetensors(weights / "clip.safetensors")
    sd15.lda.load_from_safetensors(weights / "lda.safetensors")
    sd15.unet.load_from_safetensors(weights / "unet.safetensors")

    prompt = "a cute cat"

    with torch.no_grad():
        clip_text_embedding = sd15.compute_clip_text_embedding(prompt)

    sd15.set_num_inference_steps(3)

    manual_seed(2)
    x = torch.randn(1, 4, 8, 8, device=sd15.device)

    with torch.no_grad():
        for step in sd15.steps:
            x = sd15(
                x,
                step=step,
                clip_text_embedding=clip_text_embedding,
                condition_scale=7.5,
            )
        predicted_image = sd15.lda.decode_latents(x)
        predicted_image.save(image_path)
    return x


if __name__ == "__main__":
    import importlib.util

    import refiners.fluxion
    import refiners.foundationals

    # The wheels, not the workspace sources; and nothing that [sd] does not declare.
    for package in (refiners.fluxion, refiners.foundationals):
        assert Path(package.__file__).is_relative_to(Path(sys.prefix)), package.__file__
    for name in ABSENT:
        assert importlib.util.find_spec(name) is None, f"{name} is importable"

    weights, out = Path(sys.argv[1]), Path(sys.argv[2])
    latents = hello_world(weights, out / "cute_cat.png")
    save_to_safetensors(out / "latents.safetensors", {"latents": latents})
    print("hello world: ok")
"""


def _hello_world_source(vocabulary_size: int) -> str:
    return f"ABSENT = {ABSENT!r}\nVOCABULARY_SIZE = {vocabulary_size}\n" + textwrap.dedent(HELLO_WORLD)


def _toy_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 512 byte symbols, merges that spell the prompt's words, and the special tokens."""
    symbols = list(bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in PROMPT_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        prefix = pieces[0]
        for _, piece in pairwise(pieces):
            if (prefix, piece) not in merges:
                merges.append((prefix, piece))
            prefix += piece
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge) for merge in merges)]
    tokens = [*dict.fromkeys(tokens), "<|startoftext|>", "<|endoftext|>"]
    return {token: id for id, token in enumerate(tokens)}, merges


def _write_toy_weights(folder: Path, toy_components: Callable[[str], dict[str, torch.nn.Module]]) -> None:
    """Random toy weights, one file per component, named as the Hello World's Step 1 names them."""
    manual_seed(0)
    components = toy_components("cpu")
    for module in components.values():
        # Away from identity norms and zero-initialized outputs, so that every weight shows in the latents.
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    unet, lda, encoder = components["unet"], components["lda"], components["clip_text_encoder"]
    assert isinstance(unet, SD1UNet) and isinstance(lda, LatentDiffusionAutoencoder)
    assert isinstance(encoder, CLIPTextEncoder)
    save_to_safetensors(folder / "unet.safetensors", unet.state_dict())
    save_to_safetensors(folder / "lda.safetensors", lda.state_dict())
    save_to_safetensors(
        folder / "clip.safetensors",
        encoder.state_dict(),
        metadata=CLIPTokenizer.from_vocabulary(*_toy_vocabulary()).to_metadata(),
    )


# `_run` and `_checked` are copies of tests/test_workspace.py's (test files are not importable modules here).
def _run(command: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if command[0] == "uv":
        uv = os.environ.get("UV") or shutil.which("uv")
        assert uv is not None, "uv is needed to build and install the wheels: `python3 -m pip install uv`"
        command = [uv, *command[1:]]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_foundationals_sd_runs_the_hello_world(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    dist = tmp_path / "dist"
    for package in ("refiners-fluxion", "refiners-foundationals"):
        _checked(_run(["uv", "build", "--package", package, "--wheel", "-o", str(dist)], env))
    wheels = sorted(dist.glob("refiners_*.whl"))
    assert [wheel.name.split("-")[0] for wheel in wheels] == ["refiners_fluxion", "refiners_foundationals"]

    # refiners-foundationals[sd]'s dependencies as the lock pins them (fluxion's included), into a new venv.
    venv = tmp_path / "venv"
    sync = ["uv", "sync", "--frozen", "--package", "refiners-foundationals", "--extra", "sd", "--no-dev"]
    sync += ["--no-install-workspace", "--python", sys.executable]
    venv_env = env | {"UV_PROJECT_ENVIRONMENT": str(venv)}
    if _run([*sync, "--offline"], venv_env).returncode != 0:
        _checked(_run(sync, venv_env))
    python = venv / "bin" / "python"
    _checked(_run(["uv", "pip", "install", "--python", str(python), "--offline", "--no-deps", *map(str, wheels)], env))
    # The wheels' Requires-Dist are met by what is installed: nothing beyond [sd] was needed.
    _checked(_run(["uv", "pip", "check", "--python", str(python)], env))
    listed = _checked(_run(["uv", "pip", "list", "--python", str(python), "--format", "json"], env))
    installed = {package["name"] for package in json.loads(listed.stdout)}
    assert {name for name in installed if name.startswith("refiners")} == {"refiners-fluxion", "refiners-foundationals"}
    assert installed.isdisjoint({"diffusers", "transformers", "peft"})

    # The Hello World's code, run here by the workspace's sources for the expected latents.
    script = tmp_path / "hello_world.py"
    script.write_text(_hello_world_source(vocabulary_size=len(_toy_vocabulary()[0])))
    hello = runpy.run_path(str(script), run_name="hello_world")
    weights = tmp_path / "weights"
    weights.mkdir()
    _write_toy_weights(weights, cast(Callable[[str], dict[str, torch.nn.Module]], hello["toy_components"]))
    threads = torch.get_num_threads()
    try:
        expected = cast(Callable[[Path, Path], Tensor], hello["hello_world"])(weights, tmp_path / "expected.png")
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "out"
    out.mkdir()
    # -I: no current directory or user site on sys.path, no PYTHON* variables.
    result = _checked(_run([str(python), "-I", str(script), str(weights), str(out)], env, cwd=tmp_path))
    assert result.stdout.strip() == "hello world: ok"
    assert (out / "cute_cat.png").is_file()
    latents = load_from_safetensors(out / "latents.safetensors")["latents"]
    assert expected.abs().max() > 0
    torch.testing.assert_close(latents, expected, atol=0, rtol=0)
