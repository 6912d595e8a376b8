"""Full training (`FullFineTuning`) and autoencoder training (`AutoencoderTraining`): only what the task trains gets
gradients, the exported folder loads in one call with the same weights, and `refiners-train` resumes exactly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import StableDiffusion_1
from refiners.training import AutoencoderTraining, FullFineTuning, TrainingBatch, TrainingSetupError
from refiners.training.cli import LoraTrainingCLI
from refiners.training.sample_data import SampleImageFolder

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "models" / "clip-tokenizer"


def _batch() -> TrainingBatch:
    generator = torch.Generator().manual_seed(0)
    return TrainingBatch(images=torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1, captions=["a red circle", ""])


def test_full_fine_tuning_trains_the_unet_and_text_encoder_only() -> None:
    module = FullFineTuning(base="tiny", train_text_encoder=True)
    module.training_step(_batch(), 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.unet.parameters())
    assert all(p.grad is not None for p in module.clip_text_encoder.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in module.lda.parameters())
    # Checkpoints hold what trains, and nothing of the frozen autoencoder.
    assert {key.split(".")[1] for key in module.state_dict()} == {"unet", "text_encoder"}
    assert module.sample_size == 4  # 32 px images, x8 autoencoder


def test_without_the_text_encoder_only_the_unet_trains() -> None:
    module = FullFineTuning(base="tiny")
    module.training_step(_batch(), 0).backward()
    assert [group["name"] for group in module.parameter_groups()] == ["unet"]
    assert all(p.grad is None for p in module.clip_text_encoder.parameters())


def test_the_exported_folder_loads_in_one_call_with_the_same_weights(tmp_path: Path) -> None:
    module = FullFineTuning(base="digits", tokenizer=str(TOKENIZER), train_text_encoder=True, seed=3)
    module.sample_size = 8
    for name, (tensors, metadata) in module.model_files().items():
        save_to_safetensors(tmp_path / name, tensors, metadata)
    sd = StableDiffusion_1.from_folder(tmp_path)
    assert sd.default_size == 64  # the training latents' 8 x the autoencoder's 8
    for ours, theirs in (
        (sd.unet, module.unet),
        (sd.lda, module.lda),
        (sd.clip_text_encoder, module.clip_text_encoder),
    ):
        expected = theirs.state_dict()
        assert all(torch.equal(tensor, expected[key]) for key, tensor in ours.state_dict().items())
    prompt = "a handwritten digit seven"
    assert torch.equal(sd.clip_text_encoder([prompt]), module.clip_text_encoder([prompt]))


def test_a_random_base_over_clips_vocabulary_needs_the_tokenizer() -> None:
    with pytest.raises(TrainingSetupError, match="tokenizer"):
        FullFineTuning(base="digits")


def test_autoencoder_training_trains_the_autoencoder_and_measures_its_scale() -> None:
    module = AutoencoderTraining(base="tiny", reconstruction="mse")
    loss = module.training_step(_batch(), 0)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    images = [torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1]
    scale = module.encoder_scale(images)
    with torch.no_grad():
        expected = 1 / module.lda.encoder(images[0]).std().item()
    assert scale == pytest.approx(expected, rel=1e-6)
    config = ModelConfig.from_metadata(module.model_files(scale)["autoencoder.safetensors"][1])
    assert config is not None and config.arguments["encoder_scale"] == scale


def _fit(folder: SampleImageFolder, root: Path, *arguments: str) -> None:
    options = [
        "fit", "--task", "full-fine-tuning", "--seed_everything", "0",
        "--model.base", "tiny", "--model.train_text_encoder", "true", "--model.learning_rate", "1e-3",
        "--data.data_dir", str(folder.path), "--data.resolution", "32", "--data.batch_size", "2",
        "--data.caption_dropout", "0.2", "--data.random_flip", "false",
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "4", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(root / "checkpoints"),
        "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.save_top_k", "-1",
        "--export.dirpath", str(root / "model"),
    ]  # fmt: skip
    LoraTrainingCLI(args=[*options, *arguments])


def test_refiners_train_full_fine_tuning_resumes_exactly(metadata_folder: SampleImageFolder, tmp_path: Path) -> None:
    _fit(metadata_folder, tmp_path / "whole")
    checkpoint = next((tmp_path / "whole" / "checkpoints").glob("*step=2.ckpt"))
    _fit(metadata_folder, tmp_path / "resumed", "--ckpt_path", str(checkpoint))
    for name in ("unet.safetensors", "clip_text.safetensors", "autoencoder.safetensors"):
        whole, resumed = (
            load_file(tmp_path / "whole" / "model" / name),
            load_file(tmp_path / "resumed" / "model" / name),
        )
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), name
    # The run trained: the exported UNet is not the initial one.
    initial = FullFineTuning(base="tiny").unet.state_dict()
    trained = load_file(tmp_path / "whole" / "model" / "unet.safetensors")
    assert any(not torch.equal(trained[key], initial[key]) for key in trained)
    metadata = load_metadata_from_safetensors(tmp_path / "whole" / "model" / "unet.safetensors")
    assert metadata["refiners.unet.sample_size"] == "4"
    assert (tmp_path / "whole" / "model" / "step=000002" / "unet.safetensors").is_file()
