"""Writing LoRAs as the ecosystem reads them: PEFT/diffusers, kohya (A1111, ComfyUI, LyCORIS), and refiners' layout.

Every writer takes specs (`LoraSpec`, see `specs_of` for fluxion `Lora`s) by module name in diffusers' naming with
the component first (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`), and writes atomically.

- PEFT/diffusers (`save_peft_lora`): what diffusers' `save_lora_weights` writes, `unet.<module>.lora_A.weight`,
  `.lora_B.weight` (and `.lora_magnitude_vector` for DoRA), with PEFT's `LoraConfig` fields in the
  `lora_adapter_metadata` header (`<component>.r`, `.lora_alpha`, `.rank_pattern`, `.alpha_pattern`, ...), which
  `load_lora_weights` reads to give each module its alpha. Down/up LoRAs only: PEFT has no LoCon, and diffusers loads
  no LoHa.
- kohya (`save_kohya_lora`): `lora_unet_<flattened module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, and
  LyCORIS's tensor names for the other kinds (`.lora_mid.weight`, `.hada_*`, `.lokr_*`, `.dora_scale`), with
  kohya's `ss_*` and the SAI model spec's `modelspec.*` metadata.
- refiners (`save_refiners_lora`): kohya's tensor names after the dotted module names, every alpha written. It is
  what `refiners-convert lora` normalises files to: nothing in it needs the model to be read.

Example:
    ```py
    import tempfile
    from pathlib import Path
    import refiners.fluxion.layers as fl
    from refiners.fluxion.adapters.lora import LinearLora
    from refiners.adapters.lora import parse_lora_file, save_kohya_lora, specs_of

    lora = LinearLora("style", 8, 4, rank=2, alpha=1.0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "style.safetensors"
        save_kohya_lora(path, specs_of({"unet.mid_block.attentions.0.proj_in": lora}))
        parsed = parse_lora_file(path)
    spec = parsed.specs["lora_unet_mid_block_attentions_0_proj_in"]
    assert (spec.rank, spec.alpha) == (2, 1.0)
    assert parsed.metadata["ss_network_module"] == "networks.lora"
    ```
"""

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from refiners.adapters.lora.formats import LoraSpec, flatten_name
from refiners.fluxion.adapters.lora import Lora
from refiners.fluxion.utils import save_to_safetensors

__all__ = [
    "KohyaBaseModel",
    "specs_of",
    "peft_state_dict",
    "kohya_state_dict",
    "refiners_state_dict",
    "save_peft_lora",
    "save_kohya_lora",
    "save_refiners_lora",
]

KohyaBaseModel = Literal["sd_v1", "sdxl_base_v1-0"]
"""kohya's `ss_base_model_version` of the models refiners writes kohya files for."""

