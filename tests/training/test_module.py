"""LoRA fine-tuning on Lightning: what trains, the loss against diffusers' training script, exact resume, and the
exported LoRA loaded by refiners (`SD1LoraAdapter`) and by diffusers (`load_lora_weights`, PEFT and kohya files).

Everything runs on the tiny random-weight Stable Diffusion of `LoraFineTuning(base="tiny")`, with 64x64 images.
The references (diffusers' UNet, transformers' CLIP text model) are built from the same weights with the converters'
key maps.
"""

import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.optim import Optimizer
from transformers import CLIPTextConfig, CLIPTextModel

import refiners.fluxion.layers as fl
import refiners.training.callbacks
import refiners.training.cli
import refiners.training.errors
import refiners.training.module
import refiners.training.progress
from refiners.adapters.lora import SD1LoraAdapter, parse_lora_file
from refiners.converters.clip_text import transformers_clip_text_key_map
from refiners.converters.engine import KeyMap
from refiners.converters.unet import diffusers_unet_key_map
from refiners.fluxion.adapters.lora import lora_parameters
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoder
from refiners.foundationals.latent_diffusion import SD1UNet, StableDiffusion_1
from refiners.training import (
    CaptionedImageDataModule,
    ExportLora,
    LoraFineTuning,
    LoraTargets,
    PredictionType,
    SampleImages,
    StableDiffusionComponents,
    build_components,
)
from refiners.training.callbacks import METADATA_KEY
from refiners.training.data import CaptionedImageDataset
from refiners.training.module import AUTOENCODER_FILE, CLIP_TEXT_FILE, UNET_FILE, GradientCheckpointing
from refiners.training.sample_data import SampleImageFolder

# Latents of 8x8: at 4x4, a level of the tiny UNet attends over a single token, where queries and keys get no gradient.
RESOLUTION = 64
STEPS = 24  # 4 epochs of 24 images in batches of 4
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
# A module of the tiny model whose LoRAs train the text encoder too, on the presets' middle ground.
SETTINGS: dict[str, Any] = {
    "base": "tiny",
    "targets": "transformer",
    "rank": 4,
    "alpha": 2.0,
    "train_text_encoder": True,
    "learning_rate": 1e-2,
    "text_encoder_learning_rate": 5e-3,
    "min_snr_gamma": 5.0,
}


def _settings(**overrides: Any) -> dict[str, Any]:
    return SETTINGS | overrides


