"""The handwritten digits model the repository ships (`models/digits`, trained from scratch with `refiners-train`),
judged by a classifier that never saw its training images (`examples/digits_data.py`): each digit's prompt gives that
digit, unconditional samples cover all ten, the configs that made it still run, and a LoRA trained with
`refiners-train` (configs/digits-lora.yaml) learns a new phrase without making the model forget the digits."""

import sys
from pathlib import Path

import pytest
import torch

from refiners.adapters.lora import SDLoraManager
from refiners.fluxion.utils import load_from_safetensors
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import StableDiffusion_1
from refiners.training.cli import LoraTrainingCLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from digits_data import Judge, digit_accuracies, generate, make_digits_folder  # noqa: E402

DIGITS = ROOT / "models" / "digits"
STEPS, GUIDANCE = 20, 3.0
"""The sampler of the figures: the model's default solver (DPM-Solver++), 20 steps, classifier-free guidance 3."""


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge()


@pytest.fixture(scope="module")
def sd() -> StableDiffusion_1:
    return StableDiffusion_1.from_folder(DIGITS)


def test_the_judge_is_accurate(judge: Judge) -> None:
    # Trained on the held-out third, measured on the two thirds the generator was trained on.
    assert judge.accuracy >= 0.97


def test_each_digit_prompt_gives_that_digit(sd: StableDiffusion_1, judge: Judge) -> None:
    accuracies = digit_accuracies(sd, judge, images_per_digit=20, seed=0, steps=STEPS, guidance_scale=GUIDANCE)
    assert sum(accuracies) / 10 >= 0.8, accuracies


def test_unconditional_samples_cover_every_digit(sd: StableDiffusion_1, judge: Judge) -> None:
    labels = judge.classify(generate(sd, [""], 100, seed=1, steps=STEPS, guidance_scale=1.0))
    assert set(labels) == set(range(10)), [labels.count(digit) for digit in range(10)]


def test_the_model_loads_in_one_call_and_draws_at_its_native_size(sd: StableDiffusion_1) -> None:
    assert sd.default_size == 64 and sd.clip_text_encoder.tokenizer is not None
    [image] = sd.generate("a handwritten digit three", num_inference_steps=4, seed=0, progress=False)
    assert image.size == (64, 64)


def test_the_configs_that_made_it_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands of configs/digits-autoencoder.yaml, in order, a few steps each: the folder they end with loads."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "models").symlink_to(ROOT / "models")
    make_digits_folder("outputs/digits/data", digits=(0, 7))  # `python examples/digits_data.py outputs/digits/data`
    monkeypatch.setattr(sys, "argv", ["refiners-train"])
    short = ["--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.callbacks", "[]"]
    LoraTrainingCLI(args=["fit", "--config", "configs/digits-autoencoder.yaml", *short, "--data.batch_size", "4"])
    LoraTrainingCLI(args=["fit", "--config", "configs/digits-unet.yaml", *short, "--data.batch_size", "4"])
    sd = StableDiffusion_1.from_folder(tmp_path / "outputs" / "digits" / "model")
    assert sd.default_size == 64
    with torch.no_grad():
        assert sd.lda.encoder_scale != 1.0  # measured on the data


def test_a_lora_learns_a_new_phrase_and_forgets_nothing(
    sd: StableDiffusion_1, judge: Judge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/digits-lora.yaml's commands as shown: sevens captioned "a lucky number", 100 steps of LoRA."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "models").symlink_to(ROOT / "models")
    make_digits_folder("outputs/digits/lucky", digits=(7,), phrase="a lucky number")
    monkeypatch.setattr(sys, "argv", ["refiners-train"])
    LoraTrainingCLI(args=["fit", "--config", "configs/digits-lora.yaml"])

    lucky = "a lucky number"
    before = judge.classify(generate(sd, [lucky], 50, seed=2, steps=STEPS, guidance_scale=GUIDANCE))
    plain = generate(sd, ["a handwritten digit three"], 4, seed=3, steps=STEPS, guidance_scale=GUIDANCE)
    manager = SDLoraManager(sd)
    manager.add_loras("lucky", load_from_safetensors(tmp_path / "outputs" / "digits" / "lora" / "lora.safetensors"))
    after = judge.classify(generate(sd, [lucky], 50, seed=2, steps=STEPS, guidance_scale=GUIDANCE))
    accuracies = digit_accuracies(sd, judge, images_per_digit=20, seed=0, steps=STEPS, guidance_scale=GUIDANCE)
    manager.remove_loras("lucky")
    assert before.count(7) / 50 <= 0.3, [before.count(digit) for digit in range(10)]  # near chance: 10%
    assert after.count(7) / 50 >= 0.8, [after.count(digit) for digit in range(10)]
    assert sum(accuracies) / 10 >= 0.7, accuracies  # the ten digits' prompts still work
    # Ejected, the base model's images come back exactly.
    assert torch.equal(
        plain, generate(sd, ["a handwritten digit three"], 4, seed=3, steps=STEPS, guidance_scale=GUIDANCE)
    )
