"""Writing LoRAs: read back the same, loaded by diffusers as we apply them, and kohya and PEFT files that agree."""

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,  # pyright: ignore[reportPrivateUsage]
)
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft.tuners.tuners_utils import BaseTunerLayer  # pyright: ignore[reportMissingTypeStubs]
from torch import Tensor, nn
from toy_models import Layers, build_text_encoder, build_unet, layers

import refiners.adapters.lora.export as export_module
import refiners.fluxion.layers as fl
from refiners.adapters.lora import (
    Dora,
    LoCon,
    LoHa,
    LoKr,
    LoraSpec,
    kohya_state_dict,
    parse_lora_file,
    peft_state_dict,
    resolve,
    save_kohya_lora,
    save_peft_lora,
    save_refiners_lora,
    specs_of,
)
from refiners.fluxion.adapters.lora import Conv2dLora, LinearLora, Lora

ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def modules() -> Layers:
    return layers({"unet": build_unet(), "text_encoder": build_text_encoder()})


def diffusers_deltas(path: Path) -> dict[str, Tensor]:
    """Load a LoRA file as `StableDiffusionPipeline.load_lora_weights` does, into fresh models, and merge it: what
    PEFT adds to each weight."""
    components: dict[str, nn.Module] = {"unet": build_unet(), "text_encoder": build_text_encoder()}
    loaded: Any = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    state_dict, alphas, metadata = loaded
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=components["unet"], metadata=metadata)
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state_dict, alphas, text_encoder=components["text_encoder"], metadata=metadata
    )
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


def target_of(module: nn.Linear | nn.Conv2d) -> fl.Linear | fl.Conv2d:
    """A fluxion layer with the weights of a diffusers/transformers one."""
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        layer: fl.Linear | fl.Conv2d = fl.Linear(module.in_features, module.out_features, bias=has_bias)
    else:
        padding = module.padding if isinstance(module.padding, str) else (module.padding[0], module.padding[1])
        layer = fl.Conv2d(
            module.in_channels,
            module.out_channels,
            (module.kernel_size[0], module.kernel_size[1]),
            stride=(module.stride[0], module.stride[1]),
            padding=padding,
            use_bias=has_bias,
        )
    layer.load_state_dict(module.state_dict())
    return layer


