"""LoRAs on Stable Diffusion 1.x: any community file, several at once, scales per LoRA and per block, exact fuse.

A LoRA file names the modules it updates after diffusers' UNet and transformers' CLIP text model (PEFT, diffusers,
kohya, LyCORIS: see `refiners.adapters.lora.formats`), or after the original Stable Diffusion code (`input_blocks`,
in some kohya files). Those names are matched with the layers of the live model through the name maps of
`refiners.foundationals` (`diffusers_unet_modules`, `transformers_clip_text_modules`, `ldm_unet_renaming`), never by
the order of the tensors in the file; every tensor is either used or reported.

- `SD1LoraAdapter`: one file, injected and ejected as a whole (the seed README's Hello World).
- `SDLoraManager`: many LoRAs by name on the same layers, their scales (per LoRA, per component, per block),
  include/exclude filters, fuse/unfuse, export.
- `convert_sd1_lora`: normalise any file into the refiners layout (or write it as PEFT/diffusers or kohya).

Module names are diffusers' with the component first: `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`.

Example:
    ```py
    import torch
    from refiners.adapters.lora import SDLoraManager
    from refiners.foundationals.clip import CLIPTextEncoder
    from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet, StableDiffusion_1

    sd = StableDiffusion_1(
        unet=SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=32),
        lda=LatentDiffusionAutoencoder(0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        clip_text_encoder=CLIPTextEncoder(embedding_dim=32, num_layers=1, num_attention_heads=4, feedforward_dim=64),
    )
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    style = {  # a kohya file: flattened names, alpha / rank = 0.5
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0),
    }
    manager = SDLoraManager(sd)
    manager.add_loras("style", style, scale=0.8)
    manager.add_loras("subject", {f"{to_q}.lora_A.weight": torch.randn(2, 32), f"{to_q}.lora_B.weight": torch.randn(32, 2)})
    assert manager.names == ["style", "subject"] and manager.scales == {"style": 0.8, "subject": 1.0}
    manager.set_block_scales("style", {"unet.down_blocks": 0.5})
    assert manager.get_loras("style")[to_q].scale == 0.8 * 0.5
    manager.fuse()
    manager.remove_all()
    assert manager.names == []
    ```
"""

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.lora.export import KohyaBaseModel, save_kohya_lora, save_peft_lora, save_refiners_lora
from refiners.adapters.lora.formats import LoraSpec, ParsedLoras, parse_lora_file, resolve
from refiners.fluxion.adapters.lora import Lora, LoraAdapter
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, CLIPTextEncoderL
from refiners.foundationals.clip.text_encoder_names import transformers_clip_text_modules
from refiners.foundationals.latent_diffusion.model import LatentDiffusionModel
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL
from refiners.foundationals.latent_diffusion.unet_names import diffusers_unet_modules, ldm_unet_renaming

__all__ = [
    "LoraLayout",
    "LoraSource",
    "sd1_lora_targets",
    "sd1_module_aliases",
    "lora_targets",
    "module_aliases",
    "SDLoraAdapter",
    "SD1LoraAdapter",
    "SDXLLoraAdapter",
    "SDLoraManager",
    "convert_sd1_lora",
]

LoraSource = str | Path | Mapping[str, Tensor] | ParsedLoras
"""A LoRA: a file (`.safetensors`, or `.bin`/`.pt`/`.ckpt` read with `torch.load(weights_only=True)`), a state dict,
or a file already read by `parse_lora_file`."""

LoraLayout = Literal["refiners", "peft", "kohya"]
"""The layouts LoRAs are written in: refiners' (dotted names, LyCORIS tensor names, every alpha), PEFT/diffusers'
(`lora_A`/`lora_B` with `lora_adapter_metadata`, what `load_lora_weights` reads), kohya's (A1111, ComfyUI)."""

Targetable = fl.Linear | fl.Conv2d
StableDiffusion = LatentDiffusionModel[Any, Any]
"""Any Stable Diffusion family's pipeline (`StableDiffusion_1`, `StableDiffusion_XL` and their variants)."""


