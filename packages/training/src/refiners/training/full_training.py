"""Full training of Stable Diffusion's models on Lightning: the UNet and text encoder (`FullFineTuning`), and the
autoencoder (`AutoencoderTraining`), from a converted folder or from scratch.

`FullFineTuning` is diffusers' `train_text_to_image.py` (full fine-tuning, not LoRA) on the loss, data, schedules,
callbacks and exact resume that `LoraFineTuning` has (both are `DenoisingTraining`s): the UNet trains, the text
encoder too with `train_text_encoder`, the autoencoder stays frozen. Without `weights`, a `random_bases` preset
(`digits`) starts from random weights: training from scratch, with an autoencoder trained before by
`AutoencoderTraining` (`autoencoder=...`).

`AutoencoderTraining` trains the KL autoencoder of Rombach et al. (2022) on images alone: the reconstruction (L1 or
MSE) of a latent drawn from the posterior, plus `kl_weight` times the KL divergence of the posterior to N(0, I). No
adversarial or perceptual term: enough for small images such as the digits, not for SD1.5's VAE.

Both write their models as `refiners-convert` does (`ExportModel`): `unet.safetensors`, `clip_text.safetensors` (with
its tokenizer) and `autoencoder.safetensors`, each recording its constructor call, so that
`StableDiffusion_1.from_folder` loads the result in one call. The autoencoder's `encoder_scale` is measured on the
training data at export: one over the standard deviation of the latents' means, as Stable Diffusion's 0.18215 was.
"""

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.weights import unet_metadata
from refiners.training.callbacks import averaged, output_folder
from refiners.training.data import TrainingBatch
from refiners.training.data_transforms import seeded_generator
from refiners.training.errors import Setting, TrainingSetupError
from refiners.training.families import AUTOENCODER_FILE, CLIP_TEXT_FILE, UNET_FILE, family_of
from refiners.training.module import (
    BaseModel,
    DenoisingTraining,
    LrSchedule,
    OptimizerFactory,
    PredictionType,
    build_components,
    scheduled,
)

__all__ = ["FullFineTuning", "AutoencoderTraining", "ExportModel", "ModelFiles"]

ModelFiles = dict[str, tuple[dict[str, Tensor], dict[str, str]]]
"""The files of a model, by name (`unet.safetensors`...): each its tensors and its metadata."""


def _configs(module: "DenoisingTraining | AutoencoderTraining") -> dict[str, dict[str, str]]:
    """The metadata that builds each component again (its `ModelConfig`), from the preset or the source files."""
    base, weights = module.base, module.weights
    family = module.family
    if weights is None:
        preset = family.presets[base]
        configs = {
            UNET_FILE: preset.unet.to_metadata(),
            AUTOENCODER_FILE: preset.lda.to_metadata(),
            CLIP_TEXT_FILE: preset.clip_text_encoder.to_metadata(),
        }
    else:
        configs = {name: _file_config(Path(weights) / name) for name in (UNET_FILE, AUTOENCODER_FILE, CLIP_TEXT_FILE)}
    autoencoder = getattr(module, "autoencoder", None)
    if autoencoder is not None:
        configs[AUTOENCODER_FILE] = _file_config(Path(autoencoder))
    return configs


def _file_config(path: Path) -> dict[str, str]:
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(path))
    if config is None:
        raise TrainingSetupError(
            f"{path} records no model configuration: convert it again with `refiners-convert`, which records it"
        )
    return config.to_metadata()


def _with_scale(metadata: Mapping[str, str], encoder_scale: float) -> dict[str, str]:
    """An autoencoder's metadata with another `encoder_scale`."""
    config = ModelConfig.from_metadata(metadata)
    assert config is not None, "the configs come from presets or files that record them"
    arguments = dict(config.arguments) | {"encoder_scale": encoder_scale}
    return ModelConfig(config.class_name, arguments).to_metadata()


