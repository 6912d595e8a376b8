"""Textual inversion against diffusers' `load_textual_inversion`, on the prompt embedding (SD1 and SDXL toys)."""

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from safetensors.torch import save_file
from torch import Tensor
from toy_sd1 import ours, reference, save_toy_sd1
from toy_sdxl import WIDTH_G, WIDTH_L, build_pipeline, our_text_encoder

from refiners.adapters.textual_inversion import TextualInversion
from refiners.foundationals.clip import CLIPTextEncoder

TOKEN = "<cat-toy>"
PROMPT = f"a photo of {TOKEN} on a table, {TOKEN}"


def assert_equal_within_scale(actual: Tensor, expected: Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=0)


def write(path: Path, file_format: str, embedding: Tensor) -> Path:
    """`embedding` saved as a user's file of `file_format` would hold it."""
    match file_format:
        case "a1111.pt":
            torch.save({"string_to_param": {"*": embedding}, "name": "cat-toy", "step": 100}, path / "a.pt")
            return path / "a.pt"
        case "a1111.safetensors":
            save_file({"emb_params": embedding}, path / "a.safetensors")
            return path / "a.safetensors"
        case _:
            torch.save({TOKEN: embedding}, path / "learned_embeds.bin")
            return path / "learned_embeds.bin"


@pytest.fixture(scope="module")
def sd1_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_toy_sd1(tmp_path_factory.mktemp("textual-inversion"))


@pytest.mark.parametrize("vectors", [1, 3])
@pytest.mark.parametrize("file_format", ["a1111.pt", "a1111.safetensors", "diffusers"])
def test_sd1_matches_diffusers(sd1_folders: tuple[Path, Path], tmp_path: Path, file_format: str, vectors: int) -> None:
    diffusers_folder, converted = sd1_folders
    pipeline: Any = reference(StableDiffusionPipeline, diffusers_folder)
    sd = ours(converted)
    encoder = sd.clip_text_encoder
    assert isinstance(encoder, CLIPTextEncoder)
    embedding = torch.randn(vectors, encoder.embedding_dim)
    path = write(tmp_path, file_format, embedding)
    token = None if file_format == "diffusers" else TOKEN
    pipeline.load_textual_inversion(str(path), token=token)
    with torch.no_grad():
        expected, _ = pipeline.encode_prompt(PROMPT, torch.device("cpu"), 1, False)
        inversion = TextualInversion.from_file(encoder, path, token=token)
        keys, before = list(encoder.state_dict()), encoder(PROMPT)
        modules = list(encoder.modules())
        inversion.inject()
        actual = encoder(PROMPT)
        inversion.eject()
        after = encoder(PROMPT)
    assert_equal_within_scale(actual, expected)
    assert (actual - before).abs().max() > 1e-2
    assert torch.equal(after, before) and list(encoder.state_dict()) == keys and list(encoder.modules()) == modules


def test_two_at_once_match_diffusers(sd1_folders: tuple[Path, Path], tmp_path: Path) -> None:
    """Two files, two words (one of three vectors) in one prompt, as diffusers' `load_textual_inversion` takes a
    list; ejecting the first leaves what diffusers computes with the second alone; either order restores exactly."""
    diffusers_folder, converted = sd1_folders
    encoder = ours(converted).clip_text_encoder
    assert isinstance(encoder, CLIPTextEncoder)
    paths = [tmp_path / "cat" / "learned_embeds.bin", tmp_path / "dog" / "learned_embeds.bin"]
    for path, token, vectors in zip(paths, [TOKEN, "<dog-toy>"], [3, 1], strict=True):
        path.parent.mkdir()
        torch.save({token: torch.randn(vectors, encoder.embedding_dim)}, path)
    prompt = f"a photo of {TOKEN} and <dog-toy> on a table, <dog-toy>"
    both: Any = reference(StableDiffusionPipeline, diffusers_folder)
    both.load_textual_inversion([str(path) for path in paths])
    second: Any = reference(StableDiffusionPipeline, diffusers_folder)
    second.load_textual_inversion(str(paths[1]))
    with torch.no_grad():
        expected, _ = both.encode_prompt(prompt, torch.device("cpu"), 1, False)
        expected_second, _ = second.encode_prompt(prompt, torch.device("cpu"), 1, False)
        keys, modules, before = list(encoder.state_dict()), list(encoder.modules()), encoder(prompt)
        inversions = [TextualInversion.from_file(encoder, path) for path in paths]
        for order in ([0, 1], [1, 0]):
            for inversion in inversions:
                inversion.inject()
            actual = encoder(prompt)
            assert_equal_within_scale(actual, expected)
            assert (actual - before).abs().max() > 1e-2
            inversions[order[0]].eject()
            if order[0] == 0:
                assert_equal_within_scale(encoder(prompt), expected_second)
            inversions[order[1]].eject()
            assert torch.equal(encoder(prompt), before)
            assert list(encoder.state_dict()) == keys and list(encoder.modules()) == modules