def sd1_lora_targets(unet: SD1UNet, text_encoder: CLIPTextEncoder | None = None) -> dict[str, Targetable]:
    """The layers a LoRA may update, by diffusers' module name with the component first.

    Derived from the live models: a layer wrapped in a `LoraAdapter` keeps its name.

    Args:
        unet: The UNet (`unet.*` names).
        text_encoder: The text encoder (`text_encoder.*` names), if any.
    """
    modules: dict[str, Targetable] = {
        f"unet.{name}": module
        for name, module in diffusers_unet_modules(unet).items()
        if isinstance(module, Targetable)
    }
    if text_encoder is not None:
        modules |= {
            f"text_encoder.{name}": module
            for name, module in transformers_clip_text_modules(text_encoder).items()
            if isinstance(module, Targetable)
        }
    return modules


def sd1_module_aliases() -> Callable[[str], Iterable[str]]:
    """The other names of the modules of `sd1_lora_targets` that files use: the original Stable Diffusion UNet's
    (`unet.input_blocks.1.1.proj_in` for `unet.down_blocks.0.attentions.0.proj_in`), for `resolve`."""
    renaming = ldm_unet_renaming()

    def aliases(module: str) -> Iterator[str]:
        component, _, name = module.partition(".")
        if component == "unet" and (original := renaming.to_original(name)) is not None and original != name:
            yield f"unet.{original}"

    return aliases


def _parsed(source: LoraSource) -> ParsedLoras:
    return source if isinstance(source, ParsedLoras) else parse_lora_file(source)


def _matches(module: str, pattern: str) -> bool:
    """Whether `pattern` selects `module`: the name itself, a prefix of it at a dot, or a glob (`*.attn2.*`)."""
    return module == pattern or module.startswith(f"{pattern}.") or fnmatch.fnmatchcase(module, pattern)


def _check_patterns(patterns: Iterable[str], modules: Iterable[str], what: str) -> None:
    modules = list(modules)
    unknown = [pattern for pattern in patterns if not any(_matches(module, pattern) for module in modules)]
    if unknown:
        examples = sorted({".".join(module.split(".")[:2]) for module in modules})
        raise ValueError(
            f"{what} {unknown} select(s) no layer of the model. Use module names with the component first, or their "
            f"prefixes (e.g. {', '.join(examples[:8])}), or globs (e.g. 'unet.*.attn2.*')."
        )


def _adapters_of(layer: Targetable) -> list[LoraAdapter]:
    """The `LoraAdapter`s wrapping `layer`, innermost first (several may be stacked on one layer)."""
    adapters: list[LoraAdapter] = []
    parent = layer.parent
    while isinstance(parent, LoraAdapter) and parent.target is layer:
        adapters.append(parent)
        parent = parent.parent
    return adapters


def _loras_named(modules: Mapping[str, Targetable], name: str) -> dict[str, tuple[LoraAdapter, Lora[Any]]]:
    found: dict[str, tuple[LoraAdapter, Lora[Any]]] = {}
    for module, layer in modules.items():
        for adapter in _adapters_of(layer):
            if (lora := adapter.loras.get(name)) is not None:
                found[module] = (adapter, lora)
    return found


def _lora_names(modules: Mapping[str, Targetable]) -> list[str]:
    names: dict[str, None] = {}
    for layer in modules.values():
        for adapter in _adapters_of(layer):
            names |= dict.fromkeys(adapter.loras)
    return list(names)


def _check_new_name(name: str, modules: Mapping[str, Targetable]) -> None:
    if name in _lora_names(modules):
        raise ValueError(
            f"a LoRA named {name!r} is already on the model: remove it first (`remove_loras({name!r})`), or give "
            f"this one another name"
        )


def _build(
    name: str,
    specs: Mapping[str, LoraSpec],
    modules: Mapping[str, Targetable],
    scales: Mapping[str, float],
    own: bool = True,
) -> dict[str, Lora[Any]]:
    """The fluxion LoRAs of `specs`, each fit to its layer; all are built before any is injected.

    With `own`, the LoRAs hold copies of the specs' tensors; without, they may hold the tensors themselves (those
    of a file read here: safetensors maps them copy-on-write, so a LoRA trained later never writes to the file).
    """
    return {module: _to_lora(spec, name, modules[module], scales[module], own) for module, spec in specs.items()}


