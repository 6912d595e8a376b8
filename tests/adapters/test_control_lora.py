"""`SDXLControlnetAdapter.from_control_lora` generates what diffusers' `StableDiffusionXLControlNetPipeline` generates
with the ControlNet the Control-LoRA file describes.

The reference is diffusers' `ControlNetModel.from_unet` of the toy SDXL UNet (tests/toy_sdxl.py) whose encoder weights
are made the base's plus a random low-rank product, whose biases and norms are moved, and whose condition encoder and
zero convolutions are random. The Control-LoRA file is written from it in Stability AI's layout (`ControlLoraSave`:
original key names, `.up`/`.down` pairs for the weights shared with the base UNet, the other tensors whole, all in
float16, and the `lora_controlnet` marker), so that it describes that ControlNet exactly. A short DDIM run at 128x128 on
both sides from the same noise and embeddings: the final latents agree to 1e-4 of their scale.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl import StableDiffusionXLControlNetPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from PIL import Image
from torch import Tensor
from toy_sdxl import POOLED_DIM, Twins, build_twins

from refiners.adapters.controlnet import SDXLControlnet, SDXLControlnetAdapter
from refiners.converters.cli import main
from refiners.converters.controlnet import controlnet_config, convert_controlnet, original_controlnet_renaming
from refiners.fluxion.utils import load_from_safetensors, save_to_safetensors, tensor_to_image
from refiners.foundationals.latent_diffusion import DDIM, SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY_REFINER
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import SDXLUNet
from refiners.foundationals.latent_diffusion.unet_names import unet_renaming

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RELATIVE_ATOL = 1e-4
STEPS = 3
SIZE = 128  # 16x16 latents: 4x4 at the toy's lowest resolution
RANK = 4


def control_lora_of(unet: Any, twin: SDXLUNet, seed: int) -> tuple[ControlNetModel, dict[str, Tensor]]:
    """A diffusers ControlNet of `unet` (whose refiners twin is `twin`) and the Control-LoRA file (tensors) that
    describes it exactly.

    As Stability's `ControlLoraSave`: each tensor of the base UNet (original names) that the ControlNet has is, with
    two or more dimensions, an `up`/`down` pair of their difference, else stored whole; the ControlNet's other tensors
    are stored whole; all in float16. The ControlNet is made what the file says: the base's weights plus the pairs'
    product, float16 values elsewhere.
    """
    controlnet = ControlNetModel.from_unet(unet).eval()
    generator = torch.Generator().manual_seed(seed)
    meta = controlnet_config(dict(controlnet.config)).build((SDXLControlnet,), device="meta")
    controlnet_names = original_controlnet_renaming(meta)
    base = {unet_renaming(twin).to_original(k): v for k, v in unet.state_dict().items()}
    parameters = dict(controlnet.named_parameters())
    tensors: dict[str, Tensor] = {"lora_controlnet": torch.tensor([])}
    with torch.no_grad():
        for key, parameter in parameters.items():
            original = controlnet_names.to_original(key)
            assert original is not None, key
            if original in base and parameter.dim() >= 2:
                out_features, in_features = parameter.shape[0], parameter[0].numel()
                rank = min(RANK, out_features, in_features)
                spread = 0.5 * parameter.std().item() / rank**0.5
                up = (spread * torch.randn(out_features, rank, generator=generator)).half()
                down = torch.randn(rank, in_features, generator=generator).half()
                parameter.copy_(base[original] + (up.float() @ down.float()).reshape(parameter.shape))
                module = original.removesuffix(".weight")
                kernel = parameter.shape[2:]
                tensors[f"{module}.up"] = up.reshape(out_features, rank, *(1 for _ in kernel)).contiguous()
                tensors[f"{module}.down"] = down.reshape(rank, *parameter.shape[1:]).contiguous()
                continue
            if original in base:  # biases and norms: moved, stored whole
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            else:  # the condition encoder and the zero convolutions (diffusers zeroes the last ones)
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
            parameter.copy_(parameter.half().float())
            tensors[original] = parameter.detach().half().contiguous()
    return controlnet, tensors


@dataclass
class Setup:
    twins: Twins
    controlnet: ControlNetModel
    file: Path
    tensors: dict[str, Tensor]
    sd: StableDiffusion_XL
    noise: Tensor
    positive: Tensor
    negative: Tensor
    pooled: Tensor
    negative_pooled: Tensor
    image: Tensor


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    twins = build_twins()
    controlnet, tensors = control_lora_of(twins.pipeline.unet, twins.unet, seed=31)
    file = tmp_path_factory.mktemp("control-lora") / "control-lora-canny-rank4.safetensors"
    save_to_safetensors(file, tensors)
    sd = StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=STEPS),
        default_size=SIZE,
    )
    generator = torch.Generator().manual_seed(32)
    width = twins.unet.context_embedding_dim
    return Setup(
        twins=twins,
        controlnet=controlnet,
        file=file,
        tensors=tensors,
        sd=sd,
        noise=torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator),
        positive=torch.randn(1, 77, width, generator=generator),
        negative=torch.randn(1, 77, width, generator=generator),
        pooled=torch.randn(1, POOLED_DIM, generator=generator),
        negative_pooled=torch.randn(1, POOLED_DIM, generator=generator),
        image=torch.rand(1, 3, SIZE, SIZE, generator=generator),
    )


def diffusers_run(setup: Setup, scale: float) -> Tensor:
    components: dict[str, Any] = {**setup.twins.pipeline.components, "controlnet": setup.controlnet}
    components["scheduler"] = DDIMScheduler.from_config({**setup.twins.pipeline.scheduler.config})
    pipeline = StableDiffusionXLControlNetPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        output: Any = pipeline(
            prompt_embeds=setup.positive,
            negative_prompt_embeds=setup.negative,
            pooled_prompt_embeds=setup.pooled,
            negative_pooled_prompt_embeds=setup.negative_pooled,
            image=setup.image,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            latents=setup.noise.clone(),
            output_type="latent",
            controlnet_conditioning_scale=scale,
        )
    return output.images


def our_run(setup: Setup) -> Tensor:
    sd = setup.sd
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    x = sd.init_latents((SIZE, SIZE), noise=setup.noise.clone())
    with torch.no_grad():
        for step in sd.steps:
            x = sd(
                x,
                step=step,
                clip_text_embedding=torch.cat([setup.negative, setup.positive]),
                pooled_text_embedding=torch.cat([setup.negative_pooled, setup.pooled]),
                time_ids=time_ids,
                condition_scale=5.0,
            )
    return x


def run_with(setup: Setup, weights: Path | dict[str, Tensor], scale: float) -> Tensor:
    adapter = SDXLControlnetAdapter.from_control_lora(setup.sd.unet, weights=weights, name="canny", scale=scale)
    adapter.inject()
    try:
        adapter.set_controlnet_condition(setup.image)
        return our_run(setup)
    finally:
        adapter.eject()


def test_control_lora_matches_diffusers(setup: Setup) -> None:
    expected = diffusers_run(setup, scale=0.9)
    actual = run_with(setup, setup.file, scale=0.9)
    tolerance = RELATIVE_ATOL * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=0)
    # The ControlNet acts, and its low-rank differences from the base UNet do.
    assert (our_run(setup) - expected).abs().max() > 10 * tolerance
    without_deltas = {k: v for k, v in setup.tensors.items() if not k.endswith((".up", ".down"))}
    assert (run_with(setup, without_deltas, scale=0.9) - expected).abs().max() > 10 * tolerance


def test_the_controlnet_is_the_base_plus_the_file(setup: Setup) -> None:
    """Weight by weight, the ControlNet built is diffusers' (converted by our converter's key map), and owns its
    tensors (the base UNet's are not shared)."""
    from refiners.converters.controlnet import diffusers_controlnet_modules

    adapter = SDXLControlnetAdapter.from_control_lora(setup.sd.unet, weights=setup.file)
    modules = diffusers_controlnet_modules(adapter.controlnet)
    reference = setup.controlnet.state_dict()
    for name, module in modules.items():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            expected = reference[f"{name}.{parameter_name}"]
            scale = expected.abs().max().item()
            torch.testing.assert_close(parameter.data, expected, atol=1e-6 * scale, rtol=0, msg=name)
    unet_storages = {p.data_ptr() for p in setup.sd.unet.parameters()}
    assert all(p.data_ptr() not in unet_storages for p in adapter.controlnet.parameters())
    # A second one builds the same beside the first, injected (two Control-LoRAs on one UNet).
    adapter.inject()
    try:
        second = SDXLControlnetAdapter.from_control_lora(setup.sd.unet, weights=setup.file, name="depth")
    finally:
        adapter.eject()
    first_state, second_state = adapter.controlnet.state_dict(), second.controlnet.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)


