"""SDXL LoRA files of every kind found in the wild, on the toy SDXL, equal to the reference that can load each.

Each file is laid out as the tool that makes it lays it out, with random factors that move every output:

- LyCORIS LoCon (kohya names, SGM blocks, `lora_te1_`/`lora_te2_`): down/up pairs on attention, feed-forward,
  3x3 and 1x1 convolutions, the resnets' time projections, `conv_in`, `conv_out` and the embeddings, and Tucker
  cores (`lora_mid`) on 3x3 convolutions;
- LyCORIS LoHa and LoKr (kohya names, SGM blocks, both text encoders);
- DoRA: LyCORIS's `dora_scale` (kohya names) and PEFT's `lora_magnitude_vector` (diffusers' `save_lora_weights`);
- LCM-LoRA SDXL (latent-consistency/lcm-lora-sdxl's `pytorch_lora_weights.safetensors`, float16): kohya names after
  diffusers' modules (`lora_unet_down_blocks_1_attentions_0_proj_in`), alpha / rank = 8 / 64 there, on the modules
  diffusers' `train_lcm_distill_lora_sdxl.py` targets (attention, feed-forward, resnets' convolutions, shortcuts and
  time projections, down- and upsamplers); no text encoder;
- SDXL-Lightning (ByteDance's `sdxl_lightning_4step_lora.safetensors`, float16): kohya's layout after the SGM UNet
  (`lora_unet_input_blocks_4_1_...`, `..._in_layers_2`, `..._emb_layers_1`, `..._op`), convolutions included; no text
  encoder.

The reference is diffusers' `StableDiffusionXLPipeline.load_lora_weights` wherever diffusers loads the file. It does
not load LoHa, LoKr or Tucker cores on SDXL (it refuses the file: checked), and drops `dora_scale` (with a warning):
there the reference is PEFT's own LoHa / LoKr / DoRA layers put in the pipeline's models with the file's factors, or
for Tucker cores, LyCORIS's merged weight written out here. Outputs (text embedding, pooled embedding, UNet
prediction; latents of whole generations) agree within 1e-4 of the reference's scale.
"""

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from peft import (  # pyright: ignore[reportMissingTypeStubs]
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    inject_adapter_in_model,  # pyright: ignore[reportUnknownVariableType]
)
from peft.tuners.tuners_utils import BaseTunerLayer  # pyright: ignore[reportMissingTypeStubs]
from peft.utils import get_peft_model_state_dict  # pyright: ignore[reportMissingTypeStubs]
from safetensors.torch import load_file, save_file
from torch import Tensor
from toy_sdxl import SCHEDULER_CONFIG, Twins, build_twins

import refiners.fluxion.layers as fl
from refiners.adapters.lora import SDLoraManager, SDXLLoraAdapter, UnmatchedLoraKeysError
from refiners.foundationals.latent_diffusion import DDIM, Euler, LCMSolver, Solver
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
    SDXL_LIGHTNING_SOLVER_PARAMS,
    SDXL_SOLVER_PARAMS,
    StableDiffusion_XL,
)
from refiners.foundationals.latent_diffusion.unet_names import unet_renaming

PROMPT = "a cute cat"
HEIGHT, WIDTH = 64, 48
SEED = 12

ATTENTION = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|proj_(in|out)|ff\.net\.(0\.proj|2))$")
RESNETS = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$")
TEXT = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
UNET_TARGETS = ("unet", (ATTENTION, RESNETS))
TEXT_TARGETS = [("text_encoder", (TEXT,)), ("text_encoder_2", (TEXT,))]
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

Targets = list[tuple[str, tuple[re.Pattern[str], ...]]]
Outputs = tuple[Tensor, Tensor, Tensor]


@pytest.fixture(scope="module")
def twins() -> Twins:
    return build_twins()


@pytest.fixture(scope="module")
def plain(twins: Twins) -> Outputs:
    """The outputs without LoRA (ours equal diffusers' there: see test_sdxl_unet, test_sdxl_text_encoder)."""
    return outputs(sdxl(twins))


def sdxl(twins: Twins, solver: Solver | None = None) -> StableDiffusion_XL:
    return StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=solver or DDIM(num_inference_steps=4, params=SDXL_SOLVER_PARAMS),
        default_size=64,
    )