def _to_lora(spec: LoraSpec, name: str, layer: Targetable, scale: float, own: bool) -> Lora[Any]:
    """`spec.to_lora`, without initialising weights that the file's then overwrite, for the down/up kind.

    The LoRA is built (and checked against its layer) on the "meta" device, then given the file's tensors on the
    layer's device and in its dtype: nothing is initialised, and nothing is copied that need not be (as diffusers'
    `low_cpu_mem_usage` loading does).
    """
    if spec.kind != "lora" or spec.is_dora:
        return spec.to_lora(name, layer, scale=scale)
    lora = spec.to_lora(name, layer, scale=scale, device="meta")
    for projection, role in ((lora.down, "lora_down"), (lora.up, "lora_up")):
        tensor = spec.tensors[role].to(device=layer.device, dtype=layer.dtype, copy=own)
        projection.weight = torch.nn.Parameter(tensor.reshape(projection.weight.shape))
    return lora


def _attach(layer: Targetable, lora: Lora[Any]) -> None:
    adapters = _adapters_of(layer)
    if adapters:
        adapters[0].add_lora(lora)
    else:
        LoraAdapter(layer, lora).inject()


def _detach(adapter: LoraAdapter, name: str) -> None:
    adapter.remove_lora(name)
    if not adapter.loras:
        # The last LoRA of the layer is gone: put the layer back where it was.
        adapter.eject()


def _check_model(target: StableDiffusion) -> None:
    if not isinstance(target, LatentDiffusionModel):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(
            f"expected a Stable Diffusion model (StableDiffusion_1, StableDiffusion_XL...), got a {type(target).__name__}"
        )


def lora_targets(target: StableDiffusion) -> dict[str, Targetable]:
    """The layers of a Stable Diffusion model a LoRA may update, by diffusers' module name with the component first.

    The family names them (`LatentDiffusionModel.diffusers_modules`): `unet.*`, `text_encoder.*`, and
    `text_encoder_2.*` for SDXL. Derived from the live model: a layer wrapped in a `LoraAdapter` keeps its name.

    Args:
        target: The model.
    """
    _check_model(target)
    return {name: module for name, module in target.diffusers_modules().items() if isinstance(module, Targetable)}


def module_aliases(target: StableDiffusion) -> Callable[[str], Iterable[str]]:
    """The other names files use for the modules of `lora_targets`: the original layout's (`unet.input_blocks.1.1.proj_in`
    for `unet.down_blocks.0.attentions.0.proj_in`, SGM's for SDXL), for `resolve`.

    Args:
        target: The model.
    """
    renamings = target.original_renamings()

    def aliases(module: str) -> Iterator[str]:
        component, _, name = module.partition(".")
        renaming = renamings.get(component)
        if renaming is not None and (original := renaming.to_original(name)) is not None and original != name:
            yield f"{component}.{original}"

    return aliases


def _text_width(parsed: ParsedLoras) -> int | None:
    """The width of the text embedding the file's cross-attention keys read, if it has one."""
    for module, spec in parsed.specs.items():
        flat = module.replace(".", "_")
        if flat.endswith("attn2_to_k") and (down := spec.tensors.get("lora_down")) is not None and down.dim() == 2:
            return down.shape[1]
    return None


def _check_text_width(parsed: ParsedLoras, target: StableDiffusion) -> None:
    """Refuse a LoRA made for another family, by the width of the text its cross-attention reads."""
    width, expected = _text_width(parsed), target.unet.context_embedding_dim
    if width is not None and width != expected:
        families = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}
        made_for = families.get(width, "another model")
        raise ValueError(
            f"this LoRA is for {made_for}: its cross-attention reads {width}-wide text embeddings, but "
            f"{type(target).__name__}'s reads {expected}-wide ones. Load it on a {made_for} model."
        )