def test_eject_gives_back_the_exact_model(setup: Setup) -> None:
    unet = setup.sd.unet
    modules, state = list(unet.modules()), {k: v.clone() for k, v in unet.state_dict().items()}
    representation = repr(unet)
    unet.set_timestep(500)
    unet.set_clip_text_embedding(torch.cat([setup.negative, setup.positive]))
    unet.set_pooled_text_embedding(torch.cat([setup.negative_pooled, setup.pooled]))
    unet.set_time_ids(torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32))
    x = torch.cat([setup.noise[:, :, :8, :8], setup.noise[:, :, 8:, 8:]])  # 64x64: exactness needs no more
    with torch.no_grad():
        before = unet(x)
    adapter = SDXLControlnetAdapter.from_control_lora(unet, weights=setup.file).inject()
    adapter.set_controlnet_condition(setup.image[:, :, :64, :64])
    with torch.no_grad():
        assert not torch.equal(unet(x), before)
    adapter.eject()
    assert list(unet.modules()) == modules and repr(unet) == representation
    after = unet.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(unet(x), before)


# -- bad input -----------------------------------------------------------------------------------------------------


def test_an_sd1_unet_is_refused(setup: Setup) -> None:
    unet: Any = SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=16, num_attention_heads=2, device="meta")
    with pytest.raises(
        ValueError, match=r"^SDXLControlnetAdapter.from_control_lora loads SDXL Control-LoRAs, got a SD1UNet: load"
    ):
        SDXLControlnetAdapter.from_control_lora(unet, weights=setup.file)