def randomize(lora: Lora[Any], seed: int) -> Lora[Any]:
    """Random weights everywhere (a fresh LoRA is zero), a DoRA's magnitude kept positive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        if isinstance(lora, Dora):
            lora.magnitude.abs_().add_(0.5)
    return lora


UNET = "unet.down_blocks.0.attentions.0"
UP = "unet.up_blocks.1.attentions.0"
TEXT = "text_encoder.encoder.layers.0"


def fluxion_loras(modules: Layers, kinds: str) -> dict[str, Lora[Any]]:
    """LoRAs on the modules of the tiny models: several ranks and alphas, and the LyCORIS kinds for `all`."""

    def shape(name: str) -> tuple[int, ...]:
        return tuple(modules[name].weight.shape)

    loras: dict[str, Lora[Any]] = {
        f"{UNET}.transformer_blocks.0.attn1.to_q": Lora[Any].from_target(
            "x", target_of(modules[f"{UNET}.transformer_blocks.0.attn1.to_q"]), rank=2, alpha=3.0
        ),
        f"{UNET}.transformer_blocks.0.attn2.to_k": Lora[Any].from_target(
            "x", target_of(modules[f"{UNET}.transformer_blocks.0.attn2.to_k"]), rank=3, alpha=3.0
        ),
        f"{UNET}.proj_in": Lora[Any].from_target("x", target_of(modules[f"{UNET}.proj_in"]), rank=2, alpha=3.0),
        "unet.down_blocks.0.resnets.0.conv1": Lora[Any].from_target(
            "x", target_of(modules["unet.down_blocks.0.resnets.0.conv1"]), rank=2, alpha=3.0
        ),
        f"{TEXT}.self_attn.q_proj": Lora[Any].from_target(
            "x", target_of(modules[f"{TEXT}.self_attn.q_proj"]), rank=2, alpha=3.0
        ),
        f"{TEXT}.mlp.fc1": Lora[Any].from_target("x", target_of(modules[f"{TEXT}.mlp.fc1"]), rank=2, alpha=3.0),
        # diffusers reads the old text encoder layout only when an `out_proj` (`to_out_lora`) is in it.
        f"{TEXT}.self_attn.out_proj": Lora[Any].from_target(
            "x", target_of(modules[f"{TEXT}.self_attn.out_proj"]), rank=2, alpha=3.0
        ),
    }
    if kinds == "all":
        loras |= {
            "unet.down_blocks.0.resnets.0.conv2": LoCon.from_target(
                "x", target_of(modules["unet.down_blocks.0.resnets.0.conv2"]), rank=2, alpha=1.0
            ),
            f"{UP}.transformer_blocks.0.attn1.to_v": LoHa.from_target(
                "x", target_of(modules[f"{UP}.transformer_blocks.0.attn1.to_v"]), rank=2, alpha=5.0
            ),
            "unet.up_blocks.1.resnets.0.conv1": LoHa(
                "x", shape("unet.up_blocks.1.resnets.0.conv1"), 2, 1.0, tucker=True
            ),
            f"{UP}.transformer_blocks.0.ff.net.2": LoKr.from_target(
                "x", target_of(modules[f"{UP}.transformer_blocks.0.ff.net.2"]), rank=1, alpha=2.0
            ),
            f"{UP}.proj_out": LoKr.from_target(
                "x", target_of(modules[f"{UP}.proj_out"]), rank=4, alpha=2.0
            ),  # full factors
            f"{UP}.transformer_blocks.0.attn1.to_out.0": Dora.from_target(
                "x", target_of(modules[f"{UP}.transformer_blocks.0.attn1.to_out.0"]), rank=2
            ),
            f"{UP}.transformer_blocks.0.attn2.to_q": Dora("x", LinearLora("x", 8, 8, rank=2), axis="input"),
            "unet.up_blocks.1.resnets.0.conv2": Dora("x", LoHa("x", shape("unet.up_blocks.1.resnets.0.conv2"), 2, 4.0)),
        }
    elif kinds == "dora":
        loras = {name: Dora("x", lora) if name.startswith("unet.") else lora for name, lora in loras.items()}
    return {name: randomize(lora, seed) for seed, (name, lora) in enumerate(loras.items())}


def our_deltas(specs: dict[str, LoraSpec], modules: Layers) -> dict[str, Tensor]:
    deltas: dict[str, Tensor] = {}
    for name, spec in specs.items():
        target = target_of(modules[name])
        deltas[name] = spec.to_lora("x", target).delta_weight(target.weight.detach())
    return deltas


def assert_same_deltas(ours: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    for name, delta in reference.items():
        torch.testing.assert_close(ours[name], delta, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def deltas_of(loras: dict[str, Lora[Any]], modules: Layers) -> dict[str, Tensor]:
    return {name: lora.delta_weight(modules[name].weight.detach()) for name, lora in loras.items()}


# -- written, then read ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["refiners", "kohya", "peft"])
def test_export_then_parse_gives_the_same_specs(tmp_path: Path, modules: Layers, layout: str) -> None:
    loras = fluxion_loras(modules, "lora" if layout == "peft" else "all")
    specs = specs_of(loras)
    path = tmp_path / "lora.safetensors"
    {"refiners": save_refiners_lora, "kohya": save_kohya_lora, "peft": save_peft_lora}[layout](path, specs)
    parsed = parse_lora_file(path)
    assert not parsed.unused
    read = resolve(parsed, modules)
    assert sorted(read) == sorted(specs)
    for name, spec in specs.items():
        again = read[name]
        assert (again.kind, again.rank, again.magnitude_axis) == (spec.kind, spec.rank, spec.magnitude_axis), name
        if spec.low_rank:  # a LoKr of full factors has its factor in w1 (LyCORIS ignores its alpha)
            assert again.factor == spec.factor
            assert again.tensors.keys() == spec.tensors.keys()
            for role, tensor in spec.tensors.items():
                assert torch.equal(again.tensors[role], tensor), (name, role)
        assert (again.magnitude is None) == (spec.magnitude is None)
        if spec.magnitude is not None and again.magnitude is not None:
            assert torch.equal(again.magnitude, spec.magnitude)
    assert_same_deltas(our_deltas(read, modules), deltas_of(loras, modules))


# -- loaded by diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds", ["lora", "dora"])
def test_a_peft_export_loads_in_diffusers_as_we_apply_it(tmp_path: Path, modules: Layers, kinds: str) -> None:
    loras = fluxion_loras(modules, kinds)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_peft_lora(path, specs_of(loras))
    assert_same_deltas(deltas_of(loras, modules), diffusers_deltas(path))


def test_a_kohya_export_loads_in_diffusers_as_we_apply_it(tmp_path: Path, modules: Layers) -> None:
    # One alpha for all modules: diffusers 0.42 reads per-module kohya alphas only for modules it names `.lora.`,
    # not for the attention projections (its alpha pattern keeps `processor.to_q_lora.down.weight`).
    loras = fluxion_loras(modules, "lora")
    path = tmp_path / "kohya.safetensors"
    save_kohya_lora(path, specs_of(loras))
    assert_same_deltas(deltas_of(loras, modules), diffusers_deltas(path))


def test_diffusers_converts_our_kohya_export_to_our_peft_export(modules: Layers) -> None:
    specs = {  # per-module alphas this time
        name: dataclasses.replace(spec, alpha=[1.0, 2.0, 4.0][index % 3])
        for index, (name, spec) in enumerate(specs_of(fluxion_loras(modules, "lora")).items())
    }
    kohya, _ = kohya_state_dict(specs)
    peft, _ = peft_state_dict(specs)
    converted, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    unet = convert_unet_state_dict_to_peft({k: v for k, v in converted.items() if k.startswith("unet.")})
    # As diffusers' text encoder loader: to its current layout, then to PEFT's.
    text_encoder = {k: v for k, v in converted.items() if k.startswith("text_encoder.")}
    text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text_encoder))
    assert sorted({**unet, **text}) == sorted(peft)
    for key, tensor in {**unet, **text}.items():
        assert torch.equal(tensor, peft[key]), key
    # The alphas diffusers gives apart, read back with the tensors, are ours.
    read = resolve(parse_lora_file(converted, network_alphas=network_alphas), modules)
    assert {name: spec.alpha for name, spec in read.items()} == {name: spec.alpha for name, spec in specs.items()}


# -- metadata ----------------------------------------------------------------------------------------------------


def test_peft_metadata_is_a_lora_config_per_component(modules: Layers) -> None:
    _, metadata = peft_state_dict(specs_of(fluxion_loras(modules, "lora")))
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 3.0 and config["text_encoder.r"] == 2
    assert config["unet.rank_pattern"] == {f"^{UNET.removeprefix('unet.')}.transformer_blocks.0.attn2.to_k": 3}
    assert config["unet.use_dora"] is False and config["unet.alpha_pattern"] == {}
    assert metadata["format"] == "pt"


def test_kohya_metadata_says_what_kohya_and_the_model_spec_say(modules: Layers) -> None:
    _, plain = kohya_state_dict(specs_of(fluxion_loras(modules, "lora")), title="style")
    assert plain == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "2",
        "ss_network_alpha": "3.0",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "style",
        "modelspec.resolution": "512x512",
    }
    loha = {"unet.conv_in": LoraSpec.from_lora(LoHa("x", (8, 4, 3, 3), rank=2))}
    tensors, lycoris = kohya_state_dict(loha, base_model="sdxl_base_v1-0")
    assert sorted(tensors) == [
        f"lora_unet_conv_in.{name}" for name in ("alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    ]
    assert lycoris["ss_network_module"] == "lycoris.kohya" and json.loads(lycoris["ss_network_args"]) == {
        "algo": "loha"
    }
    assert lycoris["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    sdxl = {
        "text_encoder.encoder.layers.0.mlp.fc1": LoraSpec.from_lora(LinearLora("x", 8, 16, rank=1)),
        "text_encoder_2.encoder.layers.0.mlp.fc1": LoraSpec.from_lora(LinearLora("x", 8, 16, rank=1)),
    }
    tensors, _ = kohya_state_dict(sdxl, base_model="sdxl_base_v1-0")
    assert {key.split(".")[0] for key in tensors} == {
        "lora_te1_encoder_layers_0_mlp_fc1",
        "lora_te2_encoder_layers_0_mlp_fc1",
    }


def test_docstring_example_runs() -> None:
    for example in re.findall(r"```py\n(.*?)```", export_module.__doc__ or "", flags=re.DOTALL):
        lines = example.splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        exec("\n".join(line[indent:] for line in lines), {})


# -- errors ------------------------------------------------------------------------------------------------------


def test_what_a_layout_cannot_say_is_refused() -> None:
    loha = LoraSpec.from_lora(LoHa("x", (8, 8), rank=2))
    with pytest.raises(
        ValueError, match=r"unet.a: a loha has no PEFT/diffusers layout \(lora_A/lora_B\): write a kohya file"
    ):
        peft_state_dict({"unet.a": loha})
    by_input = LoraSpec.from_lora(Dora("x", LinearLora("x", 8, 8, rank=2), axis="input"))
    with pytest.raises(ValueError, match=r"unet.a: its DoRA normalises per input column, PEFT's per output row"):
        peft_state_dict({"unet.a": by_input})
    plain = LoraSpec.from_lora(LinearLora("x", 8, 8, rank=2))
    dora = LoraSpec.from_lora(Dora("x", LinearLora("x", 8, 8, rank=2)))
    with pytest.raises(ValueError, match=r"unet mixes DoRA and plain LoRAs"):
        peft_state_dict({"unet.a": plain, "unet.b": dora})
    with pytest.raises(ValueError, match=r"'to_q' has no component: name modules .* e.g. 'unet.to_q'"):
        kohya_state_dict({"to_q": plain})
    with pytest.raises(ValueError, match=r"kohya files for sd_v1 have no prefix for 'text_encoder_2'"):
        kohya_state_dict({"text_encoder_2.a": plain})
    with pytest.raises(TypeError, match=r"no LoRA file layout for a object"):
        LoraSpec.from_lora(object())  # pyright: ignore[reportArgumentType]
    assert isinstance(LoraSpec.from_lora(Conv2dLora("x", 4, 4, rank=1)).to_lora("x", fl.Conv2d(4, 4, 1)), Conv2dLora)