def targets(model: StableDiffusion_XL, chosen: Targets) -> dict[str, fl.Linear | fl.Conv2d]:
    """The layers of `model` a file updates: by diffusers' module name, component first."""
    found: dict[str, fl.Linear | fl.Conv2d] = {}
    for name, module in model.diffusers_modules().items():
        component, _, rest = name.partition(".")
        for target_component, patterns in chosen:
            if component == target_component and any(p.search(rest) for p in patterns):
                assert isinstance(module, fl.Linear | fl.Conv2d)
                found[name] = module
    return found


def kohya_name(module: str, model: StableDiffusion_XL, sgm: bool = True) -> str:
    """kohya's name of a module: the SGM UNet's (kohya trains SDXL on it) or diffusers', flattened, prefixed."""
    component, _, rest = module.partition(".")
    if component == "unet" and sgm:
        original = unet_renaming(model.unet).to_original(rest)
        assert original is not None, module
        rest = original
    return KOHYA_PREFIXES[component] + rest.replace(".", "_")


def randn(*shape: int, generator: torch.Generator, std: float) -> Tensor:
    return torch.randn(shape, generator=generator) * std


def kohya_pair(layer: fl.Linear | fl.Conv2d, rank: int, generator: torch.Generator, std: float) -> dict[str, Tensor]:
    """A down/up pair as kohya and LyCORIS write it: for a convolution, a k x k down and a 1x1 up."""
    if isinstance(layer, fl.Linear):
        down = randn(rank, layer.in_features, generator=generator, std=std)
        up = randn(layer.out_features, rank, generator=generator, std=std)
    else:
        out_channels, in_channels, *kernel = layer.weight.shape
        down = randn(rank, in_channels, *kernel, generator=generator, std=std)
        up = randn(out_channels, rank, 1, 1, generator=generator, std=std)
    return {"lora_down.weight": down, "lora_up.weight": up}


def outputs(model: StableDiffusionXLPipeline | StableDiffusion_XL) -> Outputs:
    """Text embedding, pooled embedding and UNet prediction on fixed inputs."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 6, generator=generator)
    time_ids = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]])
    with torch.no_grad():
        if isinstance(model, StableDiffusionXLPipeline):
            embedding, _, pooled, _ = model.encode_prompt(
                PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False
            )
            assert pooled is not None
            added = {"text_embeds": pooled, "time_ids": time_ids}
            prediction = model.unet(x, 500, encoder_hidden_states=embedding, added_cond_kwargs=added).sample
        else:
            embedding, pooled = model.clip_text_encoder(PROMPT)
            model.set_unet_context(
                timestep=torch.tensor([500]),
                clip_text_embedding=embedding,
                pooled_text_embedding=pooled,
                time_ids=time_ids,
            )
            prediction = model.unet(x)
    return embedding, pooled, prediction


def assert_close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def assert_matches(
    model: StableDiffusion_XL, path: Path, reference: Any, plain: Outputs, text_encoders: bool = True
) -> None:
    """Ours with the file loaded equals `reference`; the LoRA moves the UNet's prediction, and the text embeddings
    if it updates `text_encoders`; ejecting it gives the model back exactly."""
    expected = outputs(reference)
    adapter = SDXLLoraAdapter.from_safetensors(target=model, checkpoint_path=path).inject()
    actual = outputs(model)
    for ours, theirs in zip(actual, expected, strict=True):
        assert_close(ours, theirs)
    for index, (ours, before) in enumerate(zip(actual, plain, strict=True)):
        moves = bool((ours - before).abs().max() > 1e-2 * before.abs().max())
        assert moves == (text_encoders or index == 2), ("embedding", "pooled embedding", "prediction")[index]
    adapter.eject()
    for ours, before in zip(outputs(model), plain, strict=True):
        torch.testing.assert_close(ours, before, atol=0, rtol=0)


def diffusers_loads(twins: Twins, path: Path, adapter_name: str | None = None) -> StableDiffusionXLPipeline:
    """A copy of the toy pipeline with the file loaded by diffusers, which puts a LoRA on every module it names."""
    pipeline = copy.deepcopy(twins.pipeline)
    pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
    return pipeline


def tuned_modules(pipeline: StableDiffusionXLPipeline) -> set[str]:
    """The modules PEFT wraps, by our module name."""
    return set(peft_layers(pipeline))


def with_peft(
    twins: Twins, model: StableDiffusion_XL, chosen: Targets, config: Callable[[list[str]], Any]
) -> StableDiffusionXLPipeline:
    """A copy of the toy pipeline with PEFT's adapter of `config(module names)` in each component the file updates."""
    pipeline = copy.deepcopy(twins.pipeline)
    by_component: dict[str, list[str]] = {}
    for name in targets(model, chosen):
        component, _, rest = name.partition(".")
        by_component.setdefault(component, []).append(_transformers_name(rest))
    for component, names in by_component.items():
        inject_adapter_in_model(config(names), getattr(pipeline, component))
    return pipeline


