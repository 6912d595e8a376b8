"""IP-Adapter FaceID (SD1 and SDXL) equals diffusers' `load_ip_adapter(..., image_encoder_folder=None)` with
`ip_adapter_image_embeds` over a DDIM generation, with h94-layout files written here from random weights.

A FaceID `.bin` also holds a LoRA of every attention of the UNet, which diffusers' `load_ip_adapter` applies with
`load_lora_weights`: ours goes through our LoRA loading, from the `.bin` (`ip_adapter.lora`) or from the kohya file
h94 publishes beside it (`ip-adapter-faceid_sd15_lora.safetensors`, converted from the `.bin`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from ip_adapter_files import FACE_DIM, PROJECTIONS, faceid_weights, save_bin
from torch import Tensor
from toy_sd1 import ours, reference, save_toy_sd1
from toy_sdxl import SCHEDULER_CONFIG, build_twins

from refiners.adapters.ip_adapter import IPAdapter, SD1IPAdapter, SDXLIPAdapter
from refiners.adapters.lora import SD1LoraAdapter, SDLoraManager
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.clip import CLIPImageEncoder
from refiners.foundationals.latent_diffusion import DDIM, LatentDiffusionModel, StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL

PROMPT = "a photo of a woman"
STEPS = 3


def save_kohya_lora(unet: Any, tensors: dict[str, Tensor], path: Path) -> Path:
    """The `.bin`'s LoRA as h94's `*_lora.safetensors` holds it: kohya names (`lora_unet_..._attn1_to_out_0`)."""
    kohya: dict[str, Tensor] = {}
    for key_id, name in enumerate(unet.attn_processors):
        module = name.removesuffix(".processor").replace(".", "_")
        for projection in PROJECTIONS:
            flat = f"lora_unet_{module}_{'to_out_0' if projection == 'to_out' else projection}"
            for role in ("down", "up"):
                kohya[f"{flat}.lora_{role}.weight"] = tensors[f"ip_adapter.{key_id}.{projection}_lora.{role}.weight"]
    save_to_safetensors(path, kohya)
    return path


def face() -> Tensor:
    """A face embedding as insightface gives it (`normed_embedding`: unit norm)."""
    return torch.nn.functional.normalize(torch.randn(FACE_DIM, generator=torch.Generator().manual_seed(7)), dim=0)


def diffusers_embeds(embedding: Tensor) -> Tensor:
    """diffusers' FaceID example: `(2, faces, 512)`, zeros for the negative."""
    faces = embedding.reshape(1, -1, FACE_DIM)
    return torch.cat([torch.zeros_like(faces), faces])


def reference_latents(pipeline: Any, size: int, **kwargs: Any) -> Tensor:
    with torch.no_grad():
        output = pipeline(
            PROMPT,
            num_inference_steps=STEPS,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
            **kwargs,
        )
    return output.images


def our_latents(model: LatentDiffusionModel[Any, Any], size: int) -> Tensor:
    with torch.no_grad():
        return model.generate_latents(
            PROMPT, num_inference_steps=STEPS, height=size, width=size, seed=1, progress=False
        )


def load_reference(pipeline: Any, path: Path, scale: float) -> None:
    pipeline.load_ip_adapter(
        str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None, low_cpu_mem_usage=False
    )
    pipeline.set_ip_adapter_scale(scale)


@dataclass
class Case:
    """Our model, the FaceID files, and diffusers' latents with and without the FaceID IP-Adapter."""

    model: StableDiffusion_1
    bin: Path
    kohya_lora: Path
    expected: Tensor
    plain: Tensor

    @property
    def tolerance(self) -> float:
        return 1e-4 * self.expected.abs().max().item()

    def difference(self, actual: Tensor) -> float:
        return (actual - self.expected).abs().max().item()


SIZE = 128  # the toy SD1 UNet has 4 resolutions: at 64 pixels its lowest is 1x1 and ill-conditioned
SCALE = 0.7


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("faceid_sd1")
    diffusers_folder, converted = save_toy_sd1(folder)
    pipeline: Any = reference(StableDiffusionPipeline, diffusers_folder)
    tensors = faceid_weights(pipeline.unet)
    path = save_bin(tensors, folder / "ip-adapter-faceid_sd15.bin")
    kohya = save_kohya_lora(pipeline.unet, tensors, folder / "ip-adapter-faceid_sd15_lora.safetensors")
    load_reference(pipeline, path, SCALE)
    expected = reference_latents(pipeline, SIZE, ip_adapter_image_embeds=[diffusers_embeds(face())])
    model = ours(converted)
    return Case(model, path, kohya, expected, our_latents(model, SIZE))


def check_ejected(case: Case, before: str, keys: list[str]) -> None:
    assert repr(case.model.unet) == before
    assert list(case.model.unet.state_dict()) == keys
    assert torch.equal(our_latents(case.model, SIZE), case.plain)