class SDLoraAdapter:
    """One LoRA file on a Stable Diffusion model: `inject` puts all its LoRAs in, `eject` takes them out.

    `SD1LoraAdapter` and `SDXLLoraAdapter` are its names for each family (they check the model's family).

    Its LoRAs are built (and the file checked) when the adapter is built; the model is untouched until `inject`.
    For several LoRAs at once, per-block scales and export, use `SDLoraManager` (which sees this adapter's LoRA
    by its name).

    Args:
        target: The model (`StableDiffusion_1` and its variants).
        specs: The LoRA of each layer, by module name (see `sd1_lora_targets`), e.g. from `resolve`.
        name: The LoRA's name in its `LoraAdapter`s, distinct from the other LoRAs on the model.
        scale: How much of the LoRA to apply.
        own: Give the LoRAs copies of the specs' tensors (without, they may share them).

    Example:
        ```py
        import torch
        from refiners.adapters.lora import SD1LoraAdapter
        from refiners.fluxion.utils import save_to_safetensors
        from refiners.foundationals.clip import CLIPTextEncoder
        from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet, StableDiffusion_1

        sd15 = StableDiffusion_1(
            unet=SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=32),
            lda=LatentDiffusionAutoencoder(0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1),
            clip_text_encoder=CLIPTextEncoder(embedding_dim=32, num_layers=1, num_attention_heads=4, feedforward_dim=64),
        )
        q_proj = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        tensors = {f"{q_proj}.lora_A.weight": torch.randn(4, 32), f"{q_proj}.lora_B.weight": torch.randn(32, 4)}
        save_to_safetensors("/tmp/pokemon_lora.safetensors", tensors)
        lora = SD1LoraAdapter.from_safetensors(target=sd15, checkpoint_path="/tmp/pokemon_lora.safetensors", scale=1.0)
        lora.inject()
        assert lora.name == "pokemon_lora" and lora.is_injected
        lora.eject()
        ```
    """

    def __init__(
        self, target: StableDiffusion, specs: Mapping[str, LoraSpec], name: str, scale: float = 1.0, own: bool = True
    ) -> None:
        self._check_family(target)
        modules = lora_targets(target)
        unknown = sorted(set(specs) - set(modules))
        if unknown:
            raise ValueError(
                f"{len(unknown)} module name(s) are not layers of the model a LoRA can update: {unknown[:10]}. Name "
                f"them as `lora_targets` does (or read the file with `{type(self).__name__}.from_safetensors`)."
            )
        if not specs:
            raise ValueError(f"LoRA {name!r} updates no layer: there is nothing to inject")
        self.target = target
        self.name = name
        self._scale = float(scale)
        self._layers = {module: modules[module] for module in specs}
        self._loras = _build(name, specs, modules, dict.fromkeys(specs, self._scale), own=own)
        self._injected = False

    @classmethod
    def from_safetensors(
        cls,
        target: StableDiffusion,
        checkpoint_path: str | Path,
        scale: float = 1.0,
        name: str | None = None,
        strict: bool = True,
    ) -> Self:
        """Read a LoRA file of any layout (see `refiners.adapters.lora.formats`) for `target`.

        Args:
            target: The model.
            checkpoint_path: A `.safetensors` file, or a `.bin`/`.pt` one (read with `torch.load(weights_only=True)`).
            scale: How much of the LoRA to apply.
            name: The LoRA's name (default: the file's name without its extension).
            strict: Raise `UnmatchedLoraKeysError` on a tensor the model has no use for; when False, warn and
                load the rest.
        """
        cls._check_family(target)
        path = Path(checkpoint_path)
        parsed = parse_lora_file(path)
        _check_text_width(parsed, target)
        specs = resolve(parsed, lora_targets(target), aliases=module_aliases(target), strict=strict)
        return cls(target, specs, name=path.stem if name is None else name, scale=scale, own=False)

    family: ClassVar[type[LatentDiffusionModel[Any, Any]]] = LatentDiffusionModel
    """The models this adapter is for."""

    @classmethod
    def _check_family(cls, target: StableDiffusion) -> None:
        _check_model(target)
        if not isinstance(target, cls.family):
            raise TypeError(
                f"{cls.__name__} is for {cls.family.__name__} models, got a {type(target).__name__}: use the adapter "
                "of its family (SD1LoraAdapter, SDXLLoraAdapter) or SDLoraAdapter"
            )

    @property
    def loras(self) -> dict[str, Lora[Any]]:
        """The LoRA of each layer, by module name."""
        return dict(self._loras)

    @property
    def is_injected(self) -> bool:
        return self._injected

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = float(value)
        for lora in self._loras.values():
            lora.scale = self._scale

    def inject(self) -> Self:
        """Put the LoRAs on their layers (in a `LoraAdapter` per layer, shared with the other LoRAs on it)."""
        if self._injected:
            raise ValueError(f"LoRA {self.name!r} is already injected; eject it first")
        _check_new_name(self.name, lora_targets(self.target))
        for module, lora in self._loras.items():
            layer = self._layers[module]
            # The model may have moved since the LoRAs were built: they follow it.
            lora.to(device=layer.device, dtype=layer.dtype)
            _attach(layer, lora)
        self._injected = True
        return self

    def eject(self) -> None:
        """Take the LoRAs out (unfused first if needed): the model is as it was before `inject`."""
        if not self._injected:
            raise ValueError(f"LoRA {self.name!r} is not injected: nothing to eject")
        adapters: list[LoraAdapter] = []
        for module, lora in self._loras.items():
            adapter = lora.parent
            if not isinstance(adapter, LoraAdapter):
                raise RuntimeError(
                    f"the LoRA {self.name!r} of {module} was taken out of the model by other means "
                    f"(e.g. `SDLoraManager.remove_loras`): eject nothing, or remove the rest the same way"
                )
            adapters.append(adapter)
        for adapter in adapters:
            _detach(adapter, self.name)
        self._injected = False


