"""LoRA files as the ecosystem writes them, read by `parse_lora_file` and matched by `resolve`.

Each file is made by the ecosystem's own code (PEFT, diffusers' savers and converters) from adapters trained on a
tiny diffusers UNet and transformers CLIP text encoder, and loaded by diffusers into fresh copies of them: the update
of every module's weight (PEFT's merged weight minus the original) is the reference for ours.
"""

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_conversion_utils import (
    _bake_lokr_alpha_,  # pyright: ignore[reportPrivateUsage]
    _convert_non_diffusers_lora_to_diffusers,  # pyright: ignore[reportPrivateUsage]
    _maybe_map_sgm_blocks_to_diffusers,  # pyright: ignore[reportPrivateUsage]
)
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from diffusers.utils.state_dict_utils import StateDictType
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model  # pyright: ignore[reportMissingTypeStubs]
from peft.tuners.tuners_utils import BaseTunerLayer  # pyright: ignore[reportMissingTypeStubs]
from peft.utils import get_peft_model_state_dict  # pyright: ignore[reportMissingTypeStubs]
from torch import Tensor, nn
from toy_models import Layers, build_text_encoder, build_unet, layers

import refiners.adapters.lora.formats as formats_module
import refiners.fluxion.layers as fl
from refiners.adapters.lora import (
    Dora,
    LoCon,
    LoHa,
    LoKr,
    LoraSpec,
    UnmatchedLoraKeysError,
    UnmatchedLoraKeysWarning,
    parse_lora_file,
    resolve,
)
from refiners.fluxion.adapters.lora import Conv2dLora, LinearLora
from refiners.fluxion.utils import save_to_safetensors

ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def modules() -> Layers:
    return layers({"unet": build_unet(), "text_encoder": build_text_encoder()})


def fluxion_copy(module: nn.Linear | nn.Conv2d) -> fl.Linear | fl.Conv2d:
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        copy: fl.Linear | fl.Conv2d = fl.Linear(module.in_features, module.out_features, bias=has_bias)
    else:
        kernel = (module.kernel_size[0], module.kernel_size[1])
        padding = module.padding if isinstance(module.padding, str) else (module.padding[0], module.padding[1])
        copy = fl.Conv2d(
            module.in_channels,
            module.out_channels,
            kernel,
            stride=(module.stride[0], module.stride[1]),
            padding=padding,
            use_bias=has_bias,
        )
    copy.load_state_dict(module.state_dict())
    return copy


def our_deltas(specs: dict[str, LoraSpec], modules: Layers) -> dict[str, Tensor]:
    deltas: dict[str, Tensor] = {}
    for name, spec in specs.items():
        target = fluxion_copy(modules[name])
        deltas[name] = spec.to_lora("x", target).delta_weight(target.weight.detach())
    return deltas


def merged_deltas(components: dict[str, nn.Module]) -> dict[str, Tensor]:
    """What PEFT adds to each weight when it merges the loaded adapters."""
    deltas: dict[str, Tensor] = {}
    for component, model in components.items():
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                tuner: Any = module
                base = tuner.get_base_layer()
                before = base.weight.detach().clone()
                tuner.merge()
                deltas[f"{component}.{name}"] = base.weight.detach() - before
    return deltas


def diffusers_deltas(source: str | Path | dict[str, Tensor]) -> dict[str, Tensor]:
    """Load a LoRA as `StableDiffusionPipeline.load_lora_weights` does, into fresh models, and merge it."""
    unet, text_encoder = build_unet(), build_text_encoder()
    if isinstance(source, dict):
        source = dict(source)
    loaded: Any = StableDiffusionPipeline.lora_state_dict(
        str(source) if isinstance(source, Path) else source, return_lora_metadata=True
    )
    state_dict, alphas, metadata = loaded
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, metadata=metadata)
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state_dict, alphas, text_encoder=text_encoder, metadata=metadata
    )
    return merged_deltas({"unet": unet, "text_encoder": text_encoder})


