"""Named sizes of the Segment Anything family: Meta's three releases, and `TINY`, SAM's architecture at toy sizes.

`TINY` is the model the tests, the docstring examples and the README's test share (instead of each writing the
sizes out): a 2-layer, 32-wide ViT on 128x128 inputs (an 8x8 grid with 6x6 windows, so that the windows' padding
runs, and global attention in the last layer), and a 32-wide decoder. Each preset is the `ModelConfig` a converted
file records.

Example:
    ```py
    from refiners.foundationals.segment_anything import SegmentAnything
    from refiners.foundationals.segment_anything.presets import TINY

    sam = TINY.build([SegmentAnything])
    assert sam.image_size == 128 and sam.grid_size == 8
    ```
"""

from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.segment_anything.model import (
    SegmentAnything,
    SegmentAnythingB,
    SegmentAnythingH,
    SegmentAnythingL,
)

__all__ = ["SAM_B", "SAM_L", "SAM_H", "TINY"]

SAM_B = ModelConfig.of(SegmentAnythingB)
"""SAM ViT-B (`sam_vit_b_01ec64.pth`)."""
SAM_L = ModelConfig.of(SegmentAnythingL)
"""SAM ViT-L (`sam_vit_l_0b3195.pth`)."""
SAM_H = ModelConfig.of(SegmentAnythingH)
"""SAM ViT-H (`sam_vit_h_4b8939.pth`)."""
TINY = ModelConfig.of(
    SegmentAnything,
    embedding_dim=32,
    num_layers=2,
    num_heads=2,
    global_attention_indices=(1,),
    window_size=6,
    image_size=128,
    prompt_embedding_dim=32,
    decoder_feedforward_dim=64,
    iou_hidden_dim=32,
)
"""SAM's architecture at toy sizes (see the module's documentation)."""
