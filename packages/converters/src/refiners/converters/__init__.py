"""refiners.converters: turn diffusers, transformers, original and community checkpoints into refiners weights.

`from_pretrained` and `from_single_file` load a Stable Diffusion 1.x model in one call, converting in memory (see
`refiners.converters.loading`); `refiners-convert` writes the conversion to files, which
`StableDiffusion_1.from_folder` loads. `to_diffusers` goes back: a refiners SD1 folder (or model) to a diffusers
folder (`refiners-convert sd1-to-diffusers`).
"""

from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.converters.loading import from_pretrained, from_single_file
from refiners.converters.to_diffusers import to_diffusers

__all__ = ["ConversionError", "KeyMap", "convert_state_dict", "from_pretrained", "from_single_file", "to_diffusers"]