def assert_same_deltas(ours: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    for name, delta in reference.items():
        torch.testing.assert_close(ours[name], delta, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def config_dict(config: Any) -> dict[str, Any]:
    """A PEFT config as diffusers' savers write it in `lora_adapter_metadata` (sets as lists)."""
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


class Trained:
    """LoRAs trained with PEFT on the UNet and the text encoder (random weights, several ranks and alphas)."""

    def __init__(self, use_dora: bool = False, use_rslora: bool = False) -> None:
        self.unet, self.text_encoder = build_unet(), build_text_encoder()
        self.unet_config = LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=UNET_TARGETS,
            rank_pattern={"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 3, "attn2.to_k": 1},
            alpha_pattern={"proj_in": 1.5},
            init_lora_weights=False,
            use_dora=use_dora,
            use_rslora=use_rslora,
        )
        self.text_config = LoraConfig(
            r=2, lora_alpha=3, target_modules=TEXT_TARGETS, init_lora_weights=False, use_dora=use_dora
        )
        torch.manual_seed(1)
        self.unet.add_adapter(self.unet_config)
        self.text_encoder.add_adapter(self.text_config)

    def state_dicts(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return get_peft_model_state_dict(self.unet), get_peft_model_state_dict(self.text_encoder)


def trained(
    use_dora: bool = False, use_rslora: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor], LoraConfig, LoraConfig]:
    """The state dicts and configs of `Trained`: the tensors of a training run."""
    run = Trained(use_dora, use_rslora)
    return *run.state_dicts(), run.unet_config, run.text_config


def prefixed(unet: dict[str, Tensor], text_encoder: dict[str, Tensor]) -> dict[str, Tensor]:
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text_encoder.items()}}


# -- PEFT and diffusers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("use_dora", "use_rslora"), [(False, False), (False, True), (True, False)])
def test_a_diffusers_file_with_peft_metadata(tmp_path: Path, modules: Layers, use_dora: bool, use_rslora: bool) -> None:
    run = Trained(use_dora, use_rslora)
    unet, text_encoder = run.state_dicts()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=cast(Any, unet),
        text_encoder_lora_layers=cast(Any, text_encoder),
        unet_lora_adapter_metadata=config_dict(run.unet_config),
        text_encoder_lora_adapter_metadata=config_dict(run.text_config),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    parsed = parse_lora_file(path)
    assert parsed.layouts == {"peft"} and not parsed.unused
    specs = resolve(parsed, modules)
    assert {spec.is_dora for spec in specs.values()} == {use_dora}
    assert specs["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].rank == 3
    reference = diffusers_deltas(path)
    if use_dora:
        # diffusers' loader loses the text encoder's DoRA magnitudes (transformers reports its
        # `lora_magnitude_vector.default_0` keys as unexpected): the reference is PEFT's own merge of the run.
        reference |= merged_deltas({"text_encoder": run.text_encoder})
    assert_same_deltas(our_deltas(specs, modules), reference)


def test_a_unet_adapter_saved_without_prefix(tmp_path: Path, modules: Layers) -> None:
    unet = build_unet()
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "conv1"], init_lora_weights=False))
    unet.save_lora_adapter(tmp_path)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    parsed = parse_lora_file(path)
    assert all(name.startswith(("down_blocks", "up_blocks", "mid_block")) for name in parsed.specs)
    # Bare names: each is found in the one component that has it; the metadata has no component either.
    specs = resolve(parsed, modules)
    assert all(spec.factor == 2.5 for spec in specs.values())
    # The reference is the trained model itself: diffusers' `load_lora_adapter(path, prefix=None)` does not read
    # this metadata back (it loads alpha = r).
    assert_same_deltas(our_deltas(specs, modules), merged_deltas({"unet": unet}))


def test_a_peft_model_state_dict_with_its_config(modules: Layers) -> None:
    text_encoder = build_text_encoder()
    config = LoraConfig(r=2, lora_alpha=7, target_modules=["q_proj", "fc2"], init_lora_weights=False)
    torch.manual_seed(2)
    peft_model: Any = get_peft_model(text_encoder, config)
    state_dict = get_peft_model_state_dict(peft_model)
    assert all(key.startswith("base_model.model.") for key in state_dict)
    metadata = {"lora_adapter_metadata": json.dumps(config_dict(config))}
    specs = resolve(parse_lora_file(state_dict, metadata), modules)
    assert all(name.startswith("text_encoder.") for name in specs) and len(specs) == 4
    assert all(spec.factor == 3.5 for spec in specs.values())
    assert_same_deltas(our_deltas(specs, modules), merged_deltas({"text_encoder": peft_model.base_model.model}))


