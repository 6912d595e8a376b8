"""LoRA fine-tuning of SDXL on Lightning, on the toy SDXL of `toy_sdxl` (diffusers' `StableDiffusionXLPipeline` at
the family's `TINY` sizes, converted with `refiners-convert sdxl`): the loss falls, only LoRAs train, exact resume,
the time ids as diffusers' `train_text_to_image_lora_sdxl.py` makes them, and the exported PEFT and kohya LoRAs
loaded by diffusers' `load_lora_weights` give our UNet outputs and text embeddings.

Images are 64x64 (8x8 latents): the toy UNet's attention levels then see 4x4 and 2x2 maps (at 1x1, a single token,
queries and keys get no gradient).
"""

import copy
import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import Tensor
from torch.optim import Optimizer
from torchvision import transforms  # pyright: ignore[reportMissingTypeStubs]
from torchvision.transforms.functional import crop  # pyright: ignore[reportMissingTypeStubs]
from toy_sdxl import SCHEDULER_CONFIG, build_pipeline

from refiners.converters.cli import main as refiners_convert
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import DoubleTextEncoder, SDXLUNet
from refiners.training import (
    CaptionedImageDataModule,
    CaptionedImageDataset,
    ExportLora,
    GradientCheckpointing,
    LoraFineTuning,
    SampleImages,
    TrainingSetupError,
    families,
    sdxl_time_ids,
)
from refiners.training.callbacks import METADATA_KEY
from refiners.training.cli import LoraTrainingCLI
from refiners.training.data import ItemKey, TrainingBatch, collate_training_items
from refiners.training.sample_data import SampleImageFolder, make_image_folder

ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = 64
STEPS = 24  # 6 epochs of 16 images in batches of 4
RESUME_FROM = 18  # mid-epoch (the 2nd batch of the 5th epoch)
PROMPT = "a red circle on a white background"
SETTINGS: dict[str, Any] = {
    "base": "tiny-sdxl",
    # Convolutions too: the toy UNet's first resolution has no transformer, and LoCon's exports are read by diffusers.
    "targets": "all",
    "rank": 4,
    "alpha": 2.0,
    "train_text_encoder": True,
    "learning_rate": 1e-2,
    "text_encoder_learning_rate": 5e-3,
    "min_snr_gamma": 5.0,
}


# -- the toy SDXL, as a user has it -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionXLPipeline:
    """diffusers' toy SDXL pipeline (random weights), the base of every fine-tuning here."""
    return build_pipeline()