def test_sdxl_matches_diffusers(tmp_path: Path) -> None:
    pipeline: Any = build_pipeline()
    encoder = our_text_encoder(pipeline)
    clip_l, clip_g = torch.randn(2, WIDTH_L), torch.randn(2, WIDTH_G)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "sdxl.safetensors")
    # SDXL's real text_encoder_2 config has `eos_token_id=2`, so transformers pools at the argmax of the ids (an added
    # token, when there is one), as our `EndOfTextPooling` does; the toy's config names the real end token.
    pipeline.text_encoder_2.text_model.eos_token_id = 2
    # diffusers' documented way: one call per encoder.
    pipeline.load_textual_inversion(
        clip_l, token=TOKEN, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer
    )
    pipeline.load_textual_inversion(
        clip_g, token=TOKEN, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2
    )
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipeline.encode_prompt(
            PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False
        )
        inversion = TextualInversion.from_file(encoder, tmp_path / "sdxl.safetensors", token=TOKEN)
        before, before_pooled = encoder(PROMPT)
        keys = list(encoder.state_dict())
        inversion.inject()
        actual, pooled = encoder(PROMPT)
        inversion.eject()
        after, after_pooled = encoder(PROMPT)
    assert_equal_within_scale(actual, expected)
    assert_equal_within_scale(pooled, expected_pooled)
    assert (actual - before).abs().max() > 1e-2
    assert torch.equal(after, before) and torch.equal(after_pooled, before_pooled)
    assert list(encoder.state_dict()) == keys
    with pytest.raises(ValueError, match=f"is {WIDTH_L + 1} wide but the text encoders are .*{WIDTH_L}.*{WIDTH_G}"):
        TextualInversion(encoder, {TOKEN: torch.randn(1, WIDTH_L + 1)}, token=TOKEN)


def test_bad_input(sd1_folders: tuple[Path, Path], tmp_path: Path) -> None:
    encoder = ours(sd1_folders[1]).clip_text_encoder
    assert isinstance(encoder, CLIPTextEncoder)
    with pytest.raises(ValueError, match="already in the vocabulary"):
        TextualInversion(encoder, {"a": torch.randn(1, encoder.embedding_dim)}, token="a")
    with pytest.raises(ValueError, match="wide but the text encoders are"):
        TextualInversion(encoder, {TOKEN: torch.randn(1, encoder.embedding_dim + 1)}, token=TOKEN)
    TextualInversion(encoder, {TOKEN: torch.randn(1, encoder.embedding_dim)}, token=TOKEN).inject()
    with pytest.raises(ValueError, match="already has a textual inversion for '<cat-toy>'"):
        TextualInversion(encoder, {TOKEN: torch.randn(1, encoder.embedding_dim)}, token=TOKEN)
    save_file({"emb_params": torch.randn(1, 4), "other": torch.randn(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="unknown textual inversion keys"):
        TextualInversion.from_file(encoder, tmp_path / "x.safetensors", token=TOKEN)
    torch.save({"string_to_param": {"*": torch.randn(1, 4)}, "extra": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        TextualInversion.from_file(encoder, tmp_path / "x.pt", token=TOKEN)
    save_file({"clip_l": torch.randn(1, 4), "clip_g": torch.randn(1, 4)}, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="needs SDXL's two text encoders"):
        TextualInversion.from_file(encoder, tmp_path / "xl.safetensors", token=TOKEN)


def test_the_readme_block_runs(sd1_folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's textual inversion block word for word (3 steps), on the toy SD1 converted as `sd15/`."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("## Textual inversion")
    section = readme[start : readme.index("\n## ", start)]
    (block,) = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert "num_inference_steps=30" in block
    (tmp_path / "sd15").symlink_to(sd1_folders[1], target_is_directory=True)
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}}, tmp_path / "cat-toy.pt")
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("num_inference_steps=30", "num_inference_steps=3"), "README.md", "exec"), {})
    assert (tmp_path / "cat_toy.png").is_file()
