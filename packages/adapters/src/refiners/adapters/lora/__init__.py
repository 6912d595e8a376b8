"""LoRA files for refiners models: every common layout read into one form, LyCORIS kinds, and writers."""

from refiners.adapters.lora.export import (
    KohyaBaseModel,
    kohya_state_dict,
    peft_state_dict,
    refiners_state_dict,
    save_kohya_lora,
    save_peft_lora,
    save_refiners_lora,
    specs_of,
)
from refiners.adapters.lora.formats import (
    KOHYA_PREFIXES,
    LoraKind,
    LoraSpec,
    ParsedLoras,
    UnmatchedLoraKeysError,
    UnmatchedLoraKeysWarning,
    flatten_name,
    parse_lora_file,
    resolve,
)
from refiners.adapters.lora.lycoris import (
    Dora,
    HadamardProduct,
    KroneckerProduct,
    LoCon,
    LoHa,
    LoKr,
    MagnitudeAxis,
    WeightDecomposition,
    WeightProduct,
    lokr_factorization,
    weight_update,
)
from refiners.adapters.lora.sd import (
    LoraLayout,
    LoraSource,
    SD1LoraAdapter,
    SDLoraManager,
    convert_sd1_lora,
    sd1_lora_targets,
    sd1_module_aliases,
)

__all__ = [
    # formats
    "LoraKind",
    "LoraSpec",
    "ParsedLoras",
    "UnmatchedLoraKeysError",
    "UnmatchedLoraKeysWarning",
    "KOHYA_PREFIXES",
    "parse_lora_file",
    "resolve",
    "flatten_name",
    # LyCORIS kinds
    "MagnitudeAxis",
    "LoCon",
    "HadamardProduct",
    "WeightProduct",
    "LoHa",
    "KroneckerProduct",
    "LoKr",
    "WeightDecomposition",
    "Dora",
    "lokr_factorization",
    "weight_update",
    # export
    "KohyaBaseModel",
    "peft_state_dict",
    "kohya_state_dict",
    "refiners_state_dict",
    "save_peft_lora",
    "save_kohya_lora",
    "save_refiners_lora",
    "specs_of",
    # Stable Diffusion
    "LoraLayout",
    "LoraSource",
    "SD1LoraAdapter",
    "SDLoraManager",
    "convert_sd1_lora",
    "sd1_lora_targets",
    "sd1_module_aliases",
]