def test_sd1_faceid_with_its_lora_matches_diffusers(sd1: Case) -> None:
    """The `.bin`'s LoRA (`ip_adapter.lora`) added through `SDLoraManager`; ejecting both restores the model."""
    model = sd1.model
    before, keys = repr(model.unet), list(model.unet.state_dict())
    adapter = SD1IPAdapter(target=model.unet, weights=sd1.bin, scale=SCALE)
    assert adapter.kind == "faceid" and len(adapter.lora) == 2 * 4 * 2 * len(adapter.cross_attention_names)
    manager = SDLoraManager(model)
    manager.add_loras("faceid", adapter.lora)
    adapter.inject()
    adapter.set_face_embedding(face())
    actual = our_latents(model, SIZE)
    adapter.eject()
    manager.remove_loras("faceid")
    difference = sd1.difference(actual)
    assert difference <= sd1.tolerance, f"max abs difference {difference:.3g} (tolerance {sd1.tolerance:.3g})"
    assert (actual - sd1.plain).abs().max() > 100 * sd1.tolerance
    check_ejected(sd1, before, keys)
    print(f"max abs difference {difference:.3g}, {difference / sd1.expected.abs().max().item():.3g} of the scale")


def test_sd1_faceid_with_the_kohya_lora_file_matches_diffusers(sd1: Case) -> None:
    """The LoRA from h94's separate kohya file (`SD1LoraAdapter`), the embedding given as diffusers' image embeds;
    without any LoRA, the result is not diffusers' (the LoRA matters)."""
    model = sd1.model
    before, keys = repr(model.unet), list(model.unet.state_dict())
    lora = SD1LoraAdapter.from_safetensors(target=model, checkpoint_path=sd1.kohya_lora)
    adapter = SD1IPAdapter(target=model.unet, weights=sd1.bin, scale=SCALE).inject()
    adapter.set_face_embedding(diffusers_embeds(face()))
    without_lora = our_latents(model, SIZE)
    lora.inject()
    actual = our_latents(model, SIZE)
    lora.eject()
    adapter.eject()
    difference = sd1.difference(actual)
    assert difference <= sd1.tolerance, f"max abs difference {difference:.3g} (tolerance {sd1.tolerance:.3g})"
    assert sd1.difference(without_lora) > 10 * sd1.tolerance
    check_ejected(sd1, before, keys)
    print(f"max abs difference {difference:.3g}, {difference / sd1.expected.abs().max().item():.3g} of the scale")


def test_faceid_bad_input(sd1: Case, tmp_path: Path) -> None:
    unet = sd1.model.unet
    tensors = faceid_weights(_diffusers_unet(sd1))
    with pytest.raises(ValueError, match="IP-Adapter FaceID: pass fine_grained=False"):
        SD1IPAdapter(target=unet, weights=tensors, fine_grained=True)
    encoder = CLIPImageEncoder(
        embedding_dim=32, output_dim=16, patch_size=14, num_layers=2, num_attention_heads=2, feedforward_dim=64
    )
    with pytest.raises(ValueError, match="takes a face embedding, not a CLIP image embedding"):
        SD1IPAdapter(target=unet, weights=tensors, clip_image_encoder=encoder)
    adapter = SD1IPAdapter(target=unet, weights=tensors)
    with pytest.raises(ValueError, match="expected face embeddings of shape \\(512,\\)"):
        adapter.set_face_embedding(torch.randn(2, 1, 128))
    with pytest.raises(
        ValueError, match="has no CLIP image encoder: give it a face embedding with `set_face_embedding`"
    ):
        adapter.compute_clip_image_embedding(torch.zeros(1, 3, 224, 224))
    with pytest.raises(
        ValueError, match=r"1 tensors of the IP-Adapter file are not used: ip_adapter\.1\.to_k_lora\.extra"
    ):
        SD1IPAdapter(target=unet, weights=tensors | {"ip_adapter.1.to_k_lora.extra": torch.ones(1)})
    plus = {"image_proj.perceiver_resampler.proj_in.weight": torch.ones(1)} | tensors
    with pytest.raises(ValueError, match=r"FaceID-Plus file .* is not supported"):
        SD1IPAdapter(target=unet, weights=plus)


def _diffusers_unet(case: Case) -> Any:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(case.bin.parent / "toy-sd1" / "unet")


def test_sdxl_faceid_with_its_lora_matches_diffusers(tmp_path: Path) -> None:
    twins = build_twins()
    pipeline: Any = twins.pipeline
    pipeline.scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    pipeline.set_progress_bar_config(disable=True)
    model = StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=STEPS, params=SDXL_SOLVER_PARAMS),
        default_size=64,
    )
    path = save_bin(faceid_weights(pipeline.unet, seed=1), tmp_path / "ip-adapter-faceid_sdxl.bin")
    plain = our_latents(model, 64)
    load_reference(pipeline, path, SCALE)
    expected = reference_latents(pipeline, 64, ip_adapter_image_embeds=[diffusers_embeds(face())])
    before = repr(model.unet)
    adapter: IPAdapter = SDXLIPAdapter(target=model.unet, weights=path, scale=SCALE)
    manager = SDLoraManager(model)
    manager.add_loras("faceid", adapter.lora)
    adapter.inject()
    adapter.set_face_embedding(face())
    actual = our_latents(model, 64)
    adapter.eject()
    manager.remove_loras("faceid")
    tolerance = 1e-4 * expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance, f"max abs difference {difference:.3g} (tolerance {tolerance:.3g})"
    assert (actual - plain).abs().max() > 100 * tolerance
    assert repr(model.unet) == before and torch.equal(our_latents(model, 64), plain)
    print(f"max abs difference {difference:.3g}, {difference / expected.abs().max().item():.3g} of the scale")