def _transformers_name(name: str) -> str:
    # transformers 5's CLIPTextModel has no `text_model` wrapper.
    return name.removeprefix("text_model.")


def peft_layers(pipeline: StableDiffusionXLPipeline) -> dict[str, Any]:
    """PEFT's layers, by our module name (component first, the text encoders' under `text_model.`)."""
    layers: dict[str, Any] = {}
    for component in COMPONENTS:
        for name, module in getattr(pipeline, component).named_modules():
            if isinstance(module, BaseTunerLayer):
                # transformers 5's CLIPTextModel has no `text_model` wrapper; CLIPTextModelWithProjection keeps it.
                if component != "unet" and not name.startswith("text_model."):
                    name = f"text_model.{name}"
                layers[f"{component}.{name}"] = module
    return layers


def save(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path


# -- LyCORIS ---------------------------------------------------------------------------------------------------


# LyCORIS's `full` preset also trains the UNet's first and last convolutions and its time embedding (SGM names
# `input_blocks.0.0`, `out.2`, `time_embed.*`); the text-time embedding (`label_emb.0.*`), which diffusers maps too,
# is added here.
EMBEDDINGS = re.compile(r"^(conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])$")
LOCON_TARGETS: Targets = [("unet", (ATTENTION, RESNETS, EMBEDDINGS)), *TEXT_TARGETS]


def test_a_locon_file_matches_diffusers(twins: Twins, tmp_path: Path, plain: Outputs) -> None:
    model = sdxl(twins)
    generator = torch.Generator().manual_seed(2)
    layers = targets(model, LOCON_TARGETS)
    tucker = [name for name, layer in layers.items() if layer.weight.shape[2:] == (3, 3)][::3]
    tensors: dict[str, Tensor] = {}
    merged: dict[str, Tensor] = {}
    for name, layer in layers.items():
        key, rank = kohya_name(name, model), 4
        alpha = torch.tensor(2.0 if name.startswith("unet") else 3.0)
        if name in tucker:
            # LyCORIS's LoCon with `use_tucker`: 1x1 down, k x k core, 1x1 up. Its merged weight, as LyCORIS rebuilds
            # it (`rebuild_tucker`), is the reference: neither diffusers nor PEFT has Tucker cores for LoRA.
            out_channels, in_channels, *kernel = layer.weight.shape
            down = randn(rank, in_channels, 1, 1, generator=generator, std=0.3)
            mid = randn(rank, rank, *kernel, generator=generator, std=0.3)
            up = randn(out_channels, rank, 1, 1, generator=generator, std=0.3)
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up}
            rebuilt = torch.einsum("i j k l, j r, i p -> p r k l", mid, down[:, :, 0, 0], up[:, :, 0, 0].T)
            merged[name] = rebuilt * alpha / rank
        else:
            tensors |= {f"{key}.{role}": tensor for role, tensor in kohya_pair(layer, rank, generator, 0.3).items()}
        tensors[f"{key}.alpha"] = alpha
    path = save(tmp_path / "locon.safetensors", tensors, {"ss_network_module": "lycoris.kohya"})
    assert len(tucker) >= 5 and any(".lora_down.weight" in k and v.shape[2:] == (3, 3) for k, v in tensors.items())
    for module in ("input_blocks_0_0", "out_2", "time_embed_0", "label_emb_0_2", "middle_block_1_proj_in"):
        assert f"lora_unet_{module}.alpha" in tensors, module

    with pytest.raises(ValueError, match="have not been correctly renamed"):
        diffusers_loads(twins, path)
    keep = {
        key: value for key, value in tensors.items() if key.split(".")[0] not in {kohya_name(n, model) for n in tucker}
    }
    reference = diffusers_loads(twins, save(tmp_path / "without_tucker.safetensors", keep))
    assert tuned_modules(reference) == set(layers) - set(tucker)
    with torch.no_grad():
        for name, delta in merged.items():
            reference.unet.get_submodule(name.removeprefix("unet.")).weight.add_(delta)
    assert_matches(model, path, reference, plain)


