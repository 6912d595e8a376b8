"""LoRA files in the layouts the ecosystem writes, read into one form and matched to a model's modules by name.

`parse_lora_file` reads a file (or a state dict) into `ParsedLoras`: one `LoraSpec` per updated module, whatever the
layout, detected key by key:

- PEFT / diffusers: `<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector` (DoRA), under `unet.`,
  `text_encoder.`, `text_encoder_2.` or PEFT's `base_model.model.`; alphas from `.alpha` keys (diffusers'
  `network_alphas`), else from PEFT's `lora_adapter_metadata` (`lora_alpha`, `r`, `alpha_pattern`,
  `rank_pattern`, `use_rslora`), else alpha = rank.
- old diffusers attention processors: `<attention>.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`,
  and `to_q_lora` under a transformers `self_attn` is `q_proj`), `<module>.lora.down.weight`,
  `<module>.lora_linear_layer.down.weight`.
- kohya / A1111 / LyCORIS: `lora_unet_<flattened module>.lora_down.weight`, `.lora_up.weight`, `.lora_mid.weight`
  (LoCon), `.alpha` (alpha = rank when absent), `.dora_scale`, `.hada_*` (LoHa), `.lokr_*` (LoKr), under
  `lora_unet_`, `lora_te_`, `lora_te1_` and `lora_te2_`; the same tensor names after dotted module names (PEFT's LoHa
  and LoKr, the refiners layout written by `refiners.adapters.lora.export`).

Kohya names are module names with `.` replaced by `_`, which string rules cannot undo (`to_q`, `transformer_blocks`):
`resolve` matches every name against the module names of the live model (flattened for kohya names), and reports
each tensor it cannot use with the modules the model has near it.

Example:
    ```py
    import torch
    from refiners.adapters.lora import parse_lora_file, resolve

    state_dict = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0),
    }
    specs = resolve(parse_lora_file(state_dict), ["unet.mid_block.attentions.0.proj_in", "unet.conv_in"])
    spec = specs["unet.mid_block.attentions.0.proj_in"]
    assert (spec.kind, spec.rank, spec.factor) == ("lora", 2, 0.5)
    ```
"""

import difflib
import json
import pickle
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.lora.lycoris import Dora, LoCon, LoHa, LoKr, MagnitudeAxis
from refiners.fluxion.adapters.lora import Conv2dLora, LinearLora, Lora
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors

__all__ = [
    "LoraKind",
    "LoraSpec",
    "ParsedLoras",
    "UnmatchedLoraKeysError",
    "UnmatchedLoraKeysWarning",
    "KOHYA_PREFIXES",
    "parse_lora_file",
    "resolve",
    "flatten_name",
]

LoraKind = Literal["lora", "locon", "loha", "lokr"]
"""The kinds of update: a down/up pair (`lora`, a k x k `down` for a convolution), with a Tucker `mid` (`locon`),
a Hadamard product (`loha`), a Kronecker product (`lokr`). Any of them may carry a DoRA magnitude."""

KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
"""Kohya's name prefixes and the model components they stand for (`lora_te1_`/`lora_te2_` are SDXL's)."""

_LORA_ROLES = ("lora_down", "lora_up", "lora_mid")
_HADA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

# (suffix, role, layout), longest suffixes first where one ends another.
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_A.weight", "lora_down", "peft"),
    (".lora_B.weight", "lora_up", "peft"),
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".lora_down.weight", "lora_down", "lycoris"),
    (".lora_up.weight", "lora_up", "lycoris"),
    (".lora_mid.weight", "lora_mid", "lycoris"),
    (".dora_scale", "dora_scale", "lycoris"),
    *((f".{role}", role, "lycoris") for role in (*_HADA_ROLES, *_LOKR_ROLES)),
    (".lora_linear_layer.down.weight", "lora_down", "diffusers"),
    (".lora_linear_layer.up.weight", "lora_up", "diffusers"),
    (".lora.down.weight", "lora_down", "diffusers"),
    (".lora.up.weight", "lora_up", "diffusers"),
    # The attention processors' `to_q_lora.down.weight`: the `_lora` belongs to the role, `to_q` to the module.
    ("_lora.down.weight", "lora_down", "diffusers"),
    ("_lora.up.weight", "lora_up", "diffusers"),
)
_PEFT_PREFIX = "base_model.model."
_SELF_ATTENTION = re.compile(r"(^|\.)self_attn\.to_(q|k|v|out)$")
_METADATA_KEY = "lora_adapter_metadata"
_PEFT_FIELDS = frozenset({"r", "lora_alpha", "alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora"})
_MAX_LISTED = 20