class SDLoraManager:
    """Many LoRAs by name on a Stable Diffusion 1.x model, with their scales; fuse, unfuse and export them.

    LoRAs on the same layer share its `LoraAdapter`, each with its own scale. The LoRA of a layer runs at
    `scale * block scale`, where the block scale is the value of the last selector of `set_block_scales` that
    selects the layer (1 if none): per component (`text_encoder`, `unet`), per part of the UNet (`unet.down_blocks`,
    `unet.mid_block`, `unet.up_blocks`), per block (`unet.up_blocks.1`, or one transformer,
    `unet.up_blocks.1.attentions.2`), per layer, or by glob (`unet.*.attn2.*`). Changing scales needs no reload:
    switch between loaded LoRAs by setting their scales.

    The manager reads the model: its `names` are those of every LoRA on the model's layers, whoever put them there
    (an `SD1LoraAdapter`, a training loop).

    Args:
        target: The model (`StableDiffusion_1` and its variants).
    """

    def __init__(self, target: StableDiffusion) -> None:
        _check_model(target)
        self.target = target
        self._scales: dict[str, float] = {}
        self._block_scales: dict[str, dict[str, float]] = {}
        self._modules: tuple[tuple[torch.nn.Module, torch.nn.Module], dict[str, Targetable]] | None = None

    @property
    def modules(self) -> dict[str, Targetable]:
        """The layers a LoRA may update, by module name (see `lora_targets`)."""
        components = (self.target.unet, self.target.clip_text_encoder)
        # Walking the model takes longer than what most calls do: the map is kept until a component is replaced.
        if self._modules is None or any(a is not b for a, b in zip(self._modules[0], components, strict=True)):
            self._modules = (components, lora_targets(self.target))
        return dict(self._modules[1])

    @property
    def names(self) -> list[str]:
        """The names of the LoRAs on the model, in the order they were added."""
        return _lora_names(self.modules)

    @property
    def scales(self) -> dict[str, float]:
        """The scale of each LoRA (without its block scales)."""
        modules = self.modules
        names = _lora_names(modules)
        # Forget what was recorded of LoRAs taken out by other means (e.g. `LoraAdapter.remove_lora`).
        self._scales = {name: scale for name, scale in self._scales.items() if name in names}
        self._block_scales = {name: blocks for name, blocks in self._block_scales.items() if name in names}
        return {name: self._scale_of(name, modules) for name in names}

    def block_scales(self, name: str) -> dict[str, float]:
        """The block scales of the LoRA `name` (see `set_block_scales`)."""
        self._loras(name, self.modules)
        return dict(self._block_scales.get(name, {}))

    def get_loras(self, name: str) -> dict[str, Lora[Any]]:
        """The fluxion LoRAs of `name`, by module name."""
        return {module: lora for module, (_, lora) in self._loras(name, self.modules).items()}

    @property
    def fused(self) -> list[str]:
        """The names of the LoRAs folded into the weights (see `fuse`)."""
        modules = self.modules
        return [
            name
            for name in _lora_names(modules)
            if any(lora.is_fused for _, lora in _loras_named(modules, name).values())
        ]

    def add_loras(
        self,
        name: str,
        tensors_or_path: LoraSource,
        scale: float = 1.0,
        *,
        block_scales: Mapping[str, float] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        strict: bool = True,
    ) -> None:
        """Load a LoRA of any layout (see `refiners.adapters.lora.formats`) under `name`.

        Every tensor is used or reported; the file is checked and all LoRAs are built before the model changes.

        Args:
            name: The LoRA's name, distinct from those of the other LoRAs on the model.
            tensors_or_path: The file, state dict or parsed file.
            scale: How much of the LoRA to apply.
            block_scales: Multipliers of `scale` per component, block or layer (see `set_block_scales`).
            include: Load only the LoRAs of the layers these select (module names, prefixes at a dot, or globs).
            exclude: Do not load the LoRAs of the layers these select (they are skipped, not reported).
            strict: Raise `UnmatchedLoraKeysError` on a tensor the model has no use for; when False, warn and load
                the rest.

        Raises:
            UnmatchedLoraKeysError: Tensors that match no layer, listed with the layers near them.
            ValueError: The name is taken, a pattern selects no layer, nothing is left to load, or a LoRA does not
                fit its layer.
        """
        modules = self.modules
        _check_new_name(name, modules)
        for what, patterns in (("include", include), ("exclude", exclude), ("block_scales", block_scales)):
            _check_patterns(patterns or (), modules, what)
        parsed = _parsed(tensors_or_path)
        _check_text_width(parsed, self.target)
        specs = resolve(parsed, modules, aliases=module_aliases(self.target), strict=strict)
        specs = {
            module: spec
            for module, spec in specs.items()
            if (include is None or any(_matches(module, pattern) for pattern in include))
            and not any(_matches(module, pattern) for pattern in exclude or ())
        }
        if not specs:
            raise ValueError(
                f"LoRA {name!r} has nothing to load"
                + (" once include/exclude are applied" if include is not None or exclude else "")
            )
        blocks = dict(block_scales or {})
        scales = {module: scale * _block_scale(module, blocks) for module in specs}
        loras = _build(name, specs, modules, scales, own=not isinstance(tensors_or_path, str | Path))
        for module, lora in loras.items():
            _attach(modules[module], lora)
        self._scales[name] = float(scale)
        self._block_scales[name] = blocks

    def remove_loras(self, *names: str) -> None:
        """Take the LoRAs `names` out of the model (unfused first if needed); a layer left with no LoRA gets back
        its place in the tree."""
        modules = self.modules
        located = {name: self._loras(name, modules) for name in names}
        for name, loras in located.items():
            for adapter, _ in loras.values():
                _detach(adapter, name)
            self._scales.pop(name, None)
            self._block_scales.pop(name, None)

    def remove_all(self) -> None:
        """Take every LoRA out of the model: it is as it was before the first was added."""
        self.remove_loras(*self.names)

    def set_scale(self, name: str, scale: float) -> None:
        """Set the scale of the LoRA `name` (its block scales still apply; a fused LoRA is re-fused)."""
        self.update_scales({name: scale})

    def update_scales(self, scales: Mapping[str, float]) -> None:
        """Set the scales of several LoRAs (see `set_scale`)."""
        modules = self.modules
        located = {name: self._loras(name, modules) for name in scales}
        for name, scale in scales.items():
            self._scales[name] = float(scale)
        self._apply(located)

    def set_block_scales(self, name: str, block_scales: Mapping[str, float]) -> None:
        """Replace the block scales of the LoRA `name`: multipliers of its scale for the layers each selector picks.

        A selector is a module name, a prefix of module names at a dot, or a glob. Selectors apply in order, each
        overriding the ones before it on the layers it selects: write the general ones first. Layers no selector
        picks keep the LoRA's scale.

        Args:
            name: The LoRA.
            block_scales: E.g. `{"text_encoder": 0.5, "unet.down_blocks": 0.0, "unet.down_blocks.2": 1.2}`.
        """
        modules = self.modules
        loras = self._loras(name, modules)
        _check_patterns(block_scales, modules, "block_scales")
        self._scales[name] = self._scale_of(name, modules)
        self._block_scales[name] = dict(block_scales)
        self._apply({name: loras})

    def fuse(self, *names: str) -> None:
        """Fold the LoRAs `names` (default: all) into their layers' weights: forwards then cost what the bare model
        costs. Updates are summed in float32 and written once in the weights' dtype; `unfuse` restores them bit for
        bit. Changing the scale of a fused LoRA re-fuses it."""
        for adapter, selected in self._by_adapter(names):
            if selected == adapter.names:
                adapter.fuse()  # all of its LoRAs at once: the weight is written once
            else:
                for name in selected:
                    adapter.fuse(name)

    def unfuse(self, *names: str) -> None:
        """Take the LoRAs `names` (default: all) out of the weights; with none left fused, a layer's weight is its
        original, bit for bit."""
        for adapter, selected in self._by_adapter(names):
            if selected == adapter.names:
                adapter.unfuse()
            else:
                for name in selected:
                    adapter.unfuse(name)

    def lora_specs(self, name: str) -> dict[str, LoraSpec]:
        """The LoRA `name` as specs by module name, for the writers of `refiners.adapters.lora.export` (its scales
        are not part of it)."""
        return {module: LoraSpec.from_lora(lora) for module, lora in self.get_loras(name).items()}

    def save_loras(
        self,
        name: str,
        path: str | Path,
        layout: LoraLayout = "refiners",
        base_model: KohyaBaseModel | None = None,
    ) -> None:
        """Write the LoRA `name` to a `.safetensors` file.

        Args:
            name: The LoRA.
            path: The file to write.
            layout: `refiners`, `peft` (what diffusers' `load_lora_weights` reads; down/up LoRAs only; the text
                encoder's modules named as transformers 5 names them, without `text_model.`), or `kohya` (with
                `ss_*` and `modelspec.*` metadata, for A1111, ComfyUI and kohya's tools).
            base_model: The kohya base model written in the metadata (default: the model's family's).
        """
        if base_model is None:
            base_model = (
                "sdxl_base_v1-0" if "text_encoder_2" in {m.partition(".")[0] for m in self.modules} else "sd_v1"
            )
        _save(path, self.lora_specs(name), layout, base_model)

    def _loras(self, name: str, modules: Mapping[str, Targetable]) -> dict[str, tuple[LoraAdapter, Lora[Any]]]:
        loras = _loras_named(modules, name)
        if not loras:
            raise LookupError(f"no LoRA named {name!r} on the model; its LoRAs are {_lora_names(modules)}")
        return loras

    def _by_adapter(self, names: Sequence[str]) -> list[tuple[LoraAdapter, list[str]]]:
        """The adapters holding the LoRAs `names` (default: all), each with those of its LoRAs, in its order."""
        modules = self.modules
        groups: dict[int, tuple[LoraAdapter, set[str]]] = {}
        for name in names or _lora_names(modules):
            for adapter, _ in self._loras(name, modules).values():
                groups.setdefault(id(adapter), (adapter, set()))[1].add(name)
        return [(adapter, [name for name in adapter.names if name in chosen]) for adapter, chosen in groups.values()]

    def _scale_of(self, name: str, modules: Mapping[str, Targetable]) -> float:
        if name in self._scales:
            return self._scales[name]
        # Put on the model by other means (an SD1LoraAdapter, a training loop): its scale is that of its LoRAs.
        scales = [lora.scale for _, lora in _loras_named(modules, name).values()]
        return max(set(scales), key=scales.count)

    def _apply(self, located: Mapping[str, Mapping[str, tuple[LoraAdapter, Lora[Any]]]]) -> None:
        """Give the LoRAs of `located` (by name, then module) their scales from the records.

        A fused LoRA whose scale changes is fused again; the layers of several such LoRAs are unfused first and fused
        once at the end, rather than once per LoRA (the fused weight does not depend on the order of fusion)."""
        refuse: dict[int, tuple[LoraAdapter, list[str]]] = {}
        for loras in located.values():
            for adapter, lora in loras.values():
                if lora.is_fused and id(adapter) not in refuse:
                    refuse[id(adapter)] = (adapter, [name for name, other in adapter.loras.items() if other.is_fused])
                    adapter.unfuse()
        for name, loras in located.items():
            scale, blocks = self._scales[name], self._block_scales.get(name, {})
            for module, (_, lora) in loras.items():
                lora.scale = scale * _block_scale(module, blocks)
        for adapter, fused in refuse.values():
            if fused == adapter.names:
                adapter.fuse()
            else:
                for name in fused:
                    adapter.fuse(name)