class FullFineTuning(DenoisingTraining):
    """Full fine-tuning of a Stable Diffusion model's UNet (and text encoder), or its training from scratch.

    The loss, the data, the conditioning, the schedules and the draws are `LoraFineTuning`'s (see
    `DenoisingTraining`); here the UNet's own weights train, and the text encoder's with `train_text_encoder`
    (diffusers' `train_text_to_image.py` trains the UNet alone). The autoencoder is frozen. The module's parameters
    (and so checkpoints, DDP and EMA) are the trained models': a resumed run rebuilds the rest from the same
    `weights`, seed and `autoencoder`.

    Args:
        base: The architecture (see `BaseModel`): with `weights`, any; without, a family's `random_bases` (`tiny`,
            `digits`): training from scratch.
        weights: The folder of converted weights to start from (`refiners-convert sd1`); None for random weights.
        tokenizer: Without `weights`, the folder of the text encoder's tokenizer (`vocab.json`, `merges.txt`; CLIP's
            for `digits`: `models/clip-tokenizer` in the repository).
        autoencoder: An `autoencoder.safetensors` that replaces the base's autoencoder (e.g. `AutoencoderTraining`'s).
        train_text_encoder: Train the text encoder too.
        learning_rate: The UNet's learning rate.
        text_encoder_learning_rate: The text encoder's (default: `learning_rate`).
        optimizer: See `OptimizerFactory` (default: AdamW with its defaults).
        warmup_steps: Optimizer steps of linear warmup.
        lr_schedule: See `LrSchedule`.
        prediction_type: See `PredictionType`.
        min_snr_gamma: Min-SNR-gamma weighting of the loss (None: plain MSE).
        offset_noise: Offset noise (0 disables).
        min_timestep: The lowest timestep drawn.
        max_timestep: The highest timestep drawn.
        seed: Seeds the random weights and every draw of a step.

    Example:
        ```py
        import torch
        from refiners.training import FullFineTuning

        module = FullFineTuning(base="tiny", train_text_encoder=True)  # random weights: training from scratch
        assert {group["name"] for group in module.parameter_groups()} == {"unet", "text_encoder"}
        latents, text_embeddings = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
        noise, steps = module.draw(latents, torch.Generator().manual_seed(0))
        module.loss(latents, text_embeddings, noise, steps).backward()
        assert all(p.grad is not None for p in module.unet.parameters())
        assert all(p.grad is None for p in module.lda.parameters())  # the autoencoder is frozen
        ```
    """

    def __init__(
        self,
        base: BaseModel = "sd15",
        weights: str | None = None,
        tokenizer: str | None = None,
        autoencoder: str | None = None,
        train_text_encoder: bool = False,
        learning_rate: float = 1e-5,
        text_encoder_learning_rate: float | None = None,
        optimizer: OptimizerFactory = torch.optim.AdamW,
        warmup_steps: int = 0,
        lr_schedule: LrSchedule = "constant",
        prediction_type: PredictionType = "epsilon",
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        min_timestep: int = 0,
        max_timestep: int = 999,
        seed: int = 0,
    ) -> None:
        super().__init__(
            base, weights, train_text_encoder, learning_rate, text_encoder_learning_rate, optimizer, warmup_steps,
            lr_schedule, prediction_type, min_snr_gamma, offset_noise, min_timestep, max_timestep, seed,
            tokenizer=tokenizer, autoencoder=autoencoder,
        )  # fmt: skip
        # Checkpoints are read with `torch.load(weights_only=True)`: hyperparameters must be plain values.
        self.save_hyperparameters(ignore=["optimizer"])
        self.tokenizer = tokenizer
        self.autoencoder = autoencoder
        components = self.components
        components.lda.requires_grad_(False)
        components.lda.eval()
        trained: dict[str, torch.nn.Module] = {"unet": components.unet}
        for name, encoder in components.text_encoders().items():
            if train_text_encoder:
                trained[name] = encoder
            else:
                encoder.requires_grad_(False)
                encoder.eval()
        # The trained models, registered: the module's parameters, state dict and checkpoints are theirs.
        self.trained = torch.nn.ModuleDict(trained)
        self.configs = _configs(self)
        self.sample_size: int | None = None

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [
            {"params": list(self.trained["unet"].parameters()), "lr": self.learning_rate, "name": "unet"}
        ]
        if self.train_text_encoder:
            encoders = [p for name, model in self.trained.items() if name != "unet" for p in model.parameters()]
            groups.append({"params": encoders, "lr": self.text_encoder_learning_rate, "name": "text_encoder"})
        return groups

    def training_step(self, batch: TrainingBatch, batch_idx: int) -> Tensor:
        # The native size the exported UNet records (diffusers' `sample_size`): the training latents'.
        if (latents := batch.get("latents")) is not None:
            self.sample_size = latents.shape[-1]
        elif (images := batch.get("images")) is not None:
            self.sample_size = images.shape[-1] // self.lda.downscale_factor
        return super().training_step(batch, batch_idx)

    def model_files(self) -> ModelFiles:
        """The three files `refiners-convert sd1` writes, of the models as they are now."""
        components = self.components
        encoder = components.clip_text_encoder
        assert isinstance(encoder, CLIPTextEncoder), "SD1's text encoder (the SDXL bases have two: not exported)"
        text_metadata = self.configs[CLIP_TEXT_FILE]
        if encoder.tokenizer is not None:
            text_metadata = text_metadata | encoder.tokenizer.to_metadata()
        unet_config = ModelConfig.from_metadata(self.configs[UNET_FILE])
        assert unet_config is not None
        sample_size = self.sample_size or self.family.default_size // components.lda.downscale_factor
        return {
            UNET_FILE: (_tensors(components.unet), unet_metadata(unet_config, sample_size)),
            AUTOENCODER_FILE: (_tensors(components.lda), self.configs[AUTOENCODER_FILE]),
            CLIP_TEXT_FILE: (_tensors(encoder), text_metadata),
        }


