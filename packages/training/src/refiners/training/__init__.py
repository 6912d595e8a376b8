"""refiners.training: LoRA fine-tuning, full training and autoencoder training of Refiners models on Lightning (see
the workspace README)."""

from refiners.training.callbacks import ExportLora, LoraFormat, SampleImages
from refiners.training.data import (
    CachingEncoders,
    CaptionedImageDataModule,
    CaptionedImageDataset,
    TextEncodings,
    TrainingBatch,
)
from refiners.training.data_transforms import ImageTransform
from refiners.training.errors import Setting, TrainingSetupError
from refiners.training.families import FAMILIES, TrainingFamily, family_of, sdxl_time_ids
from refiners.training.full_training import AutoencoderTraining, ExportModel, FullFineTuning
from refiners.training.image_folder import ImageFolderError, find_captioned_images
from refiners.training.module import (
    BaseModel,
    DenoisingTraining,
    GradientCheckpointing,
    LoraFineTuning,
    LoraTargets,
    LrSchedule,
    PredictionType,
    StableDiffusionComponents,
    build_components,
    lora_target_layers,
)
from refiners.training.progress import TrainingProgress
from refiners.training.sample_data import make_image_folder

__all__ = [
    # data
    "CaptionedImageDataModule",
    "CaptionedImageDataset",
    "CachingEncoders",
    "TrainingBatch",
    "TextEncodings",
    "ImageTransform",
    "ImageFolderError",
    "find_captioned_images",
    "make_image_folder",
    # errors that the user fixes (`refiners-train` prints them without traceback)
    "TrainingSetupError",
    "Setting",
    # fine-tuning
    "DenoisingTraining",
    "LoraFineTuning",
    "FullFineTuning",
    "AutoencoderTraining",
    "BaseModel",
    "LoraTargets",
    "PredictionType",
    "LrSchedule",
    "StableDiffusionComponents",
    "build_components",
    "TrainingFamily",
    "FAMILIES",
    "family_of",
    "sdxl_time_ids",
    "lora_target_layers",
    "GradientCheckpointing",
    # callbacks
    "SampleImages",
    "ExportLora",
    "ExportModel",
    "LoraFormat",
    "TrainingProgress",
]