def _block_scale(module: str, block_scales: Mapping[str, float]) -> float:
    """The value of the last selector that selects `module`, or 1."""
    scale = 1.0
    for pattern, value in block_scales.items():
        if _matches(module, pattern):
            scale = value
    return scale


def _save(path: str | Path, specs: Mapping[str, LoraSpec], layout: LoraLayout, base_model: KohyaBaseModel) -> None:
    match layout:
        case "refiners":
            save_refiners_lora(path, specs)
        case "peft":
            # diffusers' `save_lora_weights` names the text encoder's modules as transformers 5 does, without its
            # `text_model` wrapper, and `load_lora_weights` (with transformers 5) silently skips them with it.
            renamed = {
                name.replace("text_encoder.text_model.", "text_encoder.", 1): spec for name, spec in specs.items()
            }
            save_peft_lora(path, renamed)
        case "kohya":
            save_kohya_lora(path, specs, base_model=base_model)


def convert_sd1_lora(
    source: LoraSource,
    destination: str | Path,
    layout: LoraLayout = "refiners",
    strict: bool = True,
) -> dict[str, LoraSpec]:
    """Rewrite a Stable Diffusion 1.x LoRA file of any layout in `layout` (`refiners-convert lora`).

    The names are matched with those of SD1.5's UNet and text encoder (built on the "meta" device: nothing is
    allocated); the tensors are written as they are.

    Args:
        source: The LoRA file (or state dict).
        destination: The `.safetensors` file to write.
        layout: See `LoraLayout`.
        strict: Raise `UnmatchedLoraKeysError` on a tensor no SD1.5 layer has use for; when False, warn and write
            the rest.

    Returns:
        The specs written, by module name.
    """
    modules = sd1_lora_targets(SD1UNet(device="meta"), CLIPTextEncoderL(device="meta"))
    specs = resolve(_parsed(source), modules, aliases=sd1_module_aliases(), strict=strict)
    _save(destination, specs, layout, "sd_v1")
    return specs


class SD1LoraAdapter(SDLoraAdapter):
    """One LoRA file on a Stable Diffusion 1.x model (see `SDLoraAdapter`): the seed README's adapter."""

    family = StableDiffusion_1


class SDXLLoraAdapter(SDLoraAdapter):
    """One LoRA file on a Stable Diffusion XL model (see `SDLoraAdapter`): kohya files with SGM or diffusers names,
    `lora_te1_`/`lora_te2_` for the two text encoders, PEFT/diffusers files with `unet.`, `text_encoder.` and
    `text_encoder_2.` prefixes, LyCORIS kinds and DoRA."""

    family = StableDiffusion_XL
