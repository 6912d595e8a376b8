"""Fine-tuning Segment Anything as a `LightningModule`: LoRAs on the image encoder's and the mask decoder's attention,
or the mask decoder in full, the rest frozen.

As `LoraFineTuning` does for Stable Diffusion, the base model is not a registered submodule: the module's parameters,
`state_dict` and checkpoints hold the trained weights only (the LoRAs, found by type, or the `MaskDecoder`), while
the base follows the module's device and dtype (see `_apply`).

The loss is SAM's (Kirillov et al., 2023, section 3 and appendix A): the mask's logits, upscaled to the model's
input as `SegmentAnything.postprocess_masks` first does, against the ground truth with focal loss and dice loss
in a 20:1 ratio, plus the mean-square error between the predicted IoU and the IoU of the predicted mask (logits above
0) with the ground truth. A batch has no random draw of its own (the prompts come from the data): a run resumed from
a checkpoint computes what the uninterrupted run computed.
"""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import Lora, add_loras_to, lora_parameters
from refiners.foundationals.segment_anything import MaskDecoder, SAMViT, SegmentAnything
from refiners.foundationals.segment_anything.image_encoder import FusedSelfAttention
from refiners.foundationals.segment_anything.presets import TINY
from refiners.training.errors import Setting, TrainingSetupError
from refiners.training.module import LrSchedule, OptimizerFactory, lr_multiplier, relative_path
from refiners.training.segment_anything.data import MaskBatch

__all__ = [
    "SAMBase",
    "SAMLoraTargets",
    "CONVERT_SAM_COMMAND",
    "SAMFineTuning",
    "build_sam",
    "sam_lora_target_layers",
    "focal_loss",
    "dice_loss",
    "mask_iou",
]

SAMBase = Literal["sam", "tiny"]
"""The model: a converted SAM (`sam`, whose file records its size: ViT-B, L or H), or SAM's architecture at toy
sizes (`tiny`: the `TINY` preset, random weights when no file is given; for tests and demos)."""

SAMLoraTargets = Literal["mask_decoder", "image_encoder", "all"]
"""Which layers get LoRAs: the projections of every attention of the mask decoder (the two-way transformer's, both
ways), the query-key-value and output projections of the image encoder's self-attention, or both."""

CONVERT_SAM_COMMAND = "refiners-convert sam --from sam_vit_b_01ec64.pth --to sam_b.safetensors"
"""How to make the file `SAMFineTuning(weights=...)` reads, from Meta's checkpoint (any size)."""

_LORA_NAME = "default"