LYCORIS_KINDS: dict[str, Callable[[list[str]], Any]] = {
    # LyCORIS's LoHa and LoKr on attention, feed-forward, resnets and samplers (kohya's `conv_dim`), both encoders;
    # with `use_tucker`, a 3x3 convolution's factors have Tucker cores (`hada_t1`/`hada_t2`, `lokr_t2`).
    "loha": lambda names: LoHaConfig(r=2, alpha=3, target_modules=names, init_weights=False),
    "loha-tucker": lambda names: LoHaConfig(
        r=2, alpha=3, target_modules=names, init_weights=False, use_effective_conv2d=True
    ),
    "lokr": lambda names: LoKrConfig(r=2, alpha=3, target_modules=names, init_weights=False, decompose_both=True),
    "lokr-tucker": lambda names: LoKrConfig(
        r=2, alpha=3, target_modules=names, init_weights=False, decompose_both=True, use_effective_conv2d=True
    ),
}


@pytest.mark.parametrize("kind", list(LYCORIS_KINDS))
def test_loha_and_lokr_files_match_peft(twins: Twins, tmp_path: Path, plain: Outputs, kind: str) -> None:
    model = sdxl(twins)
    reference = with_peft(twins, model, LOCON_TARGETS, LYCORIS_KINDS[kind])
    generator = torch.Generator().manual_seed(3)
    tensors: dict[str, Tensor] = {}
    prefix = "hada_" if kind.startswith("loha") else "lokr_"
    for name, layer in peft_layers(reference).items():
        key = kohya_name(name, model)
        factors: dict[str, Any] = {
            attribute: getattr(layer, attribute)["default"]
            for attribute in layer.adapter_layer_names
            if attribute.startswith(prefix) and "default" in getattr(layer, attribute)
        }
        if prefix == "lokr_":
            # LyCORIS applies alpha / rank only where a factor is low-rank (PEFT always): every layer here has one.
            assert any(role.endswith(("_a", "_b")) for role in factors), name
        with torch.no_grad():
            for role, factor in factors.items():
                factor.copy_(randn(*factor.shape, generator=generator, std=0.45 if prefix == "hada_" else 0.3))
                tensors[f"{key}.{role}"] = factor.detach().clone()
        tensors[f"{key}.alpha"] = torch.tensor(3.0)
    path = save(tmp_path / f"{kind}.safetensors", tensors, {"ss_network_module": "lycoris.kohya"})
    assert {key.split(".")[0] for key in tensors} == {kohya_name(n, model) for n in targets(model, LOCON_TARGETS)}
    assert any(key.endswith(("hada_t1", "lokr_t2")) for key in tensors) == kind.endswith("tucker")

    with pytest.raises(ValueError, match="have not been correctly renamed"):
        diffusers_loads(twins, path)
    assert_matches(model, path, reference, plain)


# -- DoRA ------------------------------------------------------------------------------------------------------


DORA_TARGETS: Targets = [
    ("unet", (re.compile(r"(attn[12]\.to_(q|v)|ff\.net\.2|resnets\.0\.conv1|proj_out)$"),)),
    ("text_encoder", (re.compile(r"self_attn\.(k|out)_proj$"),)),
    ("text_encoder_2", (re.compile(r"(self_attn\.q_proj|mlp\.fc1)$"),)),
]


@pytest.fixture(scope="module")
def dora_run(twins: Twins) -> StableDiffusionXLPipeline:
    """PEFT's DoRA layers in each component, with random factors and magnitudes (a training run's state)."""
    model = sdxl(twins)
    pipeline = with_peft(
        twins,
        model,
        DORA_TARGETS,
        lambda names: LoraConfig(r=3, lora_alpha=5, target_modules=names, use_dora=True, init_lora_weights=False),
    )
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in peft_layers(pipeline).values():
            for projection in (layer.lora_A["default"], layer.lora_B["default"]):
                projection.weight.copy_(randn(*projection.weight.shape, generator=generator, std=0.3))
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(torch.rand(magnitude.shape, generator=generator) + 0.5)
    return pipeline