def _trainer(root: Path, max_steps: int, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(default_root_dir=root, max_steps=max_steps, callbacks=callbacks, **(options | kwargs))


def _data(folder: SampleImageFolder, **kwargs: Any) -> CaptionedImageDataModule:
    return CaptionedImageDataModule(
        folder.path, resolution=RESOLUTION, batch_size=4, random_flip=False, cache_latents=True, **kwargs
    )


def _lora_state(module: LoraFineTuning) -> dict[str, Tensor]:
    return {key: tensor.detach().clone() for key, tensor in module.state_dict().items()}


def _base_weights(components: StableDiffusionComponents, module: LoraFineTuning) -> dict[str, Tensor]:
    """Every weight of the frozen models, LoRAs left out (found by identity)."""
    lora_weights = {id(parameter) for parameter in module.parameters()}
    return {
        f"{component}.{key}": tensor.detach().clone()
        for component, model in components.items()
        for key, tensor in model.state_dict(keep_vars=True).items()
        if id(tensor) not in lora_weights
    }


# -- references --------------------------------------------------------------------------------------------------


def _from_refiners(key_map: KeyMap, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A reference model's state dict from ours: the converters' key map, read backwards."""
    return {source: state_dict[target] for source, target in key_map.mapping.items()}


def diffusers_unet(components: StableDiffusionComponents) -> UNet2DConditionModel:
    """diffusers' UNet with SD1's block layout at the tiny model's sizes, holding the tiny UNet's weights."""
    unet = UNet2DConditionModel(
        sample_size=4, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4
    )
    unet.load_state_dict(_from_refiners(diffusers_unet_key_map(components.unet), components.unet.state_dict()))
    return unet.eval()


def transformers_text_encoder(components: StableDiffusionComponents) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    encoder = CLIPTextModel(config)
    prefix = "text_model." if any(key.startswith("text_model.") for key in encoder.state_dict()) else ""
    assert isinstance(components.clip_text_encoder, CLIPTextEncoder)
    key_map = transformers_clip_text_key_map(components.clip_text_encoder, source_prefix=prefix)
    encoder.load_state_dict(_from_refiners(key_map, components.clip_text_encoder.state_dict()))
    return encoder.eval()


def diffusers_pipeline(components: StableDiffusionComponents) -> StableDiffusionPipeline:
    # diffusers annotates these sequences as one-element tuples.
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),  # pyright: ignore[reportArgumentType]
        down_block_types=("DownEncoderBlock2D",) * 4,  # pyright: ignore[reportArgumentType]
        up_block_types=("UpDecoderBlock2D",) * 4,  # pyright: ignore[reportArgumentType]
        layers_per_block=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=transformers_text_encoder(components),
        tokenizer=None,  # pyright: ignore[reportArgumentType] (only the models are compared)
        unet=diffusers_unet(components),
        scheduler=DDPMScheduler(),  # pyright: ignore[reportArgumentType]
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )


@dataclass
class Probe:
    """Inputs at which to compare UNets and text encoders: 8x8 latents (at 4x4, the lowest resolution of the tiny
    UNet would hold 1x1 maps, whose GroupNorms amplify rounding)."""

    latents: Tensor
    timesteps: Tensor
    text_embedding: Tensor
    token_ids: Tensor


@pytest.fixture(scope="module")
def probe() -> Probe:
    generator = torch.Generator().manual_seed(7)
    return Probe(
        latents=torch.randn(2, 4, 8, 8, generator=generator),
        timesteps=torch.tensor([20, 700]),
        text_embedding=torch.randn(2, 77, 32, generator=generator),
        token_ids=torch.randint(0, 512, (2, 77), generator=generator),
    )


def sd1(components: StableDiffusionComponents) -> StableDiffusion_1:
    """The SD1 pipeline over the components (the tests' base is SD1's `tiny`)."""
    unet, encoder = components.unet, components.clip_text_encoder
    assert isinstance(unet, SD1UNet) and isinstance(encoder, CLIPTextEncoder)
    return StableDiffusion_1(unet=unet, lda=components.lda, clip_text_encoder=encoder)


def _outputs(unet: fl.Chain, text_encoder: fl.Chain, probe: Probe) -> tuple[Tensor, Tensor]:
    assert isinstance(unet, SD1UNet)
    with torch.no_grad():
        unet.set_timestep(probe.timesteps)
        unet.set_clip_text_embedding(probe.text_embedding)
        return unet(probe.latents), text_encoder(probe.token_ids)


def _reference_outputs(pipeline: StableDiffusionPipeline, probe: Probe) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        noise = pipeline.unet(probe.latents, probe.timesteps, probe.text_embedding).sample
        return noise, pipeline.text_encoder(probe.token_ids).last_hidden_state


def _close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


# -- a training run, shared --------------------------------------------------------------------------------------


class GradientRecorder(Callback):
    """The weights that have a gradient when the optimizer steps: all of them, frozen ones included."""

    def __init__(self) -> None:
        self.with_gradient: set[int] = set()
        self.with_nonzero_gradient: set[int] = set()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        assert isinstance(pl_module, LoraFineTuning)
        for _, model in pl_module.components.items():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    self.with_gradient.add(id(parameter))
                    if parameter.grad.abs().sum() > 0:
                        self.with_nonzero_gradient.add(id(parameter))


@dataclass
class Run:
    module: LoraFineTuning
    initial_loras: dict[str, Tensor]
    base_before: dict[str, Tensor]
    loss_before: float
    loss_after: float
    gradients: GradientRecorder
    export: ExportLora
    samples: SampleImages
    log_dir: Path


def _evaluation_loss(module: LoraFineTuning, folder: SampleImageFolder) -> float:
    """The loss on 8 images at fixed noise and timesteps (the same draws before and after training)."""
    dataset = CaptionedImageDataset(folder.path, resolution=RESOLUTION)
    latents = module.encode_images(torch.stack([dataset.image(index) for index in range(8)]))
    captions = [dataset.caption(index) for index in range(8)]
    generator = torch.Generator().manual_seed(123)
    draws = [module.draw(latents, generator) for _ in range(4)]
    with torch.no_grad():
        text_embeddings = module.clip_text_encoder(captions)
        return sum(module.loss(latents, text_embeddings, noise, steps).item() for noise, steps in draws) / len(draws)


@pytest.fixture(scope="module")
def run(metadata_folder: SampleImageFolder, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("run")
    module = LoraFineTuning(**SETTINGS)
    initial_loras = _lora_state(module)
    base_before = _base_weights(module.components, module)
    loss_before = _evaluation_loss(module, metadata_folder)
    gradients = GradientRecorder()
    export = ExportLora(formats=["refiners", "peft", "kohya"])
    samples = SampleImages(PROMPTS, seeds=[0, 1], every_n_steps=12, at_start=True, num_inference_steps=4)
    logger = TensorBoardLogger(root, name="logs")
    trainer = _trainer(root, STEPS, [gradients, export, samples], logger=logger)
    trainer.fit(module, _data(metadata_folder))
    return Run(
        module=module,
        initial_loras=initial_loras,
        base_before=base_before,
        loss_before=loss_before,
        loss_after=_evaluation_loss(module, metadata_folder),
        gradients=gradients,
        export=export,
        samples=samples,
        log_dir=Path(logger.log_dir),
    )


# -- what trains -------------------------------------------------------------------------------------------------


def test_loss_decreases(run: Run) -> None:
    assert run.loss_after < 0.85 * run.loss_before, (run.loss_before, run.loss_after)


def test_only_lora_parameters_receive_gradients(run: Run) -> None:
    module = run.module
    lora_weights = {id(parameter) for lora in module.named_loras().values() for parameter in lora.parameters()}
    assert {id(parameter) for parameter in module.parameters()} == lora_weights
    # The same LoRAs as fluxion finds by type.
    found = [*lora_parameters(module.unet), *lora_parameters(module.clip_text_encoder)]
    assert {id(parameter) for parameter in found} == lora_weights
    assert any(name.startswith("text_encoder.") for name in module.named_loras())
    assert run.gradients.with_gradient == lora_weights
    assert run.gradients.with_nonzero_gradient == lora_weights
    for _, model in module.components.items():
        for parameter in model.parameters():
            assert parameter.requires_grad == (id(parameter) in lora_weights)


def test_base_weights_are_bit_identical_after_training(run: Run) -> None:
    after = _base_weights(run.module.components, run.module)
    assert after.keys() == run.base_before.keys()
    for key, tensor in run.base_before.items():
        assert torch.equal(after[key], tensor), key
    changed = [
        key for key, tensor in _lora_state(run.module).items() if not torch.equal(tensor, run.initial_loras[key])
    ]
    assert len(changed) == len(run.initial_loras)


# -- the loss, against diffusers' training script ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_unet() -> UNet2DConditionModel:
    return diffusers_unet(build_components("tiny", seed=0))


@pytest.mark.parametrize(
    ("prediction_type", "min_snr_gamma"), [("epsilon", None), ("epsilon", 5.0), ("v_prediction", 5.0)]
)
def test_loss_matches_diffusers_training_script(
    reference_unet: UNet2DConditionModel, prediction_type: PredictionType, min_snr_gamma: float | None
) -> None:
    module = LoraFineTuning(base="tiny", prediction_type=prediction_type, min_snr_gamma=min_snr_gamma)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    text_embeddings = torch.randn(4, 77, 32, generator=generator)
    noise, steps = module.draw(latents, generator)
    with torch.no_grad():
        loss = module.loss(latents, text_embeddings, noise, steps)

    # diffusers' examples/text_to_image/train_text_to_image_lora.py, with SD1.5's scheduler.
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )
    timesteps = cast(torch.IntTensor, module.solver.timesteps[steps])
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    with torch.no_grad():
        model_pred = reference_unet(noisy_latents, timesteps, text_embeddings).sample
    if min_snr_gamma is None:
        expected = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, min_snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        per_sample = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="none")
        expected = (per_sample.mean(dim=[1, 2, 3]) * weights).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5 * expected.item(), rtol=0)


def test_draws_respect_the_timestep_range_and_offset_noise() -> None:
    module = LoraFineTuning(base="tiny", min_timestep=100, max_timestep=199, offset_noise=0.1)
    latents = torch.zeros(64, 4, 4, 4)
    noise, steps = module.draw(latents, torch.Generator().manual_seed(3))
    timesteps = module.solver.timesteps[steps]
    assert timesteps.min() >= 100 and timesteps.max() <= 199 and len(timesteps.unique()) > 30
    # The offset is one value per sample and channel, drawn after the noise.
    generator = torch.Generator().manual_seed(3)
    plain = torch.randn(latents.shape, generator=generator)
    offset = 0.1 * torch.randn((64, 4, 1, 1), generator=generator)
    torch.testing.assert_close(noise, plain + offset, atol=0, rtol=0)
    again, same_steps = module.draw(latents, torch.Generator().manual_seed(3))
    assert torch.equal(again, noise) and torch.equal(same_steps, steps)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain = LoraFineTuning(base="tiny", targets="all", rank=2)
    checkpointed = LoraFineTuning(base="tiny", targets="all", rank=2, gradient_checkpointing=True)
    assert len(list(checkpointed.unet.layers(GradientCheckpointing))) == 12 + 1 + 12
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text_embeddings = torch.randn(2, 77, 32, generator=generator)
    noise, steps = plain.draw(latents, generator)
    for module in (plain, checkpointed):
        with torch.no_grad():  # a non-zero `up`, so that every LoRA weight gets a gradient
            for parameter in module.parameters():
                generator = torch.Generator().manual_seed(parameter.numel())
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        module.loss(latents, text_embeddings, noise, steps).backward()
    for (name, expected), actual in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert expected.grad is not None and actual.grad is not None
        torch.testing.assert_close(
            actual.grad, expected.grad, atol=1e-6 * expected.grad.abs().max().item(), rtol=0, msg=name
        )


def test_bf16_mixed_precision_trains_float32_loras(metadata_folder: SampleImageFolder, tmp_path: Path) -> None:
    module = LoraFineTuning(base="tiny", rank=4, learning_rate=1e-2)
    initial = _lora_state(module)
    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(
            self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            losses.append(float(outputs["loss"]))

    _trainer(tmp_path, 3, [Losses()], precision="bf16-mixed").fit(module, _data(metadata_folder))
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    assert all(parameter.dtype == torch.float32 for parameter in module.parameters())
    assert all(not torch.equal(tensor, initial[key]) for key, tensor in _lora_state(module).items())


# -- checkpoints and resume --------------------------------------------------------------------------------------


class StopAtStep(Callback):
    """Ends the fit after `step` optimizer steps, as an interruption would (the checkpoint callbacks still run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _resumable_run(
    folder: SampleImageFolder, root: Path, stop_at: int | None = None, ckpt_path: Path | None = None
) -> tuple[LoraFineTuning, ExportLora]:
    # Gradient accumulation and clipping, warmup then cosine decay, EMA: all of it must come back from a checkpoint.
    module = LoraFineTuning(**_settings(warmup_steps=2, lr_schedule="cosine", offset_noise=0.05))
    export = ExportLora(dirpath=str(root / "loras"), formats=["refiners"])
    callbacks: list[Callback] = [
        EMAWeightAveraging(decay=0.9),
        # Saved at every optimizer step, as LoRA trainings do (every N steps), mid-epoch or at an epoch's end.
        ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1, save_last=True),
        export,
    ]
    if stop_at is not None:
        callbacks.append(StopAtStep(stop_at))
    # 24 images in batches of 4, 2 batches per step: 3 steps per epoch.
    trainer = _trainer(root, 6, callbacks, accumulate_grad_batches=2, gradient_clip_val=0.5, enable_checkpointing=True)
    trainer.fit(module, _data(folder, caption_dropout=0.2), ckpt_path=ckpt_path)
    return module, export


@pytest.fixture(scope="module")
def uninterrupted(
    metadata_folder: SampleImageFolder, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LoraFineTuning, Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    module, _ = _resumable_run(metadata_folder, root)
    return module, root


# 3 steps per epoch: interrupted in the middle of the first epoch, at its end, in the middle of the second.
@pytest.mark.parametrize("stop_at", [2, 3, 4])
def test_resumed_training_ends_with_the_same_lora(
    metadata_folder: SampleImageFolder, uninterrupted: tuple[LoraFineTuning, Path], tmp_path: Path, stop_at: int
) -> None:
    expected, expected_root = uninterrupted
    # Interrupted, then resumed by new objects, as a new process would. Mid-epoch, the data loader (a stateful
    # `ResumableDataLoader`) skips the batches that were served before the checkpoint.
    _resumable_run(metadata_folder, tmp_path, stop_at=stop_at)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == stop_at
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": (stop_at - 1) // 3, "batches": 2 * ((stop_at - 1) % 3 + 1)}
    ]
    resumed, export = _resumable_run(metadata_folder, tmp_path, ckpt_path=checkpoint)

    assert resumed.global_step == 6
    expected_state, resumed_state = _lora_state(expected), _lora_state(resumed)
    assert expected_state.keys() == resumed_state.keys()
    for key, tensor in expected_state.items():
        torch.testing.assert_close(resumed_state[key], tensor, atol=0, rtol=0, msg=key)
    # The raw (not averaged) weights and the optimizer's state, as saved at the end of both runs.
    expected_checkpoint = torch.load(expected_root / "checkpoints" / "last.ckpt", weights_only=True)
    resumed_checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for key, tensor in expected_checkpoint["current_model_state"].items():
        torch.testing.assert_close(resumed_checkpoint["current_model_state"][key], tensor, atol=0, rtol=0, msg=key)
    expected_moments = expected_checkpoint["optimizer_states"][0]["state"]
    for index, state in resumed_checkpoint["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(state["exp_avg"], expected_moments[index]["exp_avg"], atol=0, rtol=0)
    assert export.paths(tmp_path / "loras")["refiners"].is_file()


def test_checkpoint_holds_the_loras_and_their_average_only(uninterrupted: tuple[LoraFineTuning, Path]) -> None:
    module, root = uninterrupted
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    lora_keys = set(module.state_dict())
    assert all(key.startswith("loras.") for key in lora_keys)
    assert set(checkpoint["state_dict"]) == lora_keys
    assert set(checkpoint["current_model_state"]) == lora_keys
    assert set(checkpoint["averaging_state"]) == {"n_averaged"}
    # The averaged LoRAs (EMAWeightAveraging's) differ from the trained ones, and the LoRA exported at that checkpoint
    # is the average.
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[key], current[key]) for key in lora_keys)
    exported = load_from_safetensors(root / "loras" / "lora-step=000006.safetensors")
    for name, lora in module.named_loras().items():
        prefix = f"loras.{name.replace('.', '/')}"
        diffusers_name = module.diffusers_names[name]
        for role, layer in (("lora_down", lora.down), ("lora_up", lora.up)):
            average = averaged[f"{prefix}.{lora.key_of(layer)}.weight"]
            torch.testing.assert_close(exported[f"{diffusers_name}.{role}.weight"], average, atol=0, rtol=0)


# -- the exported LoRA -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_components() -> StableDiffusionComponents:
    """The base model of the run, built anew (the same seed gives the same weights), without LoRAs."""
    return build_components("tiny", seed=0)


def test_exported_lora_loads_with_sd1_lora_adapter(
    run: Run, fresh_components: StableDiffusionComponents, probe: Probe
) -> None:
    path = run.export.paths(run.log_dir / "loras")["refiners"]
    components = build_components("tiny", seed=0)
    sd = sd1(components)
    SD1LoraAdapter.from_safetensors(target=sd, checkpoint_path=path).inject()
    unet_output, text_output = _outputs(sd.unet, sd.clip_text_encoder, probe)
    expected_unet, expected_text = _outputs(run.module.unet, run.module.clip_text_encoder, probe)
    base_unet, _ = _outputs(fresh_components.unet, fresh_components.clip_text_encoder, probe)
    assert (expected_unet - base_unet).abs().max() > 1e-2  # the LoRA changes the outputs
    _close(unet_output, expected_unet)
    _close(text_output, expected_text)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_exported_lora_loads_in_diffusers(
    run: Run, fresh_components: StableDiffusionComponents, probe: Probe, layout: str
) -> None:
    pipeline = diffusers_pipeline(fresh_components)
    base_unet, base_text = _reference_outputs(pipeline, probe)
    pipeline.load_lora_weights(str(run.export.paths(run.log_dir / "loras")[layout]))  # pyright: ignore[reportArgumentType]
    unet_output, text_output = _reference_outputs(pipeline, probe)
    expected_unet, expected_text = _outputs(run.module.unet, run.module.clip_text_encoder, probe)
    assert (expected_unet - base_unet).abs().max() > 1e-2 and (expected_text - base_text).abs().max() > 1e-2
    _close(unet_output, expected_unet)
    _close(text_output, expected_text)


def test_exported_files_carry_the_training_settings(run: Run) -> None:
    folder = run.log_dir / "loras"
    final = run.export.paths(folder)
    assert all(path.is_file() for path in final.values())
    assert not list(folder.glob(".*.tmp"))  # written atomically: no temporary file left
    for layout, path in final.items():
        settings = json.loads(load_metadata_from_safetensors(path)[METADATA_KEY])
        assert settings["global_step"] == STEPS and settings["rank"] == 4 and settings["alpha"] == 2.0, layout
        assert settings["targets"] == "transformer" and settings["train_text_encoder"] is True
        assert settings["resolution"] == RESOLUTION
    kohya = load_metadata_from_safetensors(final["kohya"])
    assert kohya["ss_network_module"] == "networks.lora" and kohya["ss_steps"] == str(STEPS)
    parsed = parse_lora_file(final["refiners"])
    assert len(parsed.specs) == len(run.module.named_loras()) and not parsed.unused


# -- samples -----------------------------------------------------------------------------------------------------


def test_samples_are_saved_as_grids_and_logged(run: Run, fresh_components: StableDiffusionComponents) -> None:
    folder = run.log_dir / "samples"
    paths = sorted(folder.glob("step=*.png"))
    assert [path.name for path in paths] == ["step=000000.png", "step=000012.png", "step=000024.png"]
    grids = [Image.open(path).convert("RGB") for path in paths]
    assert all(grid.size == (2 * RESOLUTION, 2 * RESOLUTION) for grid in grids)
    # At step 0 the LoRAs are zero: the grid is the base model's images, at the same seeds.
    base = sd1(fresh_components)
    first = base.generate(
        PROMPTS[0], num_inference_steps=4, height=RESOLUTION, width=RESOLUTION, seed=0, progress=False
    )[0]
    assert first.tobytes() == grids[0].crop((0, 0, RESOLUTION, RESOLUTION)).tobytes()
    assert grids[0].tobytes() != grids[-1].tobytes()  # and the LoRA changes them
    events = EventAccumulator(str(run.log_dir))
    events.Reload()
    assert [event.step for event in events.Images("samples")] == [0, 12, 24]


class ImageLogger(Logger):
    """A logger with `log_image(key, images, step, **kwargs)`, the method of Lightning's WandbLogger (and Neptune's)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, list[Any], int | None, dict[str, Any]]] = []

    @property
    def name(self) -> str:
        return "images"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self.images.append((key, images, step, kwargs))


def test_samples_go_to_loggers_with_log_image(tmp_path: Path) -> None:
    # As with W&B installed and `WandbLogger` in the config: the grid goes to its `log_image`, with the prompts.
    logger = ImageLogger()
    samples = SampleImages(PROMPTS, seeds=[0, 1], num_inference_steps=2, size=RESOLUTION, dirpath=str(tmp_path))
    trainer = _trainer(tmp_path, 1, [samples], logger=logger)
    module = LoraFineTuning(**_settings())
    module.trainer = trainer
    path = samples.sample(trainer, module)
    assert path is not None and path.is_file()
    ((key, images, step, extra),) = logger.images
    assert key == "samples" and step == 0 and extra["caption"] == [" | ".join(PROMPTS) + " (seeds 0, 1)"]
    assert images[0].tobytes() == Image.open(path).convert("RGB").tobytes()


# -- loading the base model, and errors --------------------------------------------------------------------------


def _converted_folder(components: StableDiffusionComponents, folder: Path) -> Path:
    """The tiny model written as `refiners-convert sd1` writes SD1.5 (the tokenizer in the text encoder's metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_to_safetensors(folder / UNET_FILE, components.unet.state_dict())
    save_to_safetensors(folder / AUTOENCODER_FILE, components.lda.state_dict())
    tokenizer = components.clip_text_encoder.tokenizer
    assert tokenizer is not None
    save_to_safetensors(folder / CLIP_TEXT_FILE, components.clip_text_encoder.state_dict(), tokenizer.to_metadata())
    return folder


def test_weights_folder_is_loaded_into_meta_models(fresh_components: StableDiffusionComponents, tmp_path: Path) -> None:
    folder = _converted_folder(fresh_components, tmp_path / "weights")
    module = LoraFineTuning(base="tiny", weights=str(folder), seed=1)  # another seed: the weights come from the files
    lora_weights = {id(parameter) for parameter in module.parameters()}
    expected = dict(fresh_components.items())
    for component, model in module.components.items():
        loaded = [t for t in model.state_dict(keep_vars=True).values() if id(t) not in lora_weights]
        reference = list(expected[component].state_dict().values())
        assert len(loaded) == len(reference)
        for tensor, value in zip(loaded, reference, strict=True):
            assert tensor.device.type == "cpu" and torch.equal(tensor, value)
    assert module.clip_text_encoder(["a red circle"]).shape == (1, 77, 32)


def test_weights_folder_errors(fresh_components: StableDiffusionComponents, tmp_path: Path) -> None:
    folder = _converted_folder(fresh_components, tmp_path / "weights")
    (folder / AUTOENCODER_FILE).unlink()
    with pytest.raises(ValueError, match=r"lacks autoencoder\.safetensors .*refiners-convert sd1"):
        LoraFineTuning(base="tiny", weights=str(folder))
    with pytest.raises(ValueError, match=r"is not a folder"):
        LoraFineTuning(base="tiny", weights=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"base='sd15' needs weights"):
        LoraFineTuning(base="sd15")
    save_to_safetensors(folder / AUTOENCODER_FILE, fresh_components.lda.state_dict())
    save_to_safetensors(folder / CLIP_TEXT_FILE, fresh_components.clip_text_encoder.state_dict())
    with pytest.raises(ValueError, match=r"carries no tokenizer"):
        LoraFineTuning(base="tiny", weights=str(folder))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"targets": "attn"}, r"targets must be one of 'attention', 'transformer', 'all', got 'attn'"),
        ({"rank": 0}, r"rank must be a positive integer, got 0"),
        ({"alpha": -1.0}, r"alpha must be positive"),
        ({"learning_rate": 0.0}, r"learning_rate must be positive"),
        ({"prediction_type": "sample"}, r"prediction_type must be one of 'epsilon', 'v_prediction'"),
        ({"min_snr_gamma": 0.0}, r"min_snr_gamma must be positive"),
        ({"offset_noise": -0.1}, r"offset_noise must be 0 \(off\) or positive"),
        ({"min_timestep": 500, "max_timestep": 100}, r"need 0 <= min_timestep <= max_timestep <= 999"),
        ({"max_timestep": 1000}, r"need 0 <= min_timestep <= max_timestep <= 999"),
        ({"warmup_steps": -1}, r"warmup_steps must be 0"),
        ({"lr_schedule": "step"}, r"lr_schedule must be one of"),
    ],
)
def test_bad_arguments_fail_before_building(arguments: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"base": "tiny", **arguments}
    with pytest.raises(ValueError, match=message):
        LoraFineTuning(**options)