_STRICT_HINT = "Check that the file is a LoRA for this model; pass strict=False to load the rest and only warn."
"""`UnmatchedLoraKeysError`'s hint in the Python API."""
_LENIENT_NOTE = "They are ignored (strict=False)."
"""`UnmatchedLoraKeysWarning`'s note in the Python API."""


def flatten_name(name: str) -> str:
    """A module name as kohya writes it: `.` replaced by `_`."""
    return name.replace(".", "_")


# -- the normalised form ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoraSpec:
    """One module's update, whatever the file's layout: its kind, its tensors under LyCORIS's names, its alpha.

    Args:
        kind: See `LoraKind`.
        tensors: By LyCORIS name: `lora_down`, `lora_up` (and `lora_mid`) for `lora` and `locon` (PEFT's
            `lora_A`, `lora_B`); `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` (and `hada_t1`, `hada_t2`);
            `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b` (and `lokr_t2`).
        alpha: With the rank, the factor `alpha / rank`; None where the file gives none (then alpha = rank).
        magnitude: DoRA's magnitude, one value per output row or input column of the weight; None for no DoRA.
        magnitude_axis: See `MagnitudeAxis`.
        keys: The file keys this spec was read from (empty for a spec built from a `Lora`).
    """

    kind: LoraKind
    tensors: Mapping[str, Tensor]
    alpha: float | None = None
    magnitude: Tensor | None = None
    magnitude_axis: MagnitudeAxis = "output"
    keys: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        """The inner size: of `lora_down` for a down/up pair, of the products for LoHa, of the factorised LoKr
        factor (`w2`'s if both are), 1 for a LoKr of two full factors."""
        tensors = self.tensors
        match self.kind:
            case "lora" | "locon":
                return tensors["lora_down"].shape[0]
            case "loha":
                return tensors["hada_w1_b"].shape[0]
            case "lokr":
                for role in ("lokr_w2_b", "lokr_w1_b"):
                    if role in tensors:
                        return tensors[role].shape[0]
                return 1

    @property
    def low_rank(self) -> bool:
        """Whether the update is built from low-rank factors: always but for a LoKr of two full factors, to which
        LyCORIS applies no alpha (its files' alphas are then ignored, and it has rank 1)."""
        return self.kind != "lokr" or "lokr_w1_b" in self.tensors or "lokr_w2_b" in self.tensors

    @property
    def factor(self) -> float:
        """`alpha / rank`: what the update is multiplied by at scale 1."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def to_lora(
        self,
        name: str,
        target: fl.WeightedModule,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Lora[Any]:
        """The fluxion `Lora` holding this update, fit to `target` (add it to a `LoraAdapter` on `target`).

        A 1x1 convolution's tensors fit a Linear and the other way round (diffusers' SD1 `proj_in` is a 1x1
        convolution, other implementations make it a Linear).

        Args:
            name: The LoRA's name in its adapter.
            target: The Linear or Conv2d it updates.
            scale: See `Lora`.
            device: Where its weights live; defaults to the target's device.
            dtype: Its weights' dtype; defaults to the target's dtype.

        Raises:
            ValueError: The tensors do not fit the target (the message names the file keys and both shapes).
        """
        if not isinstance(target, fl.Linear | fl.Conv2d):
            raise TypeError(
                f"cannot put the LoRA of {self._keys()} on {target.get_path()}: it is a {type(target).__name__}, "
                f"and LoRAs update Linear and Conv2d layers only"
            )
        device = target.device if device is None else device
        dtype = target.dtype if dtype is None else dtype
        weight_shape = tuple(target.weight.shape)
        tensors = {
            role: _fit_kernel(tensor.to(device, dtype), weight_shape) if role in _KERNELS else tensor.to(device, dtype)
            for role, tensor in self.tensors.items()
        }
        try:
            lora = self._build(name, tensors, weight_shape)
            lora.check_compatible(target)
            if self.magnitude is not None:
                lora = self._decompose(name, lora, weight_shape, device, dtype)
        except ValueError as error:
            raise ValueError(f"the LoRA of {self._keys()} does not fit {target.get_path()}: {error}") from error
        lora.scale = scale
        lora._follow(target)
        return lora

    def _build(self, name: str, tensors: dict[str, Tensor], weight_shape: tuple[int, ...]) -> Lora[Any]:
        match self.kind:
            case "lora":
                return Lora[Any].from_weights(name, tensors["lora_down"], tensors["lora_up"], self.alpha)
            case "locon":
                down, mid, up = tensors["lora_down"], tensors["lora_mid"], tensors["lora_up"]
                return LoCon.from_factors(name, down, mid, up, self.alpha)
            case "loha":
                w1_a, w1_b, w2_a, w2_b = (tensors[f"hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
                t1, t2 = tensors.get("hada_t1"), tensors.get("hada_t2")
                return LoHa.from_factors(name, weight_shape, w1_a, w1_b, w2_a, w2_b, t1, t2, self.alpha)
            case "lokr":
                factors = {role.removeprefix("lokr_"): tensor for role, tensor in tensors.items()}
                return LoKr.from_factors(name, weight_shape, factors, alpha=self.alpha)

    def _decompose(
        self,
        name: str,
        update: Lora[Any],
        weight_shape: tuple[int, ...],
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> Dora:
        assert self.magnitude is not None
        axis = self.magnitude_axis
        size = weight_shape[0 if axis == "output" else 1]
        if self.magnitude.numel() != size:
            raise ValueError(
                f"its DoRA magnitude has {self.magnitude.numel()} values, one per {axis} of the weight "
                f"{weight_shape} makes {size}"
            )
        dora = Dora(name, update, axis)
        with torch.no_grad():
            dora.magnitude.copy_(self.magnitude.reshape(-1).to(device, dtype))
        return dora

    def _keys(self) -> str:
        return ", ".join(self.keys) if self.keys else f"a {self.kind} spec"

    @staticmethod
    def from_lora(lora: Lora[Any]) -> "LoraSpec":
        """The spec of a fluxion `Lora` (`LinearLora`, `Conv2dLora`, `LoCon`, `LoHa`, `LoKr`, `Dora`), for export.

        The tensors are detached copies; the LoRA's scale is not part of a spec.
        """
        match lora:
            case Dora():
                spec = LoraSpec.from_lora(lora.update)
                magnitude = lora.magnitude.detach().clone()
                return LoraSpec(spec.kind, spec.tensors, lora.alpha, magnitude, lora.axis)
            case LoCon():
                weights = {"lora_down": lora.down.weight, "lora_mid": lora.mid.weight, "lora_up": lora.up.weight}
                return LoraSpec("locon", _copies(weights), lora.alpha)
            case LoHa():
                factors = {f"hada_{name}": factor for name, factor in lora.product.factors().items()}
                return LoraSpec("loha", _copies(factors), lora.alpha)
            case LoKr():
                factors = {f"lokr_{name}": factor for name, factor in lora.product.factors().items()}
                return LoraSpec("lokr", _copies(factors), lora.alpha)
            case LinearLora() | Conv2dLora():
                return LoraSpec("lora", _copies({"lora_down": lora.down.weight, "lora_up": lora.up.weight}), lora.alpha)
            case _:
                raise TypeError(f"no LoRA file layout for a {type(lora).__name__}")


def _copies(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {role: tensor.detach().clone() for role, tensor in tensors.items()}


# The tensors that are kernels for a convolution and matrices for a Linear.
_KERNELS = frozenset({"lora_down", "lora_up", "lokr_w2"})


def _fit_kernel(tensor: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
    """A 1x1 kernel for a Linear is a matrix, and a matrix for a 1x1 convolution is a 1x1 kernel."""
    if tensor.dim() == 4 and len(weight_shape) == 2 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor[:, :, 0, 0]
    if tensor.dim() == 2 and len(weight_shape) == 4 and weight_shape[2:] == (1, 1):
        return tensor[:, :, None, None]
    return tensor


@dataclass
class ParsedLoras:
    """What a LoRA file holds, before it meets a model (see `parse_lora_file`, then `resolve`).

    Args:
        specs: By module name as the file writes it: dotted (`unet.down_blocks.0....to_q`, with a component
            prefix or without), or kohya's flattened name (`lora_unet_down_blocks_0_..._to_q`).
        unused: The keys no spec uses, with the reason.
        layouts: The layouts seen, for reports: `peft` (`lora_A`...), `diffusers` (attention processors),
            `kohya` (flattened names), `lycoris` (LyCORIS's tensor names after dotted module names).
        metadata: The file's string metadata.
    """

    specs: dict[str, LoraSpec]
    unused: dict[str, str] = field(default_factory=dict[str, str])
    layouts: frozenset[str] = frozenset()
    metadata: dict[str, str] = field(default_factory=dict[str, str])


# -- reading ----------------------------------------------------------------------------------------------------


def parse_lora_file(
    source: str | Path | Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    network_alphas: Mapping[str, float] | None = None,
) -> ParsedLoras:
    """Read a LoRA file, or a state dict, in any of the layouts of this module's docstring.

    Args:
        source: A `.safetensors` file, a `.bin`/`.pt`/`.ckpt` file (read with `torch.load(weights_only=True)`), or
            a state dict.
        metadata: String metadata (a safetensors header's); for a file, it is merged over the file's own.
        network_alphas: Alphas that diffusers gives beside a state dict (`lora_state_dict`'s second value), by
            keys ending in `.alpha`.

    Raises:
        ValueError: The file is not a state dict of tensors.
    """
    file_metadata: dict[str, str] = {}
    if isinstance(source, Mapping):
        state_dict = dict(source)
    else:
        state_dict, file_metadata = _load(Path(source))
    file_metadata |= dict(metadata or {})
    for key, alpha in (network_alphas or {}).items():
        state_dict[key if key.endswith(".alpha") else f"{key}.alpha"] = torch.tensor(float(alpha))
    return _parse(state_dict, file_metadata)


def _load(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        return load_from_safetensors(path), load_metadata_from_safetensors(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such LoRA file: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} {_unpicklable(error)}; {_RESAVE}") from None
    except Exception as error:  # torch.load of a file it did not write fails in many ways (KeyError, EOFError...)
        raise ValueError(
            f"{path} cannot be read by torch.load ({_first_line(error)}): it is truncated, corrupted or not a "
            "PyTorch file; download or save it again"
        ) from None
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{path} holds a {type(loaded).__name__}, not a LoRA state dict (names to tensors): save the LoRA's "
            f"state dict, or convert the file to safetensors"
        )
    entries: dict[Any, Any] = dict(loaded)  # pyright: ignore[reportUnknownArgumentType]
    if others := [
        f"{key!r}: {type(value).__name__}" for key, value in entries.items() if not isinstance(value, Tensor)
    ]:
        raise ValueError(
            f"{path} holds a {type(loaded).__name__} with entries that are not tensors ({', '.join(others[:5])}), not "
            f"a LoRA state dict (names to tensors): {_RESAVE}"
        )
    return {str(key): value for key, value in entries.items()}, {}


_RESAVE = "re-save it with torch.save of a dict of tensors, or as .safetensors"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _unpicklable(error: pickle.UnpicklingError) -> str:
    """What `torch.load(weights_only=True)` refused, in words that do not invite running the pickle anyway."""
    # torch's message suggests `weights_only=False`, which would run whatever code the file holds.
    if (found := _UNSUPPORTED_GLOBAL.search(str(error))) is not None:
        return f"holds a Python object ({found.group(1)}) that is not a tensor: refusing to unpickle it"
    return "holds pickled Python objects that are not tensors: refusing to unpickle them"


def _first_line(error: Exception) -> str:
    """The error's type and first sentence, without torch's terminal colours."""
    text = _ANSI_ESCAPE.sub("", str(error)).strip()
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


@dataclass
class _Module:
    tensors: dict[str, Tensor] = field(default_factory=dict[str, Tensor])
    keys: dict[str, str] = field(default_factory=dict[str, str])  # role -> file key
    layouts: set[str] = field(default_factory=set[str])


def _split(key: str) -> tuple[str, str, str] | None:
    """`(module, role, layout)` of a file key, or None for a key of no LoRA layout."""
    for suffix, role, layout in _SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), role, layout
    if key.endswith(".alpha"):
        module = key.removesuffix(".alpha")
        # diffusers names an alpha after its down weight when it cannot cut a `.lora.`: `...to_q_lora.down.weight.alpha`.
        if (split := _split(module)) is not None:
            module = split[0]
        return module, "alpha", "alpha"
    return None


def _module_name(module: str) -> str:
    module = module.removeprefix(_PEFT_PREFIX)
    if _is_kohya(module):
        return module
    module = ".".join(part for part in module.split(".") if part != "processor")
    if (match := _SELF_ATTENTION.search(module)) is not None:
        return f"{module[: match.start()]}{match.group(1)}self_attn.{match.group(2)}_proj"
    if module.endswith(".to_out") or module == "to_out":
        return f"{module}.0"
    return module


def _is_kohya(name: str) -> bool:
    return "." not in name and name.startswith(tuple(KOHYA_PREFIXES))


def _parse(state_dict: dict[str, Tensor], metadata: dict[str, str]) -> ParsedLoras:
    modules: dict[str, _Module] = defaultdict(_Module)
    unused: dict[str, str] = {}
    for key, tensor in state_dict.items():
        split = _split(key)
        if split is None:
            reason = (
                "LoRA biases (PEFT's `lora_bias`) are not supported"
                if re.search(r"\.lora_[AB]\.bias$", key)
                else "no LoRA layout names a tensor like this (unknown suffix)"
            )
            unused[key] = reason
            continue
        module, role, layout = split
        name = _module_name(module)
        entry = modules[name]
        if role in entry.tensors:
            unused[key] = f"{entry.keys[role]} already gives the {role} of this module"
            continue
        entry.tensors[role] = tensor
        entry.keys[role] = key
        entry.layouts.add("kohya" if _is_kohya(name) else layout)
    peft_config = _peft_config(metadata)
    specs: dict[str, LoraSpec] = {}
    for name, entry in modules.items():
        spec_or_reason = _spec(name, entry, peft_config)
        if isinstance(spec_or_reason, str):
            unused |= dict.fromkeys(entry.keys.values(), spec_or_reason)
        else:
            specs[name] = spec_or_reason
    layouts = frozenset(layout for entry in modules.values() for layout in entry.layouts if layout != "alpha")
    return ParsedLoras(specs, unused, layouts, metadata)


def _spec(name: str, entry: _Module, peft_config: dict[str | None, dict[str, Any]]) -> LoraSpec | str:
    """The spec of one module's tensors, or why they make none."""
    tensors = entry.tensors
    roles = set(tensors)
    families = [
        family
        for family, family_roles in (("lora", _LORA_ROLES), ("loha", _HADA_ROLES), ("lokr", _LOKR_ROLES))
        if roles & set(family_roles)
    ]
    if not families:
        return f"{', '.join(sorted(roles))} without the weights of a LoRA"
    if len(families) > 1:
        return f"the tensors of several kinds of LoRA ({', '.join(families)}) for one module"
    weights = {role: tensor for role, tensor in tensors.items() if role not in ("alpha", "magnitude", "dora_scale")}
    kind: LoraKind
    match families[0]:
        case "lora":
            kind = "locon" if "lora_mid" in weights else "lora"
            missing = {"lora_down", "lora_up"} - roles
        case "loha":
            kind = "loha"
            missing = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - roles
            if ("hada_t1" in roles) != ("hada_t2" in roles):
                missing |= {"hada_t1", "hada_t2"} - roles
        case _:
            kind = "lokr"
            missing = set[str]()
            for part in ("w1", "w2"):
                if f"lokr_{part}" not in roles and not {f"lokr_{part}_a", f"lokr_{part}_b"} <= roles:
                    missing.add(f"lokr_{part} (or lokr_{part}_a and lokr_{part}_b)")
    if missing:
        return f"incomplete {kind}: no {', '.join(sorted(missing))} beside {', '.join(sorted(roles))}"
    if (reason := _shape_problem(kind, weights)) is not None:
        return reason
    spec = LoraSpec(kind, weights, keys=tuple(entry.keys.values()))
    alpha = _alpha(name, entry, spec, peft_config)
    magnitude, axis = None, "output"
    if "magnitude" in tensors and "dora_scale" in tensors:
        return "two DoRA magnitudes (lora_magnitude_vector and dora_scale)"
    if "magnitude" in tensors:
        # PEFT's lora_magnitude_vector is per output row, also where it is shaped (1, out, 1, 1) for a convolution.
        magnitude = tensors["magnitude"].reshape(-1)
    elif "dora_scale" in tensors:
        magnitude, axis = _dora_scale(tensors["dora_scale"])
    return LoraSpec(kind, weights, alpha, magnitude, axis, spec.keys)


def _shape_problem(kind: LoraKind, weights: dict[str, Tensor]) -> str | None:
    shapes = ", ".join(f"{role} {tuple(tensor.shape)}" for role, tensor in weights.items())
    match kind:
        case "lora" | "locon":
            down, up = weights["lora_down"], weights["lora_up"]
            rank_in_up = up.shape[1] if up.dim() >= 2 else -1
            if down.dim() < 2 or down.dim() != up.dim() or down.shape[0] != rank_in_up:
                return f"lora_down and lora_up disagree on the rank: {shapes}"
            if kind == "locon" and tuple(weights["lora_mid"].shape[:2]) != (down.shape[0], down.shape[0]):
                return f"lora_mid is not a core between ranks: {shapes}"
        case "loha":
            if weights["hada_w1_b"].shape[0] != weights["hada_w2_b"].shape[0] or any(
                tensor.dim() < 2 for tensor in weights.values()
            ):
                return f"the two Hadamard factors disagree: {shapes}"
        case "lokr":
            if any(tensor.dim() < 2 for tensor in weights.values()):
                return f"LoKr factors are matrices or kernels: {shapes}"
    return None


def _dora_scale(dora_scale: Tensor) -> tuple[Tensor, MagnitudeAxis]:
    """LyCORIS's `dora_scale` is `(out, 1, ...)` per output row (`wd_on_out`) or `(1, in, ...)` per input column."""
    if dora_scale.dim() >= 2 and dora_scale.shape[0] == 1 and dora_scale.numel() > 1:
        return dora_scale.reshape(-1), "input"
    return dora_scale.reshape(-1), "output"


def _alpha(name: str, entry: _Module, spec: LoraSpec, peft_config: dict[str | None, dict[str, Any]]) -> float | None:
    """The alpha of an `.alpha` key, else of PEFT's metadata (as `factor * rank`), else None (alpha = rank)."""
    if "alpha" in entry.tensors:
        if not spec.low_rank:
            # LyCORIS applies alpha / rank to a LoKr only when one of its factors is a low-rank product.
            return None
        return float(entry.tensors["alpha"].float().item())
    if _is_kohya(name):
        return None
    component, _, module = name.partition(".")
    config = peft_config.get(component)
    if config is None:
        config = peft_config.get(None)
    if config is None:
        return None
    configured_alpha = config.get("lora_alpha", config.get("alpha"))
    if configured_alpha is None:
        return None
    names = (module, name)
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, names, configured_alpha))
    configured_rank = float(_pattern_value(config.get("rank_pattern") or {}, names, config.get("r", spec.rank)))
    # PEFT scales by alpha / r, with r from its config (which only a LoKr of full factors may not store).
    scaling = alpha / (configured_rank**0.5 if config.get("use_rslora") else configured_rank)
    return scaling * spec.rank


def _pattern_value(patterns: Mapping[str, Any], names: tuple[str, ...], default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module name at a dot (the name is
    tried without its component, as PEFT sees it, then with it)."""
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return value
    return default


def _peft_config(metadata: Mapping[str, str]) -> dict[str | None, dict[str, Any]]:
    """PEFT's LoraConfig fields from `lora_adapter_metadata`, by component (`unet.r`) or for all (`r`)."""
    raw = metadata.get(_METADATA_KEY)
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"the file's {_METADATA_KEY} is not JSON ({error}): {raw[:200]!r}") from error
    if not isinstance(fields, dict):
        raise ValueError(f"the file's {_METADATA_KEY} is not a JSON object: {raw[:200]!r}")
    config: dict[str | None, dict[str, Any]] = defaultdict(dict)
    for key, value in fields.items():  # pyright: ignore[reportUnknownVariableType]
        component, _, field_name = str(key).rpartition(".")  # pyright: ignore[reportUnknownArgumentType]
        if field_name in _PEFT_FIELDS:
            config[component or None][field_name] = value
    return dict(config)


# -- matching a model ------------------------------------------------------------------------------------------


class UnmatchedLoraKeysError(ValueError):
    """LoRA tensors that match no module of the model, or that no spec uses.

    The message is the report, then the hint: what to do, in the Python API's words (`strict=False`). A front end
    with its own words for it (`refiners-convert lora --lenient`) prints `report` with its own hint.

    Args:
        report: The tensors that cannot be used, with why and what the model has near them, one line each.
        unmatched: Each unusable file key, with why and what the model has near it.
        hint: What to do about it.
    """

    def __init__(self, report: str, unmatched: dict[str, str], hint: str = _STRICT_HINT) -> None:
        super().__init__(report, unmatched, hint)
        self.report = report
        self.unmatched = unmatched
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.report}\n{self.hint}"