def test_a_kohya_dora_file_matches_peft(twins: Twins, tmp_path: Path, plain: Outputs, dora_run: Any) -> None:
    # LyCORIS's DoRA (`dora_wd`), as kohya's scripts save it: `dora_scale` per output row, (out, 1) or (out, 1, 1, 1).
    model = sdxl(twins)
    tensors: dict[str, Tensor] = {}
    for name, layer in peft_layers(dora_run).items():
        key = kohya_name(name, model)
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        magnitude = layer.lora_magnitude_vector["default"].weight
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(5.0)}
        tensors[f"{key}.dora_scale"] = magnitude.reshape(-1, *[1] * (down.dim() - 1))
    path = save(tmp_path / "dora.safetensors", {k: v.detach().clone() for k, v in tensors.items()})
    assert any(v.dim() == 4 for k, v in tensors.items() if k.endswith("dora_scale"))
    # diffusers drops `dora_scale` (with a warning), so PEFT's DoRA layers are the reference.
    assert_matches(model, path, dora_run, plain)


def test_a_peft_dora_file_matches_diffusers(twins: Twins, tmp_path: Path, plain: Outputs, dora_run: Any) -> None:
    model = sdxl(twins)
    layers: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    for component in COMPONENTS:
        peft_model = getattr(dora_run, component)
        layers[component] = get_peft_model_state_dict(peft_model)
        config = next(iter(peft_model.peft_config.values()))
        configs[component] = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=configs["unet"],
        text_encoder_lora_adapter_metadata=configs["text_encoder"],
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"],
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    reference = diffusers_loads(twins, path)
    # diffusers loses the text encoders' DoRA magnitudes (transformers reports their keys as unexpected): there the
    # reference is the PEFT run itself.
    reference.text_encoder, reference.text_encoder_2 = dora_run.text_encoder, dora_run.text_encoder_2
    assert_matches(model, path, reference, plain)


# -- LCM-LoRA and SDXL-Lightning -------------------------------------------------------------------------------


def lcm_lora(model: StableDiffusion_XL, path: Path) -> Path:
    """latent-consistency/lcm-lora-sdxl's layout: diffusers' module names in kohya's form, every UNet module that
    `train_lcm_distill_lora_sdxl.py` targets (alpha / rank = 8 / 64 there)."""
    generator = torch.Generator().manual_seed(6)
    tensors: dict[str, Tensor] = {}
    for name, layer in targets(model, [UNET_TARGETS]).items():
        key = kohya_name(name, model, sgm=False)
        tensors |= {f"{key}.{role}": t for role, t in kohya_pair(layer, 8, generator, 0.8).items()}
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.alpha" in tensors
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_0_resnets_0_time_emb_proj.lora_up.weight" in tensors
    # Published in float16, as both files are.
    return save(path, {key: value.half() for key, value in tensors.items()})


def lightning_lora(model: StableDiffusion_XL, path: Path) -> Path:
    """ByteDance/SDXL-Lightning's LoRA layout: kohya's, on its SGM UNet (the modules of its Transformer2DModel,
    ResnetBlock2D, Downsample2D and Upsample2D blocks, as kohya's `conv_dim` option takes them)."""
    generator = torch.Generator().manual_seed(7)
    tensors: dict[str, Tensor] = {}
    for name, layer in targets(model, [UNET_TARGETS]).items():
        key = kohya_name(name, model)
        tensors |= {f"{key}.{role}": t for role, t in kohya_pair(layer, 4, generator, 0.3).items()}
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    for key in [
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_up.weight",
        "lora_unet_middle_block_0_emb_layers_1.alpha",
        "lora_unet_input_blocks_3_0_op.lora_down.weight",
        "lora_unet_output_blocks_2_2_conv.lora_down.weight",
        "lora_unet_output_blocks_0_0_skip_connection.lora_up.weight",
        "lora_unet_output_blocks_8_0_out_layers_3.lora_up.weight",
    ]:
        assert key in tensors, key
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}
    return save(path, {key: value.half() for key, value in tensors.items()}, metadata)


