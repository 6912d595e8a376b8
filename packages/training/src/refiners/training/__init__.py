"""refiners.training: LoRA fine-tuning of Refiners models on Lightning (see the workspace README)."""

from refiners.training.data import (
    CachingEncoders as CachingEncoders,
)
from refiners.training.data import (
    CaptionedImageDataModule as CaptionedImageDataModule,
)
from refiners.training.data import (
    CaptionedImageDataset as CaptionedImageDataset,
)
from refiners.training.data import (
    ImageFolderError as ImageFolderError,
)
from refiners.training.data import (
    TrainingBatch as TrainingBatch,
)
from refiners.training.data_transforms import ImageTransform as ImageTransform
from refiners.training.sample_data import make_image_folder as make_image_folder

__all__ = [
    "CaptionedImageDataModule",
    "CaptionedImageDataset",
    "CachingEncoders",
    "ImageFolderError",
    "ImageTransform",
    "TrainingBatch",
    "make_image_folder",
]