def test_the_diffusers_layout_of_peft_tensors(modules: Layers) -> None:
    # diffusers' training scripts saved `convert_state_dict_to_diffusers(get_peft_model_state_dict(model))`, which
    # renames the attention projections (the modules those scripts trained).
    unet, text_encoder, _, _ = trained()
    converted = convert_state_dict_to_diffusers(prefixed(unet, text_encoder))
    state_dict = {key: value for key, value in converted.items() if ".lora_A." not in key and ".lora_B." not in key}
    assert any(".to_q.lora.down.weight" in key for key in state_dict)
    assert any(".q_proj.lora_linear_layer.down.weight" in key for key in state_dict)
    parsed = parse_lora_file(state_dict)
    assert parsed.layouts == {"diffusers"}
    # No alpha anywhere: alpha = rank, as diffusers assumes.
    assert_same_deltas(our_deltas(resolve(parsed, modules), modules), diffusers_deltas(state_dict))


# -- kohya and the old attention processors --------------------------------------------------------------------


def kohya_file(text_prefix: str = "lora_te1_", text_model: bool = False, alpha: float = 6.0) -> dict[str, Tensor]:
    """diffusers' PEFT -> kohya conversion of a trained LoRA, its alphas set apart from the ranks, as kohya's trainer
    writes them (`--network_alpha`: one alpha for every module, which diffusers reads right; per-module alphas, see
    below, it only reads right for modules named `.lora.` in its old layout)."""
    unet, text_encoder, _, _ = trained()
    kohya = convert_state_dict_to_kohya(prefixed(unet, text_encoder))
    state_dict: dict[str, Tensor] = {}
    for key, value in kohya.items():
        if key.startswith("lora_te1_"):
            key = text_prefix + ("text_model_" if text_model else "") + key.removeprefix("lora_te1_")
        state_dict[key] = torch.tensor(alpha) if key.endswith(".alpha") else value
    return state_dict


@pytest.mark.parametrize(
    ("text_prefix", "text_model"), [("lora_te1_", False), ("lora_te_", True)], ids=["sdxl-style", "a1111-sd1"]
)
def test_a_kohya_file(tmp_path: Path, modules: Layers, text_prefix: str, text_model: bool) -> None:
    state_dict = kohya_file(text_prefix, text_model)
    assert any(".lora_down.weight" in key and value.dim() == 4 for key, value in state_dict.items())  # conv LoRAs
    path = tmp_path / "kohya.safetensors"
    save_to_safetensors(path, state_dict)
    parsed = parse_lora_file(path)
    assert parsed.layouts == {"kohya"}
    specs = resolve(parsed, modules)
    assert len(specs) * 3 == len(state_dict)  # every module: down, up, alpha
    assert_same_deltas(our_deltas(specs, modules), diffusers_deltas(path))


def test_kohya_alphas_are_per_module_and_may_be_missing(modules: Layers) -> None:
    state_dict = kohya_file()
    alphas = [key for key in sorted(state_dict) if key.endswith(".alpha")]
    for index, key in enumerate(alphas):
        state_dict[key] = torch.tensor([1.0, 2.0, 8.0][index % 3])
    del state_dict[alphas[0]]
    specs = resolve(parse_lora_file(state_dict), modules)
    ours = our_deltas(specs, modules)
    for key in alphas:
        name = key.removesuffix(".alpha")
        spec = next(spec for spec in specs.values() if spec.keys[0].startswith(f"{name}."))
        module = next(module for module, candidate in specs.items() if candidate is spec)
        up, down = state_dict[f"{name}.lora_up.weight"], state_dict[f"{name}.lora_down.weight"]
        rank = down.shape[0]
        # kohya: the update is alpha / rank * up @ down, and a missing alpha is the rank.
        alpha = float(state_dict[key]) if key in state_dict else rank
        assert spec.alpha == (alpha if key in state_dict else None)
        expected = alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(modules[module].weight.shape)
        torch.testing.assert_close(ours[module], expected, atol=ATOL, rtol=RTOL)