def _tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    return {key: tensor.detach().cpu().contiguous().clone() for key, tensor in model.state_dict().items()}


class AutoencoderTraining(LightningModule):
    """Training of a Stable Diffusion autoencoder (the KL-regularized VAE) on images, from scratch or converted weights.

    Loss: the reconstruction of each image from a latent drawn from its posterior (`reconstruction`: `l1` or
    `mse`, mean over pixels), plus `kl_weight` times the KL divergence of the posterior to N(0, I) (summed over the
    latent's elements, mean over the batch, as the original's `DiagonalGaussianDistribution.kl`). The draws come from
    a generator seeded by (`seed`, step, batch, rank): exact resume, as `LoraFineTuning`.

    Batches are `CaptionedImageDataModule`'s (`cache_latents: false`; the captions are not read).

    Args:
        base: The architecture whose autoencoder trains (see `BaseModel`): its preset's sizes, random weights.
        weights: A converted folder (or an `autoencoder.safetensors`) to start from instead.
        kl_weight: The weight of the KL term (the original's 1e-6).
        reconstruction: `l1` (the original's) or `mse`.
        learning_rate: The learning rate.
        optimizer: See `OptimizerFactory`.
        warmup_steps: Optimizer steps of linear warmup.
        lr_schedule: See `LrSchedule`.
        seed: Seeds the random weights and the draws.

    Example:
        ```py
        import torch
        from refiners.training import AutoencoderTraining, TrainingBatch

        module = AutoencoderTraining(base="tiny")
        loss = module.loss(torch.rand(2, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
        loss.backward()
        assert all(p.grad is not None for p in module.parameters())
        ```
    """

    def __init__(
        self,
        base: BaseModel = "sd15",
        weights: str | None = None,
        kl_weight: float = 1e-6,
        reconstruction: str = "l1",
        learning_rate: float = 1e-4,
        optimizer: OptimizerFactory = torch.optim.AdamW,
        warmup_steps: int = 0,
        lr_schedule: LrSchedule = "constant",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if reconstruction not in ("l1", "mse"):
            raise TrainingSetupError(Setting("reconstruction"), f" must be 'l1' or 'mse', got {reconstruction!r}")
        if kl_weight < 0:
            raise TrainingSetupError(Setting("kl_weight"), f" must be 0 or more, got {kl_weight}")
        self.base = base
        self.weights = weights
        self.autoencoder: str | None = None
        self.kl_weight = kl_weight
        self.reconstruction = reconstruction
        self.learning_rate = learning_rate
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.lr_schedule: LrSchedule = lr_schedule
        self.seed = seed
        if weights is not None and Path(weights).is_file():
            self.autoencoder, self.weights = weights, None
        self.family = family_of(base)
        if self.weights is None and self.autoencoder is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lda = self.family.presets[base].lda.build((LatentDiffusionAutoencoder,))
        else:
            lda = build_components(base, self.weights, seed, autoencoder=self.autoencoder).lda
        self.lda: LatentDiffusionAutoencoder = lda
        self.configs = _configs(self)

    def loss(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The loss of a batch of images in [-1, 1], the posterior's noise drawn from `generator` (on CPU)."""
        images = images.to(device=self.device, dtype=next(self.lda.parameters()).dtype)
        mean, log_variance = self.lda.encoder[:-1](images).chunk(2, dim=1)
        log_variance = log_variance.clamp(-30.0, 20.0)
        noise = torch.randn(mean.shape, generator=generator).to(device=mean.device, dtype=mean.dtype)
        latents = mean + torch.exp(0.5 * log_variance) * noise
        decoded = self.lda.decoder(latents)
        error = F.l1_loss if self.reconstruction == "l1" else F.mse_loss
        kl = 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).sum(dim=(1, 2, 3)).mean()
        return error(decoded.float(), images.float()) + self.kl_weight * kl.float()

    def training_step(self, batch: TrainingBatch, batch_idx: int) -> Tensor:
        images = batch.get("images")
        if images is None:
            raise TrainingSetupError(
                "the batch has no images (cached latents?): an autoencoder trains on images, set ",
                Setting("cache_latents", False),
                " in the data module",
            )
        generator = seeded_generator(self.seed, "step", self.global_step, batch_idx, self.global_rank)
        loss = self.loss(images, generator)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        groups = [{"params": list(self.parameters()), "name": "autoencoder"}]
        optimizer = self.optimizer_factory(groups, self.learning_rate)
        return scheduled(optimizer, self.trainer, self.lr_schedule, self.warmup_steps)

    def encoder_scale(self, images: Iterable[Tensor]) -> float:
        """One over the standard deviation of the posterior means of `images` (batches in [-1, 1])."""
        with torch.no_grad():
            means = [self.lda.encoder(batch.to(self.device, next(self.lda.parameters()).dtype)) for batch in images]
        return 1.0 / torch.cat(means).float().std().item()

    def model_files(self, encoder_scale: float) -> ModelFiles:
        """The autoencoder's file, with `encoder_scale` recorded."""
        return {AUTOENCODER_FILE: (_tensors(self.lda), _with_scale(self.configs[AUTOENCODER_FILE], encoder_scale))}


class ExportModel(Callback):
    """Write the trained models as `refiners-convert` does, at every checkpoint and at the end of training.

    `FullFineTuning`: `unet.safetensors`, `autoencoder.safetensors` and `clip_text.safetensors` (with its tokenizer),
    a folder `StableDiffusion_1.from_folder` loads. `AutoencoderTraining`: `autoencoder.safetensors`, its
    `encoder_scale` measured on (up to `scale_batches` batches of) the training data. Files are written atomically,
    into `<dirpath>/step=N/` at checkpoints and `<dirpath>/` at the end. With `WeightAveraging` (EMA), the averaged
    weights are exported.

    Args:
        dirpath: The folder (default: `model` in the run's log folder).
        at_checkpoints: Also export at every checkpoint.
        scale_batches: How many batches of the training data measure the autoencoder's `encoder_scale`.
    """

    def __init__(self, dirpath: str | None = None, at_checkpoints: bool = True, scale_batches: int = 16) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.at_checkpoints = at_checkpoints
        self.scale_batches = scale_batches
        self.exported: list[Path] = []
        self._last_checkpoint_step: int | None = None

    def folder(self, trainer: Trainer) -> Path:
        return output_folder(trainer, self.dirpath, "model")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.at_checkpoints and trainer.global_step != self._last_checkpoint_step:
            self._last_checkpoint_step = trainer.global_step
            self.export(trainer, pl_module, self.folder(trainer) / f"step={trainer.global_step:06d}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module, self.folder(trainer))

    def export(self, trainer: Trainer, pl_module: LightningModule, folder: Path) -> list[Path]:
        """Write the files into `folder` on the global rank zero; returns them."""
        source = averaged(trainer, pl_module)
        if not trainer.is_global_zero:
            return []
        match source:
            case FullFineTuning():
                files = source.model_files()
            case AutoencoderTraining():
                files = source.model_files(source.encoder_scale(self._scale_images(trainer)))
            case _:
                raise TypeError(
                    f"ExportModel exports a FullFineTuning or an AutoencoderTraining, got {type(source).__name__}"
                )
        folder.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        for name, (tensors, metadata) in files.items():
            save_to_safetensors(folder / name, tensors, metadata)
            paths.append(folder / name)
        self.exported.extend(paths)
        print(f"model exported to {folder}", flush=True)
        return paths

    def _scale_images(self, trainer: Trainer) -> list[Tensor]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise TrainingSetupError("ExportModel measures the autoencoder's encoder_scale on the data module's images")
        images: list[Tensor] = []
        for index, batch in enumerate(datamodule.train_dataloader()):
            if index >= self.scale_batches:
                break
            images.append(batch["images"])
        return images
