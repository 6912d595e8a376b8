"""Fine-tuning Segment Anything on images and their masks: LoRAs on its attention, or its mask decoder in full."""

from refiners.training.segment_anything.data import (
    MaskBatch,
    MaskDataModule,
    MaskDataset,
    MaskedImageFile,
    MaskItem,
    PromptKind,
    find_masked_images,
)
from refiners.training.segment_anything.export import ExportSAMAdapter, load_sam_adapter, sam_adapter_state_dict
from refiners.training.segment_anything.module import (
    SAMBase,
    SAMFineTuning,
    SAMLoraTargets,
    build_sam,
    dice_loss,
    focal_loss,
    mask_iou,
    sam_lora_target_layers,
)
from refiners.training.segment_anything.sample_data import make_mask_folder

__all__ = [
    "MaskBatch",
    "MaskDataModule",
    "MaskDataset",
    "MaskedImageFile",
    "MaskItem",
    "PromptKind",
    "find_masked_images",
    "make_mask_folder",
    "SAMBase",
    "SAMFineTuning",
    "SAMLoraTargets",
    "build_sam",
    "sam_lora_target_layers",
    "focal_loss",
    "dice_loss",
    "mask_iou",
    "ExportSAMAdapter",
    "load_sam_adapter",
    "sam_adapter_state_dict",
]