def test_the_attention_processor_layout_with_network_alphas(tmp_path: Path, modules: Layers) -> None:
    kohya = kohya_file()
    path = tmp_path / "kohya.safetensors"
    save_to_safetensors(path, kohya)
    reference = diffusers_deltas(path)
    # diffusers' kohya conversion writes the old attention processors' names, and gives the alphas apart.
    state_dict, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert any(".processor.to_q_lora.down.weight" in key for key in state_dict)
    assert any(".self_attn.to_q_lora.down.weight" in key for key in state_dict)
    parsed = parse_lora_file(state_dict, network_alphas=network_alphas)
    assert not parsed.unused
    assert_same_deltas(our_deltas(resolve(parsed, modules), modules), reference)
    # The UNet alone, as `save_attn_procs` wrote it: no `unet.` prefix, in a pickled `.bin`.
    unet_only = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    alphas = {k.removeprefix("unet."): v for k, v in network_alphas.items() if k.startswith("unet.")}
    bin_path = tmp_path / "pytorch_lora_weights.bin"
    torch.save(unet_only, bin_path)
    specs = resolve(parse_lora_file(bin_path, network_alphas=alphas), modules)
    unet_reference = {name: delta for name, delta in reference.items() if name.startswith("unet.")}
    assert_same_deltas(our_deltas(specs, modules), unet_reference)


def test_original_stable_diffusion_names_resolve_through_aliases(modules: Layers) -> None:
    # The attention blocks of a kohya file under the original (ldm/sgm) block names, as some model sites write them.
    blocks = {
        "unet.down_blocks.0.attentions.0": "unet.input_blocks.1.1",
        "unet.up_blocks.1.attentions.0": "unet.output_blocks.2.1",
        "unet.up_blocks.1.attentions.1": "unet.output_blocks.3.1",
    }
    original: dict[str, Tensor] = {}
    for key, value in kohya_file().items():
        for diffusers_block, original_block in blocks.items():
            diffusers_prefix = "lora_" + diffusers_block.replace(".", "_") + "_"
            if key.startswith(diffusers_prefix):
                original[key.replace(diffusers_prefix, "lora_" + original_block.replace(".", "_") + "_")] = value
    # diffusers' own renaming of sgm blocks (then of `input_blocks` to `down_blocks`...), to say which module each
    # name is.
    renamed = {
        key.replace("_input_blocks_", "_down_blocks_").replace("_output_blocks_", "_up_blocks_"): value
        for key, value in _maybe_map_sgm_blocks_to_diffusers(dict(original), build_unet().config).items()
    }
    expected = resolve(parse_lora_file(renamed), modules)

    def aliases(module: str) -> Iterable[str]:
        # What the SD wiring passes (the converters' ldm renaming): here, for the three blocks.
        for diffusers_block, original_block in blocks.items():
            if module.startswith(f"{diffusers_block}."):
                yield original_block + module.removeprefix(diffusers_block)

    parsed = parse_lora_file(original)
    with pytest.raises(UnmatchedLoraKeysError, match=r"no module of 'unet' is named 'input_blocks_1_1_proj_in'"):
        resolve(parsed, modules)
    specs = resolve(parsed, modules, aliases=aliases)
    assert sorted(specs) == sorted(expected) and len(specs) == 3 * 11
    for name, spec in specs.items():
        assert spec.factor == expected[name].factor
        for role, tensor in spec.tensors.items():
            assert torch.equal(tensor, expected[name].tensors[role])


# -- LyCORIS kinds ---------------------------------------------------------------------------------------------