# kohya's prefix of each component, and the SAI model spec's architecture, implementation and resolution.
_KOHYA_LAYOUTS: dict[str, tuple[dict[str, str], str, str, str]] = {
    "sd_v1": ({"unet": "lora_unet_", "text_encoder": "lora_te_"}, "stable-diffusion-v1", "diffusers", "512x512"),
    "sdxl_base_v1-0": (
        {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
        "stable-diffusion-xl-v1-base",
        "https://github.com/Stability-AI/generative-models",
        "1024x1024",
    ),
}
_WEIGHT_ROLES = frozenset({"lora_down", "lora_up", "lora_mid"})
_METADATA_KEY = "lora_adapter_metadata"


def specs_of(loras: Mapping[str, Lora[Any]]) -> dict[str, LoraSpec]:
    """The specs of fluxion LoRAs, for the writers.

    Args:
        loras: By module name in diffusers' naming, with the component first.
    """
    return {name: LoraSpec.from_lora(lora) for name, lora in loras.items()}


def _component(name: str) -> tuple[str, str]:
    component, _, module = name.partition(".")
    if not module:
        raise ValueError(
            f"{name!r} has no component: name modules in diffusers' naming with the component first, e.g. "
            f"'unet.{name}' or 'text_encoder.{name}'"
        )
    return component, module


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _alpha(spec: LoraSpec) -> float:
    return float(spec.rank if spec.alpha is None else spec.alpha)


# -- PEFT / diffusers ------------------------------------------------------------------------------------------


def peft_state_dict(specs: Mapping[str, LoraSpec]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header of a PEFT/diffusers LoRA file (see `save_peft_lora`).

    Args:
        specs: By module name, with the component first.

    Raises:
        ValueError: A spec is not a down/up pair, or is a DoRA normalised per input column (PEFT's DoRA is per
            output row), or a component mixes DoRA and plain LoRAs (PEFT's `use_dora` is one flag).
    """
    tensors: dict[str, Tensor] = {}
    by_component: dict[str, dict[str, LoraSpec]] = {}
    for name, spec in specs.items():
        component, module = _component(name)
        if spec.kind != "lora":
            raise ValueError(
                f"{name}: a {spec.kind} has no PEFT/diffusers layout (lora_A/lora_B): write a kohya file "
                f"(save_kohya_lora) or a refiners file (save_refiners_lora) instead"
            )
        down, up = spec.tensors["lora_down"], spec.tensors["lora_up"]
        tensors[f"{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{name}.lora_B.weight"] = up.contiguous()
        if spec.magnitude is not None:
            if spec.magnitude_axis != "output":
                raise ValueError(
                    f"{name}: its DoRA normalises per input column, PEFT's per output row: write a kohya file "
                    f"(save_kohya_lora) instead"
                )
            # PEFT shapes a convolution's magnitude to broadcast over the output's channels.
            shape = (1, -1, 1, 1) if down.dim() == 4 else (-1,)
            tensors[f"{name}.lora_magnitude_vector"] = spec.magnitude.reshape(shape).contiguous()
        by_component.setdefault(component, {})[module] = spec
    config: dict[str, Any] = {}
    for component, modules in by_component.items():
        config |= {f"{component}.{key}": value for key, value in _lora_config(component, modules).items()}
    return tensors, {"format": "pt", _METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def _lora_config(component: str, modules: dict[str, LoraSpec]) -> dict[str, Any]:
    """PEFT's `LoraConfig` fields: the most common rank and alpha, and patterns for the other modules (anchored with
    `^`, as diffusers writes them, so that a pattern names one module)."""
    doras = {spec.is_dora for spec in modules.values()}
    if len(doras) > 1:
        raise ValueError(
            f"{component} mixes DoRA and plain LoRAs, which PEFT's one `use_dora` flag cannot say: write a kohya file"
        )
    ranks = {module: spec.rank for module, spec in modules.items()}
    alphas = {module: _alpha(spec) for module, spec in modules.items()}
    rank, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{module}": value for module, value in ranks.items() if value != rank},
        "alpha_pattern": {f"^{module}": value for module, value in alphas.items() if value != alpha},
        "target_modules": sorted(modules),
        "use_dora": doras == {True},
    }


def save_peft_lora(path: str | Path, specs: Mapping[str, LoraSpec]) -> None:
    """Write a PEFT/diffusers LoRA file, as diffusers' `save_lora_weights` does (see `peft_state_dict`).

    Args:
        path: The `.safetensors` file.
        specs: By module name, with the component first.
    """
    tensors, metadata = peft_state_dict(specs)
    save_to_safetensors(path, tensors, metadata)


# -- kohya and refiners ----------------------------------------------------------------------------------------


def _lycoris_tensors(base: str, spec: LoraSpec) -> dict[str, Tensor]:
    """kohya's and LyCORIS's tensors of a spec after `base` (a flattened or dotted module name)."""
    tensors = dict(spec.tensors)
    alpha = _alpha(spec)
    if not spec.low_rank:
        # LyCORIS ignores the alpha of a LoKr of full factors: its factor goes into w1.
        tensors["lokr_w1"] = tensors["lokr_w1"] * spec.factor
        alpha = 1.0
    written = {
        f"{base}.{role}.weight" if role in _WEIGHT_ROLES else f"{base}.{role}": tensor.contiguous()
        for role, tensor in tensors.items()
    }
    written[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if spec.magnitude is not None:
        # LyCORIS's shapes: (out, 1, ...) per output row, (1, in, ...) per input column.
        extra = [1] * (3 if any(tensor.dim() == 4 for tensor in tensors.values()) else 1)
        shape = [-1, *extra] if spec.magnitude_axis == "output" else [1, -1, *extra[1:]]
        written[f"{base}.dora_scale"] = spec.magnitude.reshape(shape).contiguous()
    return written


def kohya_state_dict(
    specs: Mapping[str, LoraSpec], base_model: KohyaBaseModel = "sd_v1", title: str | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header of a kohya LoRA file (see `save_kohya_lora`).

    Args:
        specs: By module name, with the component first (`unet`, `text_encoder`, and `text_encoder_2` for SDXL).
        base_model: The model the LoRA is for: it sets the text encoders' prefixes and the metadata.
        title: The `modelspec.title`.

    Raises:
        ValueError: A component has no kohya prefix for `base_model`.
    """
    prefixes, architecture, implementation, resolution = _KOHYA_LAYOUTS[base_model]
    tensors: dict[str, Tensor] = {}
    for name, spec in specs.items():
        component, module = _component(name)
        if component not in prefixes:
            raise ValueError(
                f"{name}: kohya files for {base_model} have no prefix for {component!r} (they have "
                f"{', '.join(f'{c} ({p})' for c, p in prefixes.items())})"
            )
        tensors |= _lycoris_tensors(prefixes[component] + flatten_name(module), spec)
    kinds = {spec.kind for spec in specs.values()}
    doras = any(spec.is_dora for spec in specs.values())
    metadata = {
        "ss_network_module": "networks.lora" if kinds <= {"lora"} and not doras else "lycoris.kohya",
        "ss_network_dim": str(_most_common([spec.rank for spec in specs.values()])) if specs else "0",
        "ss_network_alpha": str(_most_common([_alpha(spec) for spec in specs.values()])) if specs else "0.0",
        "ss_base_model_version": base_model,
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title or "refiners LoRA",
        "modelspec.resolution": resolution,
    }
    if metadata["ss_network_module"] == "lycoris.kohya":
        # LyCORIS calls the down/up kinds `locon` (its LoRA covers convolutions too).
        algos = sorted({"locon" if kind in ("lora", "locon") else kind for kind in kinds})
        arguments = {"algo": algos[0] if len(algos) == 1 else ",".join(algos)} | ({"dora_wd": "True"} if doras else {})
        metadata["ss_network_args"] = json.dumps(arguments)
    return tensors, metadata


def save_kohya_lora(
    path: str | Path, specs: Mapping[str, LoraSpec], base_model: KohyaBaseModel = "sd_v1", title: str | None = None
) -> None:
    """Write a kohya LoRA file, for A1111, ComfyUI, kohya's and LyCORIS's tools (see `kohya_state_dict`).

    Args:
        path: The `.safetensors` file.
        specs: By module name, with the component first.
        base_model: See `kohya_state_dict`.
        title: The `modelspec.title`.
    """
    tensors, metadata = kohya_state_dict(specs, base_model, title)
    save_to_safetensors(path, tensors, metadata)


def refiners_state_dict(specs: Mapping[str, LoraSpec]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header of a refiners LoRA file (see `save_refiners_lora`).

    Args:
        specs: By module name, with the component first.
    """
    tensors: dict[str, Tensor] = {}
    for name, spec in specs.items():
        _component(name)
        tensors |= _lycoris_tensors(name, spec)
    return tensors, {"format": "pt", "refiners_lora": "1"}


def save_refiners_lora(path: str | Path, specs: Mapping[str, LoraSpec]) -> None:
    """Write a refiners LoRA file: LyCORIS's tensor names after dotted module names, every alpha written.

    Args:
        path: The `.safetensors` file.
        specs: By module name, with the component first.
    """
    tensors, metadata = refiners_state_dict(specs)
    save_to_safetensors(path, tensors, metadata)