def build_sam(base: SAMBase = "sam", weights: str | Path | None = None, seed: int = 0) -> SegmentAnything:
    """The SAM to fine-tune: the file `weights` (written by `refiners-convert sam`), or `TINY` with random weights.

    Args:
        base: See `SAMBase`.
        weights: The converted file; required for `sam`.
        seed: The seed of the tiny model's random weights.
    """
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise TrainingSetupError(
                f"the SAM weights file {path} does not exist: pass ",
                Setting("weights", "<file>"),
                f", a file written by `{CONVERT_SAM_COMMAND}`",
            )
        return SegmentAnything.from_safetensors(path)
    if base != "tiny":
        raise TrainingSetupError(
            Setting("base", base),
            " needs weights: pass ",
            Setting("weights", "<file>"),
            f", a file written by `{CONVERT_SAM_COMMAND}`, or ",
            Setting("base", "tiny"),
            " for a toy model with random weights",
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TINY.build([SegmentAnything])


def sam_lora_target_layers(sam: SegmentAnything, targets: SAMLoraTargets) -> dict[str, fl.Linear]:
    """The Linear layers that `targets` puts LoRAs on, by their path in `sam` as built (the keys of its weights).

    Args:
        sam: The model, without LoRAs.
        targets: See `SAMLoraTargets`.
    """
    containers: list[tuple[type[fl.Chain], type[fl.Chain]]] = []
    if targets in ("image_encoder", "all"):
        containers.append((SAMViT, FusedSelfAttention))
    if targets in ("mask_decoder", "all"):
        containers.append((MaskDecoder, fl.Attention))
    layers: dict[str, fl.Linear] = {}
    for component, attention in containers:
        root = sam.ensure_find(component)
        for layer, _ in root.walk(fl.Linear):
            if not isinstance(layer.parent, Lora) and _inside(layer, attention, root):
                layers[relative_path(layer, sam)] = layer
    return layers


def _inside(layer: fl.Module, container: type[fl.Chain], root: fl.Chain) -> bool:
    parent = layer.parent
    while parent is not None and parent is not root:
        if isinstance(parent, container):
            return True
        parent = parent.parent
    return False


# -- the loss ----------------------------------------------------------------------------------------------------


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The sigmoid focal loss (Lin et al., 2017) of each mask, averaged over its pixels: `(batch, masks)`.

    Args:
        logits: `(batch, masks, h, w)` mask logits.
        target: `(batch, 1, h, w)`, 0 or 1 (the ground truth of every mask of a row).
        alpha: The weight of the positive pixels (1 - alpha for the negative ones).
        gamma: The focusing exponent.
    """
    target = target.expand_as(logits)
    probability = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = probability * target + (1 - probability) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * (1 - p_t) ** gamma * cross_entropy).flatten(2).mean(dim=2)


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """The dice loss (Milletari et al., 2016) of each mask, with DETR's smoothing of 1: `(batch, masks)`.

    Args:
        logits: `(batch, masks, h, w)` mask logits.
        target: `(batch, 1, h, w)`, 0 or 1.
    """
    probability, target = logits.sigmoid().flatten(2), target.flatten(2)
    intersection = (probability * target).sum(dim=2)
    return 1 - (2 * intersection + 1) / (probability.sum(dim=2) + target.sum(dim=2) + 1)


def mask_iou(logits: Tensor, target: Tensor) -> Tensor:
    """The IoU of each predicted mask (logits above 0) with its target, `(batch, masks)`; 0 when both are empty.

    Args:
        logits: `(batch, masks, h, w)` mask logits.
        target: `(batch, 1, h, w)`, 0 or 1.
    """
    predicted, actual = (logits > 0).flatten(2), (target > 0.5).flatten(2)
    intersection = (predicted & actual).sum(dim=2).float()
    union = (predicted | actual).sum(dim=2).float()
    return intersection / union.clamp(min=1)


# -- the module --------------------------------------------------------------------------------------------------


class SAMFineTuning(LightningModule):
    """Fine-tuning of Segment Anything on images and their masks: LoRAs, or the mask decoder, trained on SAM's loss.

    Batches are `MaskBatch` dicts from `MaskDataModule`: images and ground-truth masks in the model's input frame,
    and one prompt per image (a box, or points) derived from its mask. Each mask is decoded as SAM's single-mask
    output.

    Args:
        base: See `SAMBase`.
        weights: The file written by `refiners-convert sam` (required for `sam`).
        targets: Where the LoRAs go (see `SAMLoraTargets`); unused with `decoder_only`.
        rank: The LoRAs' rank.
        alpha: The LoRAs' alpha (their update is scaled by `alpha / rank`); defaults to the rank.
        decoder_only: Train the whole mask decoder (no LoRA), the encoders frozen.
        multimask_output: Decode SAM's three masks per prompt and train, for each prompt, the one of lowest loss,
            as SAM's paper does for ambiguous prompts (a single point); the IoU head learns all three. Otherwise the
            single-mask output trains (a box, or several points).
        learning_rate: The learning rate.
        optimizer: Builds the optimizer from the parameters and the learning rate (default: AdamW), as in
            `LoraFineTuning`; a config's `init_args` take no `lr`.
        warmup_steps: Optimizer steps of linear warmup from 0 to the learning rate.
        lr_schedule: The learning rate after warmup: `constant`, `linear` or `cosine` decay to 0.
        focal_weight: The weight of the focal loss (SAM: 20).
        dice_weight: The weight of the dice loss (SAM: 1).
        iou_weight: The weight of the IoU prediction's mean-square error (SAM: 1).
        seed: Seeds the LoRAs' initialization and the tiny model's random weights.

    Example:
        ```py
        import torch
        from refiners.training.segment_anything import SAMFineTuning

        module = SAMFineTuning(base="tiny", targets="all", rank=2)  # base="sam", weights="sam_b.safetensors"
        images, masks = torch.randn(1, 3, 128, 128), torch.zeros(1, 1, 128, 128)
        masks[..., 20:90, 30:100] = 1
        box = torch.tensor([[[30.0, 20.0], [99.0, 89.0]]])  # its corners (x, y), in the model's input frame
        types = torch.tensor([[2, 3]])  # PointType.BOX_TOP_LEFT, BOX_BOTTOM_RIGHT
        losses = module.losses({"images": images, "masks": masks, "coordinates": box, "types": types})
        losses["loss"].backward()
        assert all(parameter.grad is not None for parameter in module.parameters())  # the LoRAs, and only them
        ```
    """

    def __init__(
        self,
        base: SAMBase = "sam",
        weights: str | None = None,
        targets: SAMLoraTargets = "mask_decoder",
        rank: int = 8,
        alpha: float | None = None,
        decoder_only: bool = False,
        multimask_output: bool = False,
        learning_rate: float = 1e-4,
        optimizer: OptimizerFactory = torch.optim.AdamW,
        warmup_steps: int = 0,
        lr_schedule: LrSchedule = "constant",
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        _check_arguments(base, targets, rank, alpha, learning_rate, warmup_steps, lr_schedule)
        for name, weight in (("focal_weight", focal_weight), ("dice_weight", dice_weight), ("iou_weight", iou_weight)):
            if weight < 0:
                raise TrainingSetupError(Setting(name), f" must be 0 (off) or positive, got {weight}")
        self.base: SAMBase = base
        self.weights = weights
        self.targets: SAMLoraTargets = targets
        self.rank = rank
        self.alpha = alpha
        self.decoder_only = decoder_only
        self.multimask_output = multimask_output
        self.learning_rate = learning_rate
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.lr_schedule: LrSchedule = lr_schedule
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.iou_weight = iou_weight
        self.seed = seed

        sam = build_sam(base, weights, seed)
        sam.requires_grad_(False)
        sam.eval()
        # A plain attribute, not a submodule: see the module docstring.
        object.__setattr__(self, "_sam", sam)
        if decoder_only:
            sam.mask_decoder.requires_grad_(True)
            self.trained = torch.nn.ModuleDict({"MaskDecoder": sam.mask_decoder})
        else:
            layers = sam_lora_target_layers(sam, targets)
            names = {id(layer): path for path, layer in layers.items()}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                adapters = add_loras_to(
                    sam, lambda layer, _: id(layer) in names, rank=rank, alpha=alpha, name=_LORA_NAME
                )
            # The LoRAs under their target's path (`/` for `.`, which module names cannot hold).
            self.trained = torch.nn.ModuleDict(
                {names[id(adapter.target)].replace(".", "/"): adapter.loras[_LORA_NAME] for adapter in adapters}
            )

    # -- the model ---------------------------------------------------------------------------------------------------

    @property
    def sam(self) -> SegmentAnything:
        """The model being fine-tuned, LoRAs included."""
        return self.__dict__["_sam"]

    @property
    def trains_image_encoder(self) -> bool:
        return not self.decoder_only and self.targets in ("image_encoder", "all")

    def named_loras(self) -> dict[str, Lora[Any]]:
        """The trained LoRAs by the path of their target in the model as built (empty with `decoder_only`)."""
        return {key.replace("/", "."): module for key, module in self.trained.items() if isinstance(module, Lora)}

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains, found by type: the parameters of the LoRAs, or of the `MaskDecoder`."""
        if self.decoder_only:
            return list(self.sam.mask_decoder.parameters())
        return lora_parameters(self.sam)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        # `.to(device)`, `.half()`... (and Lightning's precision plugins, which use them) reach the frozen base.
        super()._apply(fn, recurse)
        if recurse:
            self.sam._apply(fn, recurse)
        return self

    # -- the loss ----------------------------------------------------------------------------------------------------

    def predict_batch(self, batch: MaskBatch) -> tuple[Tensor, Tensor]:
        """The masks of each image and prompt of a batch (see `multimask_output`): `(logits, iou_predictions)`, the
        logits `(batch, masks, S, S)` upscaled to the model's input frame (bilinear, as `postprocess_masks` first
        does)."""
        sam = self.sam
        images = batch["images"].to(device=sam.device, dtype=sam.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_image_encoder):
            # As `compute_image_embedding`: the first child, the image encoder or an adapter on it.
            embedding = sam.layer(0, fl.Module)(images)
        low_res, iou_predictions = sam.decode(
            embedding, batch["coordinates"].float(), batch["types"], multimask_output=self.multimask_output
        )
        logits = F.interpolate(low_res.float(), (sam.image_size, sam.image_size), mode="bilinear", align_corners=False)
        return logits, iou_predictions.float()

    def losses(self, batch: MaskBatch) -> dict[str, Tensor]:
        """SAM's loss of a batch (`loss`), and its terms: `focal`, `dice` and `iou_mse`, each a batch mean."""
        logits, iou_predictions = self.predict_batch(batch)
        target = batch["masks"].to(device=logits.device, dtype=logits.dtype)
        if target.shape[2:] != logits.shape[2:]:
            raise TrainingSetupError(
                f"the batch's masks are {tuple(target.shape[2:])} but the model predicts {tuple(logits.shape[2:])}: set ",
                Setting("image_size", self.sam.image_size),
                " in the data module (the model's input side)",
            )
        focal, dice = focal_loss(logits, target), dice_loss(logits, target)
        mask_loss = self.focal_weight * focal + self.dice_weight * dice  # (batch, masks)
        best = mask_loss.detach().argmin(dim=1, keepdim=True)  # the only mask, or the best of three

        def chosen(per_mask: Tensor) -> Tensor:
            return per_mask.gather(1, best).mean()

        iou_mse = F.mse_loss(iou_predictions, mask_iou(logits, target))
        loss = chosen(mask_loss) + self.iou_weight * iou_mse
        return {"loss": loss, "focal": chosen(focal), "dice": chosen(dice), "iou_mse": iou_mse}

    def on_fit_start(self) -> None:
        image_size = getattr(getattr(self.trainer, "datamodule", None), "image_size", None)
        if image_size is not None and image_size != self.sam.image_size:
            raise TrainingSetupError(
                f"the data module prepares {image_size}-pixel images but this SAM takes {self.sam.image_size}: set ",
                Setting("image_size", self.sam.image_size),
                " in the data module",
            )

    def training_step(self, batch: MaskBatch, batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        size = batch["images"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        for name in ("focal", "dice", "iou_mse"):
            self.log(f"train/{name}", losses[name], batch_size=size)
        return losses["loss"]

    # -- optimization ----------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        groups = [{"params": self.trained_parameters(), "lr": self.learning_rate}]
        optimizer = self.optimizer_factory(groups, self.learning_rate)
        total = self.trainer.estimated_stepping_batches if self.lr_schedule != "constant" else None
        if total is not None and not math.isfinite(total):
            raise TrainingSetupError(
                Setting("lr_schedule", self.lr_schedule),
                " decays to zero at the last step, but the training has no end: set trainer.max_steps or "
                "trainer.max_epochs, or use ",
                Setting("lr_schedule", "constant"),
            )
        schedule = lr_multiplier(self.lr_schedule, self.warmup_steps, None if total is None else int(total))
        scheduler = LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _check_arguments(
    base: str,
    targets: str,
    rank: int,
    alpha: float | None,
    learning_rate: float,
    warmup_steps: int,
    lr_schedule: str,
) -> None:
    """Fail before the model is built, saying what to change."""
    choices = {
        "base": (base, ("sam", "tiny")),
        "targets": (targets, ("mask_decoder", "image_encoder", "all")),
        "lr_schedule": (lr_schedule, ("constant", "linear", "cosine")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise TrainingSetupError(Setting(name), f" must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if rank < 1:
        raise TrainingSetupError(Setting("rank"), f" must be a positive integer, got {rank}")
    if alpha is not None and alpha <= 0:
        raise TrainingSetupError(
            Setting("alpha"), f" must be positive (the LoRAs are scaled by alpha / rank), got {alpha}"
        )
    if learning_rate <= 0:
        raise TrainingSetupError(Setting("learning_rate"), f" must be positive, got {learning_rate}")
    if warmup_steps < 0:
        raise TrainingSetupError(Setting("warmup_steps"), f" must be 0 (no warmup) or more, got {warmup_steps}")