def kohya_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Flatten `unet.<module>.<tensor>` keys as diffusers' kohya converter does (it keeps the last two dots, so the
    LyCORIS tensor names get a `.weight` for the conversion and lose it after); its alphas are dropped."""
    suffixed = {key if key.endswith(".weight") else f"{key}.weight": value for key, value in state_dict.items()}
    converted = convert_state_dict_to_kohya(suffixed, original_type=StateDictType.PEFT)
    return {
        key if key.endswith((".lora_down.weight", ".lora_up.weight")) else key.removesuffix(".weight"): value
        for key, value in converted.items()
        if not key.endswith(".alpha")
    }


@pytest.mark.parametrize(("kind", "naming"), [("loha", "dotted"), ("lokr", "dotted"), ("loha", "kohya")])
def test_peft_loha_and_lokr_files(modules: Layers, kind: str, naming: str) -> None:
    unet = build_unet()
    targets = ["to_q", "proj_in", "conv1", "ff.net.2"]
    config: Any = (
        LoHaConfig(r=2, alpha=5, target_modules=targets, init_weights=False, use_effective_conv2d=True)
        if kind == "loha"
        else LoKrConfig(
            r=2, alpha=5, target_modules=targets, init_weights=False, use_effective_conv2d=True, decompose_both=True
        )
    )
    torch.manual_seed(3)
    peft_model: Any = get_peft_model(unet, config)
    state_dict = get_peft_model_state_dict(peft_model)
    if naming == "dotted":
        parsed = parse_lora_file(state_dict, {"lora_adapter_metadata": json.dumps(config_dict(config))})
        assert parsed.layouts == {"lycoris"}
    else:
        # LyCORIS's kohya files: flattened names, an alpha per module.
        kohya = kohya_names({f"unet.{k.removeprefix('base_model.model.')}": v for k, v in state_dict.items()})
        modules_in_file = {key.split(".")[0] for key in kohya}
        parsed = parse_lora_file(kohya | {f"{module}.alpha": torch.tensor(5.0) for module in modules_in_file})
        assert parsed.layouts == {"kohya"}
    assert {spec.kind for spec in parsed.specs.values()} == {kind}
    specs = resolve(parsed, modules)
    reference = {
        f"unet.{name}": cast(Any, module).get_delta_weight("default")
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    assert_same_deltas(our_deltas(specs, modules), reference)


def test_lycoris_lokr_alpha_applies_only_to_low_rank_factors(modules: Layers) -> None:
    # A LyCORIS LoKr in dotted names with alphas (as ai-toolkit writes them): one module of full factors, one with
    # a low-rank w2.
    full, low_rank = (
        "unet.down_blocks.0.attentions.0.proj_in",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    )
    factors = {
        f"{full}.lokr_w1": torch.randn(2, 2),
        f"{full}.lokr_w2": torch.randn(4, 4),
        f"{full}.alpha": torch.tensor(3.0),
        f"{low_rank}.lokr_w1": torch.randn(2, 2),
        f"{low_rank}.lokr_w2_a": torch.randn(4, 2),
        f"{low_rank}.lokr_w2_b": torch.randn(2, 4),
        f"{low_rank}.alpha": torch.tensor(3.0),
    }
    specs = resolve(parse_lora_file(factors), modules)
    # diffusers bakes LyCORIS's rule into the factors: the reference update is their plain Kronecker product.
    baked = dict(factors)
    _bake_lokr_alpha_(baked)
    for name in (full, low_rank):
        w2 = (
            baked[f"{name}.lokr_w2"]
            if f"{name}.lokr_w2" in baked
            else baked[f"{name}.lokr_w2_a"] @ baked[f"{name}.lokr_w2_b"]
        )
        expected = torch.kron(baked[f"{name}.lokr_w1"], w2).reshape(modules[name].weight.shape)
        torch.testing.assert_close(our_deltas({name: specs[name]}, modules)[name], expected, atol=ATOL, rtol=RTOL)
    assert specs[full].factor == 1.0 and specs[low_rank].factor == 1.5


def test_a_lycoris_kohya_file_of_every_kind(modules: Layers) -> None:
    unet = build_unet()
    torch.manual_seed(4)
    peft_model: Any = get_peft_model(
        unet, LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "proj_out"], use_dora=True, init_lora_weights=False)
    )
    dora_state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(peft_model).items()}
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, BaseTunerLayer):
                magnitude = cast(Any, module).lora_magnitude_vector["default"].weight
                magnitude.mul_(torch.linspace(0.8, 1.2, magnitude.numel()).reshape(magnitude.shape))
                dora_state[f"{name}.lora_magnitude_vector"] = magnitude.detach().clone()
    # kohya names; a DoRA's magnitude as LyCORIS's `dora_scale` (out, 1), alphas set apart.
    state_dict: dict[str, Tensor] = {}
    for key, value in kohya_names({f"unet.{k}": v for k, v in dora_state.items()}).items():
        if key.endswith(".lora_magnitude_vector"):
            state_dict[key.replace(".lora_magnitude_vector", ".dora_scale")] = value.reshape(-1, 1)
        else:
            state_dict[key] = value
    for key in [key for key in state_dict if key.endswith(".lora_down.weight")]:
        state_dict[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(2.0)
    # A LoCon with a Tucker core on a 3x3 convolution (no ecosystem tool writes one here: checked by its formula).
    locon = "lora_unet_down_blocks_0_resnets_0_conv2"
    down, mid, up = torch.randn(2, 8, 1, 1), torch.randn(2, 2, 3, 3), torch.randn(8, 2, 1, 1)
    state_dict |= {f"{locon}.lora_down.weight": down, f"{locon}.lora_mid.weight": mid, f"{locon}.lora_up.weight": up}
    state_dict[f"{locon}.alpha"] = torch.tensor(1.0)
    specs = resolve(parse_lora_file(state_dict), modules)
    doras = {name: spec for name, spec in specs.items() if spec.is_dora}
    assert len(doras) == 12 and all(spec.magnitude_axis == "output" for spec in doras.values())
    assert_same_deltas(our_deltas(doras, modules), merged_deltas({"unet": peft_model.base_model.model}))
    conv2 = "unet.down_blocks.0.resnets.0.conv2"
    assert specs[conv2].kind == "locon"
    lora = specs[conv2].to_lora("x", fluxion_copy(modules[conv2]))
    assert isinstance(lora, LoCon)
    expected = 0.5 * torch.einsum("oa,abkl,bi->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    torch.testing.assert_close(lora.delta_weight(), expected, atol=ATOL, rtol=RTOL)


def test_a_dora_scale_per_input_column(modules: Layers) -> None:
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    down, up, magnitude = torch.randn(2, 8), torch.randn(8, 2), torch.rand(8) + 0.5
    state_dict = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_down.weight": down,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_up.weight": up,
        # LyCORIS's `wd_on_out=False`: (1, in).
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.dora_scale": magnitude.reshape(1, -1),
    }
    spec = resolve(parse_lora_file(state_dict), modules)[name]
    assert spec.magnitude_axis == "input"
    lora = spec.to_lora("x", fluxion_copy(modules[name]))
    assert isinstance(lora, Dora) and lora.axis == "input"
    weight = modules[name].weight.detach()
    merged = weight + up @ down
    expected = magnitude * merged / merged.norm(dim=0) - weight
    torch.testing.assert_close(lora.delta_weight(weight), expected, atol=1e-5, rtol=1e-5)


def test_kinds_become_the_fluxion_loras(modules: Layers) -> None:
    kohya = kohya_file()
    specs = resolve(parse_lora_file(kohya), modules)
    conv1 = specs["unet.down_blocks.0.resnets.0.conv1"]
    proj_in = specs["unet.down_blocks.0.attentions.0.proj_in"]
    assert isinstance(conv1.to_lora("x", fluxion_copy(modules["unet.down_blocks.0.resnets.0.conv1"])), Conv2dLora)
    # diffusers' SD1 proj_in is a 1x1 convolution: its 4-D tensors also fit a Linear.
    assert proj_in.tensors["lora_down"].dim() == 4
    assert isinstance(proj_in.to_lora("x", fl.Linear(8, 8)), LinearLora)
    loha = LoraSpec(
        "loha",
        {
            "hada_w1_a": torch.zeros(8, 2),
            "hada_w1_b": torch.zeros(2, 8),
            "hada_w2_a": torch.zeros(8, 2),
            "hada_w2_b": torch.zeros(2, 8),
        },
    )
    assert isinstance(loha.to_lora("x", fl.Linear(8, 8)), LoHa)
    lokr = LoraSpec("lokr", {"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(4, 4)})
    assert isinstance(lokr.to_lora("x", fl.Linear(8, 8), scale=0.5), LoKr)


# -- what cannot be used is reported ---------------------------------------------------------------------------


def test_unmatched_keys_are_listed_with_what_the_model_has_near_them(modules: Layers) -> None:
    state_dict = kohya_file()
    typo = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z"
    state_dict[f"{typo}.lora_down.weight"] = torch.zeros(2, 8)
    state_dict[f"{typo}.lora_up.weight"] = torch.zeros(8, 2)
    state_dict["lora_unet_conv_in.lora_down.weight"] = torch.zeros(2, 4, 3, 3)  # no up
    state_dict["emb_params"] = torch.zeros(2, 8)  # a pivotal-tuning embedding
    state_dict["unet.conv_in.lora_B.bias"] = torch.zeros(8)
    parsed = parse_lora_file(state_dict)
    with pytest.raises(UnmatchedLoraKeysError) as caught:
        resolve(parsed, modules)
    message = str(caught.value)
    assert message.startswith("5 tensor(s) of the LoRA file cannot be used:")
    assert (
        f"{typo}.lora_down.weight, {typo}.lora_up.weight: no module of 'unet' is named "
        "'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z' once flattened; nearest: "
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k, "
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q, "
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    ) in message
    assert "lora_unet_conv_in.lora_down.weight: incomplete lora: no lora_up" in message
    assert "emb_params: no LoRA layout names a tensor like this" in message
    assert "unet.conv_in.lora_B.bias: LoRA biases (PEFT's `lora_bias`) are not supported" in message
    assert "pass strict=False to load the rest" in message
    assert set(caught.value.unmatched) == {
        f"{typo}.lora_down.weight",
        f"{typo}.lora_up.weight",
        "lora_unet_conv_in.lora_down.weight",
        "emb_params",
        "unet.conv_in.lora_B.bias",
    }
    with pytest.warns(UnmatchedLoraKeysWarning, match=r"(?s)5 tensor\(s\).*attn1_to_z.*ignored \(strict=False\)"):
        specs = resolve(parsed, modules, strict=False)
    assert len(specs) == len(resolve(parse_lora_file(kohya_file()), modules))


def test_names_that_are_ambiguous_or_given_twice_are_reported(modules: Layers) -> None:
    pair = {"lora_A.weight": torch.zeros(2, 8), "lora_B.weight": torch.zeros(8, 2)}
    state_dict = {f"encoder.layers.0.self_attn.q_proj.{k}": v for k, v in pair.items()}
    state_dict |= {f"text_encoder.encoder.layers.0.self_attn.q_proj.{k}": v for k, v in pair.items()}
    twice = dict(modules) | {
        f"text_encoder_2.{name.partition('.')[2]}": m for name, m in modules.items() if name.startswith("text_encoder.")
    }
    with pytest.raises(
        UnmatchedLoraKeysError, match=r"'encoder.layers.0.self_attn.q_proj' could be any of \['text_encoder.encoder"
    ):
        resolve(parse_lora_file(state_dict), twice)
    with pytest.raises(
        UnmatchedLoraKeysError,
        match=r"'encoder.layers.0.self_attn.q_proj' already updates text_encoder.encoder.layers.0.self_attn.q_proj",
    ):
        resolve(parse_lora_file(state_dict), modules)


def test_tensors_that_do_not_fit_their_module_are_refused(modules: Layers) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state_dict = {f"{name}.lora_down.weight": torch.zeros(2, 5), f"{name}.lora_up.weight": torch.zeros(8, 2)}
    spec = resolve(parse_lora_file(state_dict), modules)[
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ]
    with pytest.raises(
        ValueError,
        match=rf"the LoRA of {name}.lora_down.weight, {name}.lora_up.weight does not fit Linear: LinearLora 'x' "
        r"\(down \(2, 5\), up \(8, 2\)\) does not fit Linear .* the LoRA maps 5 to 8 features, the layer maps 8 to 8",
    ):
        spec.to_lora("x", fl.Linear(8, 8))
    with pytest.raises(
        TypeError, match=rf"cannot put the LoRA of {name}.lora_down.weight, .* on LayerNorm: it is a LayerNorm"
    ):
        spec.to_lora("x", fl.LayerNorm(8))
    dora = LoraSpec("lora", {"lora_down": torch.zeros(2, 8), "lora_up": torch.zeros(8, 2)}, magnitude=torch.ones(5))
    with pytest.raises(
        ValueError, match=r"its DoRA magnitude has 5 values, one per output of the weight \(8, 8\) makes 8"
    ):
        dora.to_lora("x", fl.Linear(8, 8))
    parsed = parse_lora_file(
        {f"{name}.lora_down.weight": torch.zeros(2, 8), f"{name}.lora_up.weight": torch.zeros(8, 3)}
    )
    assert parsed.unused == {
        f"{name}.lora_down.weight": "lora_down and lora_up disagree on the rank: lora_down (2, 8), lora_up (8, 3)",
        f"{name}.lora_up.weight": "lora_down and lora_up disagree on the rank: lora_down (2, 8), lora_up (8, 3)",
    }


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lora.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match=r"lora.pt holds a list, not a LoRA state dict"):
        parse_lora_file(path)
    with pytest.raises(FileNotFoundError, match=r"no such LoRA file"):
        parse_lora_file(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match=r"the file's lora_adapter_metadata is not JSON"):
        parse_lora_file({}, metadata={"lora_adapter_metadata": "{"})


def test_docstring_example_runs() -> None:
    for example in re.findall(r"```py\n(.*?)```", formats_module.__doc__ or "", flags=re.DOTALL):
        lines = example.splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        exec("\n".join(line[indent:] for line in lines), {})