class UnmatchedLoraKeysWarning(UserWarning):
    """`resolve(..., strict=False)`: the same report as `UnmatchedLoraKeysError`, the rest being loaded.

    Args:
        report: See `UnmatchedLoraKeysError`.
        unmatched: See `UnmatchedLoraKeysError`.
        note: What became of them, in the Python API's words (`strict=False`); a front end prints `report` with its
            own.
    """

    def __init__(self, report: str, unmatched: dict[str, str], note: str = _LENIENT_NOTE) -> None:
        super().__init__(report, unmatched, note)
        self.report = report
        self.unmatched = unmatched
        self.note = note

    def __str__(self) -> str:
        return f"{self.report}\n{self.note}"


def resolve(
    parsed: ParsedLoras,
    module_names: Iterable[str],
    aliases: Callable[[str], Iterable[str]] | None = None,
    strict: bool = True,
) -> dict[str, LoraSpec]:
    """Match each spec of `parsed` with a module of the model, by name.

    Module names are dotted with a component first (`unet.down_blocks.0.attentions.0.proj_in`,
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`). A kohya name matches the module whose name,
    flattened, is the same in the component of its prefix (see `KOHYA_PREFIXES`); a dotted name matches the module of
    that name, or, without a component, the one module of any component that has it.

    Args:
        parsed: The file's specs.
        module_names: The modules of the model a LoRA may update.
        aliases: Other names of a module under which files may know it (e.g. the original Stable Diffusion name of
            a diffusers module, `unet.input_blocks.1.1.proj_in` for `unet.down_blocks.0.attentions.0.proj_in`),
            with their component.
        strict: Raise `UnmatchedLoraKeysError` if any tensor is unused; when False, warn with the same report
            (`UnmatchedLoraKeysWarning`) and return what matched.

    Returns:
        The specs by module name of the model.
    """
    index = _Index(module_names, aliases)
    resolved: dict[str, LoraSpec] = {}
    claimed: dict[str, str] = {}
    unmatched: dict[str, str] = dict(parsed.unused)
    groups: list[tuple[list[str], str]] = [([key], reason) for key, reason in parsed.unused.items()]
    for name, spec in parsed.specs.items():
        match, problem = index.find(name)
        if match is not None and match in claimed:
            match, problem = None, f"{claimed[match]!r} already updates {match}"
        if match is None:
            keys = list(spec.keys) or [name]
            unmatched |= dict.fromkeys(keys, problem)
            groups.append((keys, problem))
            continue
        claimed[match] = name
        resolved[match] = spec
    if unmatched:
        report = _report(groups, len(unmatched))
        if strict:
            raise UnmatchedLoraKeysError(report, unmatched)
        warnings.warn(UnmatchedLoraKeysWarning(report, unmatched), stacklevel=2)
    return resolved


