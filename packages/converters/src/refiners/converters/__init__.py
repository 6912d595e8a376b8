"""refiners.converters: turn diffusers, transformers, original and community checkpoints into refiners weights."""

from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict

__all__ = ["ConversionError", "KeyMap", "convert_state_dict"]