def test_cached_text_embeddings_refuse_a_trained_text_encoder(
    metadata_folder: SampleImageFolder, tmp_path: Path
) -> None:
    module = LoraFineTuning(base="tiny", train_text_encoder=True)
    data = _data(metadata_folder, cache_text_embeddings=True)
    with pytest.raises(ValueError, match=r"cannot be cached: set cache_text_embeddings=False"):
        _trainer(tmp_path, 1, []).fit(module, data)


def test_decaying_schedule_needs_an_end(metadata_folder: SampleImageFolder, tmp_path: Path) -> None:
    module = LoraFineTuning(base="tiny", lr_schedule="linear")
    with pytest.raises(ValueError, match=r"set trainer.max_steps or trainer.max_epochs"):
        _trainer(tmp_path, -1, [], max_epochs=-1).fit(module, _data(metadata_folder))


# -- docstring examples ------------------------------------------------------------------------------------------

EXAMPLES = [
    (f"{module.__name__}.{name}", block)
    for module in (
        refiners.training.module,
        refiners.training.callbacks,
        refiners.training.errors,
        refiners.training.progress,
        refiners.training.cli,
    )
    for name in module.__all__
    for block in re.findall(r"```py\n(.*?)\s*```", inspect.getdoc(getattr(module, name)) or "", flags=re.DOTALL)
]