def test_a_file_without_the_marker_is_refused(setup: Setup, tmp_path: Path) -> None:
    file = tmp_path / "controlnet.safetensors"
    save_to_safetensors(file, {k: v for k, v in setup.tensors.items() if k != "lora_controlnet"})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(file))} is not a Control-LoRA file: it has no 'lora_"):
        SDXLControlnetAdapter.from_control_lora(setup.sd.unet, weights=file)


def test_unknown_and_missing_keys_are_listed(setup: Setup) -> None:
    tensors = dict(setup.tensors)
    tensors["input_blocks.1.0.extra.weight"] = torch.zeros(2)
    del tensors["zero_convs.0.0.bias"]
    del tensors["input_blocks.1.0.in_layers.2.up"]
    with pytest.raises(ValueError, match=r"^the Control-LoRA tensors does not fit this SDXLUNet") as error:
        SDXLControlnetAdapter.from_control_lora(setup.sd.unet, weights=tensors)
    message = str(error.value)
    assert "\n" not in message
    assert "1 unknown keys: input_blocks.1.0.extra.weight;" in message
    assert "2 missing keys: input_blocks.1.0.in_layers.2.up, zero_convs.0.0.bias" in message


def test_refiners_convert_controlnet_points_to_from_control_lora(setup: Setup, tmp_path: Path) -> None:
    expected = (
        r"is a Control-LoRA \(it has 'lora_controlnet'\): it needs no conversion, load it with "
        r"SDXLControlnetAdapter\.from_control_lora\(target=sdxl\.unet, weights='.*'\)$"
    )
    with pytest.raises(ValueError, match=expected):
        convert_controlnet(setup.file, tmp_path / "out.safetensors")


def test_a_control_lora_of_another_base_model_is_refused(setup: Setup) -> None:
    refiner = TINY_REFINER.unet.build((SDXLUNet,))
    with pytest.raises(ValueError, match=r"does not fit this SDXLUNet .*(unknown keys|shapes differ)"):
        SDXLControlnetAdapter.from_control_lora(refiner, weights=setup.file)


# -- the README ----------------------------------------------------------------------------------------------------


def test_the_readme_control_lora_block_runs(setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Control-LoRA block word for word (3 steps instead of 30), on the toy SDXL converted as `sdxl/`
    and its Control-LoRA saved as Stability's file name."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("## ControlNet")
    section = readme[start : readme.index("\n## ", start)]
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    (block,) = [block for block in blocks if "from_control_lora" in block]
    assert "num_inference_steps=30" in block
    pipeline = setup.twins.pipeline
    pipeline.save_pretrained(tmp_path / "toy-sdxl")
    monkeypatch.chdir(tmp_path)
    assert main(["sdxl", "--from", str(tmp_path / "toy-sdxl"), "--to", "sdxl/"]) == 0
    save_to_safetensors(tmp_path / "control-lora-canny-rank128.safetensors", setup.tensors)
    assert load_from_safetensors(tmp_path / "control-lora-canny-rank128.safetensors").keys() == setup.tensors.keys()
    tensor_to_image(setup.image[:, :, :64, :64]).save("canny_edges.png")  # the toy's native size
    code = block.replace("num_inference_steps=30", "num_inference_steps=3")
    exec(compile(code, "README.md, Control-LoRA block", "exec"), {"__name__": "readme"})
    assert Image.open("control_lora_cat.png").size == (64, 64)