@pytest.mark.parametrize("kind", ["lcm", "lightning"])
def test_lcm_and_lightning_loras_match_diffusers(twins: Twins, tmp_path: Path, plain: Outputs, kind: str) -> None:
    model = sdxl(twins)
    write = lcm_lora if kind == "lcm" else lightning_lora
    path = write(model, tmp_path / f"{kind}.safetensors")
    reference = diffusers_loads(twins, path)
    assert tuned_modules(reference) == set(targets(model, [UNET_TARGETS]))
    # UNet only: the text embeddings stay.
    assert_matches(model, path, reference, plain, text_encoders=False)


def reference_latents(pipeline: StableDiffusionXLPipeline, scheduler: Any, guidance_scale: float) -> Tensor:
    pipeline.scheduler = scheduler
    with torch.no_grad():
        output: Any = pipeline(
            PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=4,
            guidance_scale=guidance_scale,
            output_type="latent",
            generator=torch.Generator().manual_seed(SEED),
        )
    return output.images


def our_latents(model: StableDiffusion_XL) -> Tensor:
    """A generation without classifier-free guidance (`generate`'s loop, up to the latents)."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        embedding, pooled = model.clip_text_encoder(PROMPT)
        time_ids = model.default_time_ids(original_size=(HEIGHT, WIDTH), target_size=(HEIGHT, WIDTH))
        conditioning = {"clip_text_embedding": embedding, "pooled_text_embedding": pooled, "time_ids": time_ids}
        x = model.init_latents((HEIGHT, WIDTH), generator=generator)
        for step in model.steps:
            x = model._denoise(x, step, conditioning, None, generator)  # pyright: ignore[reportPrivateUsage]
    return x


@pytest.mark.parametrize("kind", ["lcm", "lightning"])
def test_few_step_generations_with_the_lora_match_diffusers(twins: Twins, tmp_path: Path, kind: str) -> None:
    # LCM-LoRA: LCMScheduler, guidance 1. SDXL-Lightning: Euler with "trailing" timesteps, guidance 0.
    solver: Solver
    if kind == "lcm":
        path = lcm_lora(sdxl(twins), tmp_path / "lcm.safetensors")
        scheduler: Any = LCMScheduler.from_config(SCHEDULER_CONFIG)
        solver, guidance_scale = LCMSolver(num_inference_steps=4), 1.0
    else:
        path = lightning_lora(sdxl(twins), tmp_path / "lightning.safetensors")
        scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG, timestep_spacing="trailing")
        solver, guidance_scale = Euler(num_inference_steps=4, params=SDXL_LIGHTNING_SOLVER_PARAMS), 0.0
    reference = diffusers_loads(twins, path, adapter_name=kind)
    expected = reference_latents(reference, scheduler, guidance_scale)
    model = sdxl(twins, solver)
    without = our_latents(model)
    manager = SDLoraManager(model)
    manager.add_loras(kind, path)
    try:
        actual = our_latents(model)
    finally:
        manager.remove_all()
    assert_close(actual, expected)
    assert (actual - without).abs().max() > 1e-2 * without.abs().max()


# -- strict key accounting -------------------------------------------------------------------------------------


def test_unused_keys_of_an_sdxl_file_are_listed(twins: Twins, tmp_path: Path) -> None:
    model = sdxl(twins)
    tensors = load_file(str(lightning_lora(model, tmp_path / "lightning.safetensors")))
    stray = {
        # a block the toy UNet does not have
        "lora_unet_output_blocks_9_0_in_layers_2.lora_down.weight": torch.zeros(4, 32, 3, 3),
        "lora_unet_output_blocks_9_0_in_layers_2.lora_up.weight": torch.zeros(32, 4, 1, 1),
        # a LoHa missing half its factors, on the second text encoder
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a": torch.zeros(48, 2),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_b": torch.zeros(2, 48),
    }
    path = save(tmp_path / "stray.safetensors", tensors | stray)
    with pytest.raises(UnmatchedLoraKeysError) as raised:
        SDXLLoraAdapter.from_safetensors(target=model, checkpoint_path=path)
    assert set(raised.value.unmatched) == set(stray)
    message = str(raised.value)
    assert "no module of 'unet' is named 'output_blocks_9_0_in_layers_2'" in message
    assert "incomplete loha: no hada_w2_a, hada_w2_b" in message
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a" in message
    # Nothing was put on the model.
    assert SDLoraManager(model).names == []
