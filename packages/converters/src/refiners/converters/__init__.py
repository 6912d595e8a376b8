"""refiners.converters: turn diffusers, transformers, original and community checkpoints into refiners weights.

`from_pretrained` and `from_single_file` load a Stable Diffusion 1.x model in one call, converting in memory (see
`refiners.converters.loading`); `refiners-convert` writes the conversion to files, which
`StableDiffusion_1.from_folder` loads.
"""

from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.converters.loading import from_pretrained, from_single_file

__all__ = ["ConversionError", "KeyMap", "convert_state_dict", "from_pretrained", "from_single_file"]