def test_there_are_examples() -> None:
    assert {name.rsplit(".", 1)[-1] for name, _ in EXAMPLES} >= {
        "LoraFineTuning",
        "ExportLora",
        "Setting",
        "TrainingSetupError",
        "progress_line",
        "usage_error",
    }


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_docstring_example(name: str, code: str) -> None:
    exec(compile(textwrap.dedent(code), f"<example of {name}>", "exec"), {"__name__": "example"})


# -- presets, against diffusers' and kohya's choices --------------------------------------------------------------


def _reference_targets(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, targets: str) -> set[str]:
    """The modules that diffusers' LoRA script (attention) or kohya's sd-scripts (transformer: `networks.lora`'s
    `Transformer2DModel`, `CLIPAttention` and `CLIPMLP`; all: plus LoCon's `ResnetBlock2D`, `Downsample2D`,
    `Upsample2D`) put LoRAs on, by their names in diffusers' pipeline."""
    if targets == "attention":
        unet_names = {n for n, _ in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
        text_names = {
            n for n, _ in text_encoder.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))
        }
    else:
        containers = (
            ("Transformer2DModel",)
            if targets == "transformer"
            else ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
        )
        unet_names = {
            f"{name}.{child}" if child else name
            for name, module in unet.named_modules()
            if type(module).__name__ in containers
            for child, layer in module.named_modules()
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d)
        }
        text_names = {
            f"{name}.{child}"
            for name, module in text_encoder.named_modules()
            if type(module).__name__ in ("CLIPAttention", "CLIPMLP")
            for child, layer in module.named_modules()
            if isinstance(layer, torch.nn.Linear)
        }
    text_names = {f"text_model.{n}" if not n.startswith("text_model.") else n for n in text_names}
    return {f"unet.{n}" for n in unet_names} | {f"text_encoder.{n}" for n in text_names}


@pytest.mark.parametrize("targets", ["attention", "transformer", "all"])
def test_presets_target_what_diffusers_and_kohya_target(
    fresh_components: StableDiffusionComponents, targets: LoraTargets
) -> None:
    module = LoraFineTuning(base="tiny", targets=targets, rank=2, train_text_encoder=True)
    expected = _reference_targets(
        diffusers_unet(fresh_components), transformers_text_encoder(fresh_components), targets
    )
    assert set(module.diffusers_names.values()) == expected