def _canonical(rest: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model` wrapper, which files written before keep (and the other way
    # round): a name means the same module with or without it.
    return rest.removeprefix("text_model.").removeprefix("text_model_")


class _Index:
    def __init__(self, module_names: Iterable[str], aliases: Callable[[str], Iterable[str]] | None) -> None:
        self.dotted: dict[str, set[str]] = defaultdict(set)
        self.flat: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.components: set[str] = set()
        for module in module_names:
            self.components.add(module.partition(".")[0])
            for known_as in (module, *(aliases(module) if aliases is not None else ())):
                component, _, rest = known_as.partition(".")
                self.dotted[f"{component}.{_canonical(rest)}"].add(module)
                self.flat[component, _canonical(flatten_name(rest))].add(module)

    def find(self, name: str) -> tuple[str | None, str]:
        """The module `name` stands for, or None and why."""
        head, _, rest = name.partition(".")
        if _is_kohya(name):
            prefix = next(prefix for prefix in KOHYA_PREFIXES if name.startswith(prefix))
            component, flat = KOHYA_PREFIXES[prefix], _canonical(name.removeprefix(prefix))
            found = self.flat.get((component, flat), set())
            what = f"no module of {component!r} is named {flat!r} once flattened"
        elif head in self.components:
            component, flat = head, _canonical(flatten_name(rest))
            found = self.dotted.get(f"{head}.{_canonical(rest)}", set())
            what = f"the model has no module {name!r}"
        else:
            component, flat = None, _canonical(flatten_name(name))
            found = {module for c in self.components for module in self.dotted.get(f"{c}.{_canonical(name)}", set())}
            what = f"no component of the model ({', '.join(sorted(self.components))}) has a module {name!r}"
        if len(found) == 1:
            return next(iter(found)), ""
        if len(found) > 1:
            return None, f"{name!r} could be any of {sorted(found)}"
        return None, f"{what}; nearest: {', '.join(self.near(component, flat)) or 'none'}"

    def near(self, component: str | None, flat: str) -> list[str]:
        candidates = {key: modules for key, modules in self.flat.items() if component is None or key[0] == component}
        by_flat: dict[str, set[str]] = defaultdict(set)
        for (_, rest), modules in candidates.items():
            by_flat[rest] |= modules
        close = difflib.get_close_matches(flat, list(by_flat), n=3, cutoff=0.5)
        return sorted({module for rest in close for module in by_flat[rest]})


def _report(groups: list[tuple[list[str], str]], count: int) -> str:
    lines = [f"{count} tensor(s) of the LoRA file cannot be used:"]
    for keys, reason in groups[:_MAX_LISTED]:
        lines.append(f"  - {', '.join(keys)}: {reason}")
    if len(groups) > _MAX_LISTED:
        rest = sum(len(keys) for keys, _ in groups[_MAX_LISTED:])
        lines.append(f"  ... and {len(groups) - _MAX_LISTED} more module(s) ({rest} tensor(s))")
    return "\n".join(lines)