@pytest.fixture(scope="module")
def weights(reference: StableDiffusionXLPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy saved by diffusers, then converted by `refiners-convert sdxl`, as the user's weights folder."""
    root = tmp_path_factory.mktemp("sdxl")
    reference.save_pretrained(root / "diffusers")
    assert refiners_convert(["sdxl", "--from", str(root / "diffusers"), "--to", str(root / "refiners")]) == 0
    return root / "refiners"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> SampleImageFolder:
    """16 images of 80x80, 80x60 and 60x80 pixels: three original sizes, and crops along both axes."""
    return make_image_folder(tmp_path_factory.mktemp("images"), n=16, size=80)


def _data(folder: SampleImageFolder, **kwargs: Any) -> CaptionedImageDataModule:
    options: dict[str, Any] = {"resolution": RESOLUTION, "batch_size": 4, "center_crop": False, "random_flip": True}
    return CaptionedImageDataModule(folder.path, **(options | kwargs))


def _cached_data(folder: SampleImageFolder) -> CaptionedImageDataModule:
    """Center crops, latents encoded once: their sizes and crops are read from the files' headers."""
    return _data(folder, center_crop=True, random_flip=False, cache_latents=True)


def _trainer(root: Path, max_steps: int, callbacks: list[Callback]) -> Trainer:
    return Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=any(isinstance(callback, ModelCheckpoint) for callback in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _field(batch: TrainingBatch, key: str) -> Tensor:
    value = batch.get(key)
    assert isinstance(value, Tensor), f"the batch has no {key}: {sorted(batch)}"
    return value


def _lora_state(module: LoraFineTuning) -> dict[str, Tensor]:
    return {key: tensor.detach().clone() for key, tensor in module.state_dict().items()}


def _base_weights(module: LoraFineTuning) -> dict[str, Tensor]:
    """Every weight of the frozen models, LoRAs left out (found by identity)."""
    lora_weights = {id(parameter) for parameter in module.parameters()}
    return {
        f"{component}.{key}": tensor.detach().clone()
        for component, model in module.components.items()
        for key, tensor in model.state_dict(keep_vars=True).items()
        if id(tensor) not in lora_weights
    }


class GradientRecorder(Callback):
    """The weights that have a gradient, and a nonzero one, when the optimizer steps: frozen ones included."""

    def __init__(self) -> None:
        self.with_gradient: set[int] = set()
        self.with_nonzero_gradient: set[int] = set()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        assert isinstance(pl_module, LoraFineTuning)
        for _, model in pl_module.components.items():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    self.with_gradient.add(id(parameter))
                    if parameter.grad.abs().sum() > 0:
                        self.with_nonzero_gradient.add(id(parameter))


def _evaluation_loss(module: LoraFineTuning, folder: SampleImageFolder) -> float:
    """The loss on 8 center-cropped images at fixed noise and timesteps (the same draws before and after training)."""
    dataset = CaptionedImageDataset(folder.path, resolution=RESOLUTION)
    items = [dataset[index] for index in range(8)]
    batch = TrainingBatch(
        images=torch.stack([item["image"] for item in items]),
        captions=[item["caption"] for item in items],
        original_sizes=torch.tensor([item["original_size"] for item in items]),
        crop_top_lefts=torch.tensor([item["crop_top_left"] for item in items]),
    )
    latents = module.encode_images(_field(batch, "images"))
    generator = torch.Generator().manual_seed(123)
    draws = [module.draw(latents, generator) for _ in range(4)]
    with torch.no_grad():
        conditioning = module.conditioning(batch, latents)
        embedding = conditioning.pop("clip_text_embedding")
        losses = [module.loss(latents, embedding, noise, steps, **conditioning).item() for noise, steps in draws]
    return sum(losses) / len(losses)


@dataclass
class Run:
    module: LoraFineTuning
    root: Path
    initial_loras: dict[str, Tensor]
    base_before: dict[str, Tensor]
    loss_before: float
    loss_after: float
    gradients: GradientRecorder
    export: ExportLora
    samples: SampleImages


@pytest.fixture(scope="module")
def run(weights: Path, images: SampleImageFolder, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("run")
    module = LoraFineTuning(**SETTINGS, weights=str(weights))
    initial_loras, base_before = _lora_state(module), _base_weights(module)
    loss_before = _evaluation_loss(module, images)
    gradients = GradientRecorder()
    export = ExportLora(dirpath=str(root / "loras"), at_checkpoints=False)
    samples = SampleImages([PROMPT], seeds=[0], every_n_steps=0, num_inference_steps=2, dirpath=str(root / "samples"))
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=6, save_top_k=-1)
    _trainer(root, STEPS, [gradients, export, samples, checkpoints]).fit(module, _cached_data(images))
    return Run(
        module=module,
        root=root,
        initial_loras=initial_loras,
        base_before=base_before,
        loss_before=loss_before,
        loss_after=_evaluation_loss(module, images),
        gradients=gradients,
        export=export,
        samples=samples,
    )


# -- what trains ---------------------------------------------------------------------------------------------------


def test_loss_decreases(run: Run) -> None:
    print(f"SDXL evaluation loss: {run.loss_before:.4f} -> {run.loss_after:.4f}")
    assert run.loss_after < 0.85 * run.loss_before, (run.loss_before, run.loss_after)


def test_only_lora_parameters_receive_gradients(run: Run) -> None:
    module = run.module
    lora_weights = {id(parameter) for lora in module.named_loras().values() for parameter in lora.parameters()}
    assert {id(parameter) for parameter in module.parameters()} == lora_weights
    # LoRAs on the UNet and on both text encoders, named as diffusers names their targets.
    components = {name.partition(".")[0] for name in module.diffusers_loras()}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    assert [name for name, _ in module.components.items()] == ["unet", "vae", "text_encoder", "text_encoder_2"]
    assert run.gradients.with_gradient == lora_weights
    assert run.gradients.with_nonzero_gradient == lora_weights
    for _, model in module.components.items():
        for parameter in model.parameters():
            assert parameter.requires_grad == (id(parameter) in lora_weights)
    # Both text encoders' LoRAs learn at the text encoders' rate.
    groups = {group["name"]: group for group in module.parameter_groups()}
    text_encoders = {
        id(p) for n, lora in module.named_loras().items() if n.startswith("text_") for p in lora.parameters()
    }
    assert {id(p) for p in groups["text_encoder"]["params"]} == text_encoders
    assert groups["text_encoder"]["lr"] == 5e-3 and groups["unet"]["lr"] == 1e-2


def test_base_weights_are_bit_identical_after_training(run: Run) -> None:
    after = _base_weights(run.module)
    assert after.keys() == run.base_before.keys()
    for key, tensor in run.base_before.items():
        assert torch.equal(after[key], tensor), key
    changed = [
        key for key, tensor in _lora_state(run.module).items() if not torch.equal(tensor, run.initial_loras[key])
    ]
    assert len(changed) == len(run.initial_loras)


def test_the_schedule_is_sdxl_s() -> None:
    """DDPM over stabilityai/stable-diffusion-xl-base-1.0's scheduler config (SD1's betas, 1000 steps)."""
    module = LoraFineTuning(base="tiny-sdxl")
    expected = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod  # pyright: ignore[reportAttributeAccessIssue]
    torch.testing.assert_close(module.solver.cumulative_scale_factors**2, expected, atol=1e-6, rtol=0)


def test_sampling_uses_sdxl(run: Run) -> None:
    (grid,) = run.samples.saved
    assert Image.open(grid).size == (RESOLUTION, RESOLUTION)
    assert type(run.module.sampling_pipeline(2)).__name__ == "StableDiffusion_XL"


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    """The checkpointed blocks recompute with the text-time embedding they first saw."""
    plain = LoraFineTuning(base="tiny-sdxl", targets="all", rank=2)
    checkpointed = LoraFineTuning(base="tiny-sdxl", targets="all", rank=2, gradient_checkpointing=True)
    assert len(list(checkpointed.unet.layers(GradientCheckpointing))) > 0
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    conditioning = {
        "pooled_text_embedding": torch.randn(2, 48, generator=generator),
        "time_ids": torch.tensor([[80.0, 60.0, 0.0, 4.0, 64.0, 64.0], [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
    text_embeddings = torch.randn(2, 77, 80, generator=generator)
    noise, steps = plain.draw(latents, generator)
    for module in (plain, checkpointed):
        with torch.no_grad():  # a non-zero `up`, so that every LoRA weight gets a gradient
            for parameter in module.parameters():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
        module.loss(latents, text_embeddings, noise, steps, **conditioning).backward()
    for (name, expected), actual in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert expected.grad is not None and actual.grad is not None
        torch.testing.assert_close(
            actual.grad, expected.grad, atol=1e-6 * expected.grad.abs().max().item(), rtol=0, msg=name
        )


EXAMPLES = [
    (name, block)
    for name in families.__all__
    for block in re.findall(r"```py\n(.*?)\s*```", inspect.getdoc(getattr(families, name)) or "", flags=re.DOTALL)
]


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_docstring_example(name: str, code: str) -> None:
    exec(compile(textwrap.dedent(code), f"<example of {name}>", "exec"), {"__name__": "example"})


def test_there_are_examples() -> None:
    assert {name for name, _ in EXAMPLES} >= {"sdxl_time_ids", "StableDiffusionXLTraining"}


# -- exact resume --------------------------------------------------------------------------------------------------


def test_resumed_training_ends_with_the_same_lora(
    run: Run, weights: Path, images: SampleImageFolder, tmp_path: Path
) -> None:
    checkpoint = run.root / "checkpoints" / f"epoch=4-step={RESUME_FROM}.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 4, "batches": 2}]
    resumed = LoraFineTuning(**SETTINGS, weights=str(weights))
    _trainer(tmp_path, STEPS, []).fit(resumed, _cached_data(images), ckpt_path=checkpoint)
    assert resumed.global_step == STEPS
    expected, actual = _lora_state(run.module), _lora_state(resumed)
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, atol=0, rtol=0, msg=key)


# -- the time ids, as diffusers' script makes them -----------------------------------------------------------------


def _script_preprocess(image: Any, resolution: int, top_left: tuple[int, int] | None, flip: bool) -> Any:
    """diffusers' `train_text_to_image_lora_sdxl.py`'s `preprocess_train` and `compute_time_ids` for one image:
    resize, flip (here: when told), center crop (`top_left=None`) or the crop at `top_left` of the flipped image,
    recording the original size and the crop's corner. Returns (time ids, image in [-1, 1])."""
    original_size = (image.height, image.width)
    image = transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR)(image)
    if flip:
        image = transforms.RandomHorizontalFlip(p=1.0)(image)
    if top_left is None:
        y1 = max(0, int(round((image.height - resolution) / 2.0)))  # noqa: RUF046 (the script's words)
        x1 = max(0, int(round((image.width - resolution) / 2.0)))  # noqa: RUF046
        image = transforms.CenterCrop(resolution)(image)
    else:
        y1, x1 = top_left
        image = crop(image, y1, x1, resolution, resolution)
    crops_coords_top_left = (y1, x1)
    target_size = (resolution, resolution)
    time_ids = torch.tensor([list(original_size + crops_coords_top_left + target_size)])
    pixels = transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(image))
    return time_ids, pixels


def _ours(dataset: CaptionedImageDataset, index: int, epoch: int) -> tuple[Tensor, Tensor, bool]:
    """Our time ids of an item (as a batch of one), its image, and whether it is flipped."""
    item = dataset[ItemKey(index, epoch)]
    batch = collate_training_items(
        [{"original_size": torch.tensor(item["original_size"]), "crop_top_left": torch.tensor(item["crop_top_left"])}]
    )
    resolution = dataset.transform.resolution
    time_ids = sdxl_time_ids(_field(batch, "original_sizes"), _field(batch, "crop_top_lefts"), (resolution, resolution))
    return time_ids, item["image"], dataset.crop(index, epoch).flipped


@pytest.fixture(scope="module")
def odd_sizes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Noise images of 96x48, 48x80 and 50x50 pixels (resized to 32: 64x32, 32x53, 32x32), captioned."""
    folder = tmp_path_factory.mktemp("sizes")
    generator = torch.Generator().manual_seed(0)
    lines: list[str] = []
    for index, (width, height) in enumerate([(96, 48), (48, 80), (50, 50)]):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "text": f"image {index}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_time_ids_of_center_crops_equal_the_script_s(odd_sizes: Path) -> None:
    dataset = CaptionedImageDataset(odd_sizes, resolution=32, center_crop=True, random_flip=True, seed=1)
    seen: set[tuple[int, bool]] = set()
    for epoch in range(8):
        for index in range(len(dataset)):
            time_ids, image, flipped = _ours(dataset, index, epoch)
            path = dataset.files[index].path
            expected_ids, expected_image = _script_preprocess(Image.open(path).convert("RGB"), 32, None, flipped)
            torch.testing.assert_close(time_ids, expected_ids.float(), atol=0, rtol=0)
            torch.testing.assert_close(image, expected_image, atol=1e-6, rtol=0)
            seen.add((index, flipped))
    assert len(seen) == 2 * len(dataset)  # every image, flipped and not
    # Two sizes, two crops: [h, w, top, left, 32, 32].
    assert _ours(dataset, 0, 0)[0][0, :2].tolist() == [48.0, 96.0]
    assert {tuple(_ours(dataset, index, 0)[0][0, 2:4].tolist()) for index in (0, 1)} == {(0.0, 16.0), (10.0, 0.0)}


def test_time_ids_of_random_crops_say_where_the_pixels_come_from(odd_sizes: Path) -> None:
    """With random crops and flips, the script records the corner of its crop in the flipped image: the image it
    would make from our time ids is ours, pixel for pixel."""
    dataset = CaptionedImageDataset(odd_sizes, resolution=32, center_crop=False, random_flip=True, seed=2)
    corners: set[tuple[int, float, float]] = set()
    for epoch in range(8):
        for index in range(2):
            time_ids, image, flipped = _ours(dataset, index, epoch)
            top, left = (int(value) for value in time_ids[0, 2:4].tolist())
            path = dataset.files[index].path
            expected_ids, expected_image = _script_preprocess(Image.open(path).convert("RGB"), 32, (top, left), flipped)
            torch.testing.assert_close(time_ids, expected_ids.float(), atol=0, rtol=0)
            torch.testing.assert_close(image, expected_image, atol=1e-6, rtol=0)
            corners.add((index, top, left))
    assert len(corners) > 4  # the crops move


def test_batches_carry_the_sizes_and_crops(images: SampleImageFolder, run: Run) -> None:
    data = _data(images)
    data.setup("fit")
    batch: TrainingBatch = next(iter(data.train_dataloader()))
    original_sizes, crop_top_lefts = _field(batch, "original_sizes"), _field(batch, "crop_top_lefts")
    assert original_sizes.shape == (4, 2) and crop_top_lefts.shape == (4, 2)
    latents = run.module.encode_images(_field(batch, "images"))
    with torch.no_grad():
        conditioning = run.module.conditioning(batch, latents)
    assert set(conditioning) == {"clip_text_embedding", "pooled_text_embedding", "time_ids"}
    expected = torch.cat([original_sizes, crop_top_lefts, torch.full((4, 2), RESOLUTION)], dim=1)
    torch.testing.assert_close(conditioning["time_ids"], expected.float(), atol=0, rtol=0)


# -- the exported LoRA in diffusers --------------------------------------------------------------------------------


def _outputs(pipeline: StableDiffusionXLPipeline | LoraFineTuning) -> tuple[Tensor, Tensor, Tensor]:
    """Text embedding, pooled embedding and UNet prediction on fixed inputs (time ids of a cropped 80x60 image)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    time_ids = torch.tensor([[60.0, 80.0, 0.0, 11.0, 64.0, 64.0]] * 2)
    timesteps = torch.tensor([50, 700])
    with torch.no_grad():
        if isinstance(pipeline, StableDiffusionXLPipeline):
            embedding, _, pooled, _ = pipeline.encode_prompt(
                [PROMPT, "a blue square"],  # pyright: ignore[reportArgumentType] (a list of prompts is accepted)
                device=torch.device("cpu"),
                do_classifier_free_guidance=False,
            )
            assert pooled is not None
            conditions = {"text_embeds": pooled, "time_ids": time_ids}
            prediction = pipeline.unet(x, timesteps, encoder_hidden_states=embedding, added_cond_kwargs=conditions)
            return embedding, pooled, prediction.sample
        assert isinstance(pipeline.clip_text_encoder, DoubleTextEncoder) and isinstance(pipeline.unet, SDXLUNet)
        embedding, pooled = pipeline.clip_text_encoder([PROMPT, "a blue square"])
        pipeline.pipeline.set_unet_context(
            timestep=timesteps, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids
        )
        return embedding, pooled, pipeline.unet(x)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_exported_lora_loads_in_diffusers_with_equal_outputs(
    run: Run, reference: StableDiffusionXLPipeline, layout: str
) -> None:
    path = run.export.paths(run.root / "loras")[layout]  # pyright: ignore[reportArgumentType]
    settings = json.loads(load_metadata_from_safetensors(path)[METADATA_KEY])
    assert settings["base"] == "tiny-sdxl" and settings["global_step"] == STEPS
    prefixes = {
        "kohya": ("lora_unet_", "lora_te1_", "lora_te2_"),
        "peft": ("unet.", "text_encoder.", "text_encoder_2."),
    }
    keys = load_from_safetensors(path).keys()
    assert {next(p for p in reversed(prefixes[layout]) if key.startswith(p)) for key in keys} == set(prefixes[layout])
    if layout == "kohya":
        assert load_metadata_from_safetensors(path)["ss_base_model_version"] == "sdxl_base_v1-0"
    base = _outputs(reference)
    loaded = copy.deepcopy(reference)
    loaded.load_lora_weights(str(path))
    expected, actual = _outputs(loaded), _outputs(run.module)
    for name, ours, theirs, before in zip(["embedding", "pooled", "unet"], actual, expected, base, strict=True):
        scale = theirs.abs().max().item()
        difference = (ours - theirs).abs().max().item()
        print(f"{layout} {name}: max |ours - diffusers| = {difference:.2e} (scale {scale:.2f})")
        torch.testing.assert_close(ours, theirs, atol=1e-4 * scale, rtol=0, msg=name)
        # The LoRA moved the output well beyond the tolerance: the comparison sees it.
        assert (theirs - before).abs().max() > 1e-2 * scale, name


# -- errors --------------------------------------------------------------------------------------------------------


def test_cached_text_embeddings_and_pooled_embeddings_are_the_computed_ones(images: SampleImageFolder) -> None:
    """Caching encodes each caption once (and "" for dropped captions): both embeddings, as the encoders make them."""
    module = LoraFineTuning(base="tiny-sdxl")
    options: dict[str, Any] = {"center_crop": True, "random_flip": False, "caption_dropout": 0.5, "batch_size": 8}
    plain, cached = _data(images, **options), _data(images, cache_text_embeddings=True, **options)
    cached.precompute(encode_texts=module.encode_texts)
    dropped = 0
    for computed, read in zip(plain.train_dataloader(), cached.train_dataloader(), strict=True):
        assert "captions" not in read
        dropped += computed.get("captions", []).count("")
        latents = module.encode_images(_field(computed, "images"))
        with torch.no_grad():
            expected, actual = module.conditioning(computed, latents), module.conditioning(read, latents)
        assert expected.keys() == actual.keys() == {"clip_text_embedding", "pooled_text_embedding", "time_ids"}
        for name, tensor in expected.items():
            torch.testing.assert_close(actual[name], tensor, atol=1e-6 * tensor.abs().max().item(), rtol=0, msg=name)
    assert dropped > 0  # the embeddings of "" are served too


def test_text_embeddings_cached_for_another_model_are_refused_naming_the_flag(images: SampleImageFolder) -> None:
    sdxl, sd1 = LoraFineTuning(base="tiny-sdxl"), LoraFineTuning(base="tiny")
    data = _data(images, center_crop=True, random_flip=False, cache_text_embeddings=True)
    data.precompute(encode_texts=sd1.encode_texts)  # as a cache_dir shared with an SD1 run would give them
    batch: TrainingBatch = next(iter(data.train_dataloader()))
    with pytest.raises(TrainingSetupError, match="pooled_text_embeddings") as refused:
        sdxl.conditioning(batch, torch.zeros(4, 4, 8, 8))
    assert "\n" not in str(refused.value) and "cache_dir" in str(refused.value)


def test_sdxl_without_weights_names_the_flag_and_the_command() -> None:
    with pytest.raises(TrainingSetupError) as refused:
        LoraFineTuning(base="sdxl")
    message = str(refused.value)
    assert "\n" not in message and "weights" in message and "refiners-convert sdxl" in message
    assert "tiny-sdxl" in message


# -- the command line ----------------------------------------------------------------------------------------------


def test_refiners_train_fits_tiny_sdxl(
    images: SampleImageFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["refiners-train"])
    arguments = [
        "fit", "--config", str(ROOT / "configs" / "tiny-lora.yaml"), "--model.base", "tiny-sdxl",
        "--data.data_dir", str(images.path), "--data.resolution", str(RESOLUTION), "--trainer.max_steps", "4",
        "--trainer.default_root_dir", "run",
    ]  # fmt: skip
    cli = LoraTrainingCLI(args=arguments)
    assert isinstance(cli.model, LoraFineTuning) and cli.model.global_step == 4
    folder = tmp_path / "run" / "tensorboard" / "version_0"
    kohya = load_metadata_from_safetensors(folder / "loras" / "lora-kohya.safetensors")
    assert kohya["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(kohya[METADATA_KEY])["base"] == "tiny-sdxl"
    assert (folder / "loras" / "lora-peft.safetensors").is_file() and list((folder / "samples").glob("*.png"))
