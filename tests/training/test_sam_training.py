"""Fine-tuning Segment Anything (`refiners.training.segment_anything`) on a tiny SAM (the family's `TINY` preset,
random weights) and a generated dataset of shapes and their masks: the loss falls, only the adapter trains, the base
stays bit-identical, a resumed run equals the uninterrupted one, the exported adapter reloads onto a fresh SAM and
gives the trained masks, and `refiners-train` runs the shipped config."""

import inspect
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import refiners.fluxion.layers as fl
import refiners.training.segment_anything.data
import refiners.training.segment_anything.module
from refiners.fluxion.adapters.lora import Lora
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.segment_anything import SegmentAnything
from refiners.training.cli import LoraTrainingCLI, main, task_of
from refiners.training.errors import TrainingSetupError
from refiners.training.segment_anything import (
    ExportSAMAdapter,
    MaskBatch,
    MaskDataModule,
    MaskDataset,
    MaskItem,
    SAMFineTuning,
    build_sam,
    dice_loss,
    focal_loss,
    load_sam_adapter,
    make_mask_folder,
    mask_iou,
    sam_lora_target_layers,
)
from refiners.training.segment_anything.export import ADAPTER_KEY

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sam-lora.yaml"
IMAGE_SIZE = 128  # TINY's input side
STEPS = 30


@pytest.fixture(autouse=True)
def command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`refiners-train` is run in the process: LightningCLI warns when it also sees pytest's arguments."""
    monkeypatch.setattr(sys, "argv", ["refiners-train"])


@pytest.fixture(scope="module")
def mask_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images of 48 x 48 pixels (rectangles and ellipses) and their masks; not to be modified."""
    return make_mask_folder(tmp_path_factory.mktemp("masks"), n=8, size=48)


def _data(folder: Path) -> MaskDataModule:
    return MaskDataModule(folder, image_size=IMAGE_SIZE, batch_size=2, box_noise=0.1)


def _trainer(root: Path, max_steps: int, *callbacks: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(callback, ModelCheckpoint) for callback in callbacks),
        callbacks=list(callbacks),
        default_root_dir=root,
    )


def _all_items(folder: Path) -> MaskBatch:
    """Every image of the folder with its exact box, as one batch."""
    dataset = MaskDataset(folder, image_size=IMAGE_SIZE)
    return _batch([dataset[index] for index in range(len(dataset))])


def _batch(items: list[MaskItem]) -> MaskBatch:
    return MaskBatch(
        images=torch.stack([item["image"] for item in items]),
        masks=torch.stack([item["mask"] for item in items]),
        coordinates=torch.stack([item["coordinates"] for item in items]),
        types=torch.stack([item["types"] for item in items]),
    )


def _eval_loss(module: SAMFineTuning, batch: MaskBatch) -> float:
    with torch.no_grad():
        return float(module.losses(batch)["loss"])


def _base_weights(module: SAMFineTuning) -> dict[str, torch.Tensor]:
    """The frozen weights of the model: all but the LoRAs', or all but the mask decoder's."""
    trained = {id(parameter) for parameter in module.trained_parameters()}
    return {
        name: tensor.detach().clone() for name, tensor in module.sam.named_parameters() if id(tensor) not in trained
    }


class StopAtStep(Callback):
    """Ends the fit after `step` optimizer steps, as an interruption would (the checkpoint callbacks still run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@dataclass
class TrainedRun:
    module: SAMFineTuning
    base_before: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float
    gradients: set[str]  # names (in the model) of the parameters that received a gradient
    export: Path


@pytest.fixture(scope="module", params=["lora", "decoder_only"])
def trained(request: pytest.FixtureRequest, mask_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """A tiny SAM fine-tuned for `STEPS` steps: LoRAs on both the image encoder and the mask decoder, or the mask
    decoder in full."""
    if request.param == "lora":
        module = SAMFineTuning(base="tiny", targets="all", rank=4, learning_rate=1e-2)
    else:
        module = SAMFineTuning(base="tiny", decoder_only=True, learning_rate=1e-3)
    batch = _all_items(mask_folder)
    base_before, loss_before = _base_weights(module), _eval_loss(module, batch)
    module.losses(batch)["loss"].backward()
    gradients = {name for name, parameter in module.sam.named_parameters() if parameter.grad is not None}
    module.zero_grad(set_to_none=True)
    export = ExportSAMAdapter(dirpath=str(tmp_path_factory.mktemp("export")))
    _trainer(tmp_path_factory.mktemp("run"), STEPS, export).fit(module, datamodule=_data(mask_folder))
    module.eval()
    loss_after = _eval_loss(module, batch)
    print(f"{request.param}: loss {loss_before:.4f} -> {loss_after:.4f} in {STEPS} steps")
    return TrainedRun(module, base_before, loss_before, loss_after, gradients, export.exported[-1])


def test_loss_falls(trained: TrainedRun) -> None:
    assert trained.loss_after < 0.8 * trained.loss_before, (trained.loss_before, trained.loss_after)


def test_only_the_adapter_trains(trained: TrainedRun) -> None:
    module = trained.module
    trained_ids = {id(parameter) for parameter in module.trained_parameters()}
    # The module's parameters (what checkpoints and the optimizer hold) are the adapter's, found by type.
    assert {id(parameter) for parameter in module.parameters()} == trained_ids
    names = {name for name, parameter in module.sam.named_parameters() if id(parameter) in trained_ids}
    assert trained.gradients == names
    if module.decoder_only:
        assert all(name.startswith("MaskDecoder.") for name in names) and not module.named_loras()
    else:
        lora_ids = {id(p) for m in module.sam.modules() if isinstance(m, Lora) for p in m.parameters()}
        assert trained_ids == lora_ids
        loras = module.named_loras()
        assert any(name.startswith("SAMViT.") for name in loras) and any(
            name.startswith("MaskDecoder.") for name in loras
        )


def test_the_base_stays_bit_identical(trained: TrainedRun) -> None:
    after = _base_weights(trained.module)
    assert after.keys() == trained.base_before.keys()
    assert all(torch.equal(after[name], trained.base_before[name]) for name in after)


def test_the_export_reloads_and_gives_the_trained_masks(trained: TrainedRun, mask_folder: Path) -> None:
    header = json.loads(load_metadata_from_safetensors(trained.export)[ADAPTER_KEY])
    assert header["kind"] == ("mask_decoder" if trained.module.decoder_only else "lora")
    fresh = build_sam("tiny", seed=0)  # the base the fine-tuning started from
    batch = _all_items(mask_folder)
    with torch.no_grad():
        base_masks = _masks(fresh, batch)
        adapters = load_sam_adapter(fresh, trained.export)
        trained_masks, reloaded_masks = _masks(trained.module.sam, batch), _masks(fresh, batch)
    torch.testing.assert_close(reloaded_masks, trained_masks, atol=0, rtol=0)
    assert not torch.equal(reloaded_masks, base_masks)
    if adapters:  # the LoRAs eject, and the model is the base again
        for adapter in adapters:
            adapter.eject()
        with torch.no_grad():
            torch.testing.assert_close(_masks(fresh, batch), base_masks, atol=0, rtol=0)


def _masks(sam: SegmentAnything, batch: MaskBatch) -> torch.Tensor:
    embedding = sam.layer(0, fl.Module)(batch["images"])  # the image encoder, or an adapter on it
    low_res, _ = sam.decode(embedding, batch["coordinates"], batch["types"], multimask_output=False)
    return low_res


def test_the_lora_targets_are_the_attention_projections() -> None:
    sam = build_sam("tiny")
    encoder, decoder = sam_lora_target_layers(sam, "image_encoder"), sam_lora_target_layers(sam, "mask_decoder")
    assert len(encoder) == 2 * sam.num_layers  # query-key-value and output projections
    assert all(".FusedSelfAttention.Linear_" in name for name in encoder)
    # Four projections in each attention: two blocks of three (tokens, tokens to image, image to tokens), and the last.
    assert len(decoder) == 4 * (3 * sam.decoder_depth + 1)
    assert sam_lora_target_layers(sam, "all") == encoder | decoder


def test_resume_from_a_mid_epoch_checkpoint_is_exact(mask_folder: Path, tmp_path: Path) -> None:
    def module() -> SAMFineTuning:
        return SAMFineTuning(
            base="tiny", targets="all", rank=2, learning_rate=1e-2, warmup_steps=2, lr_schedule="cosine"
        )

    # 8 images in batches of 2: 4 steps an epoch; interrupted at step 3 (mid-epoch), the run ends in the next epoch.
    uninterrupted = module()
    _trainer(tmp_path / "full", 6).fit(uninterrupted, datamodule=_data(mask_folder))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path / "first", 6, checkpoints, StopAtStep(3)).fit(module(), datamodule=_data(mask_folder))
    (checkpoint,) = (tmp_path / "checkpoints").glob("*step=3.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    resumed = module()
    _trainer(tmp_path / "resumed", 6).fit(resumed, datamodule=_data(mask_folder), ckpt_path=checkpoint)
    assert resumed.global_step == 6
    expected, actual = uninterrupted.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=0, rtol=0)


def test_multimask_output_trains_the_best_of_three_masks(mask_folder: Path) -> None:
    module = SAMFineTuning(base="tiny", targets="mask_decoder", rank=2, multimask_output=True)
    dataset = MaskDataset(mask_folder, image_size=IMAGE_SIZE, prompt="points", num_points=1)
    items = [dataset[index] for index in range(4)]
    batch = _batch(items)
    with torch.no_grad():
        logits, iou_predictions = module.predict_batch(batch)
    assert logits.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and iou_predictions.shape == (4, 3)
    # Each mask's loss by hand: 20 focal + dice against the same ground truth; the best one per prompt trains.
    target = batch["masks"]
    by_mask = torch.stack(
        [20 * focal_loss(logits[:, [m]], target)[:, 0] + dice_loss(logits[:, [m]], target)[:, 0] for m in range(3)], 1
    )
    ious = torch.stack([mask_iou(logits[:, [m]], target)[:, 0] for m in range(3)], 1)
    expected = by_mask.min(dim=1).values.mean() + ((iou_predictions - ious) ** 2).mean()
    losses = module.losses(batch)
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    assert all(parameter.grad is not None for parameter in module.parameters())


def test_prompts_come_from_the_masks(mask_folder: Path) -> None:
    exact = MaskDataset(mask_folder, image_size=IMAGE_SIZE)
    item = exact[0]
    ys, xs = item["mask"][0].nonzero(as_tuple=True)
    # The box's corners, mapped into the model's frame (48 pixels to 128), are the mask's extent there.
    (x0, y0), (x1, y1) = item["coordinates"].tolist()
    assert abs(x0 - float(xs.min())) <= 3 and abs(y1 - float(ys.max())) <= 3 and x1 > x0 and y1 > y0
    points = MaskDataset(mask_folder, image_size=IMAGE_SIZE, prompt="points", num_points=3, seed=1)
    drawn = points[0]
    assert drawn["types"].tolist() == [1, 1, 1, -1]  # three foreground points and SAM's padding point
    for x, y in drawn["coordinates"][:3].tolist():
        assert item["mask"][0, min(round(y), IMAGE_SIZE - 1), min(round(x), IMAGE_SIZE - 1)] == 1
    assert torch.equal(points[0]["coordinates"], drawn["coordinates"])  # seeded


def test_the_command_trains_from_the_shipped_config(
    mask_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert task_of(["fit", "--config", str(CONFIG)]) == "segment-anything"
    monkeypatch.chdir(tmp_path)
    toy = ["--model.base", "tiny", "--model.weights", "null", "--data.image_size", str(IMAGE_SIZE)]
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]
    steps = ["--trainer.max_steps", "4", "--model.warmup_steps", "1"]
    data = ["--data.data_dir", str(mask_folder), "--data.num_workers", "0"]
    cli = LoraTrainingCLI(args=["fit", "--config", str(CONFIG), *toy, *cpu, *steps, *data])
    assert isinstance(cli.model, SAMFineTuning) and isinstance(cli.datamodule, MaskDataModule)
    assert cli.model.targets == "all" and cli.datamodule.box_noise == 0.1 and cli.trainer.global_step == 4
    adapter = tmp_path / "outputs" / "sam-lora" / "tensorboard" / "version_0" / "adapters" / "sam-adapter.safetensors"
    assert len(load_sam_adapter(build_sam("tiny"), adapter)) == len(cli.model.named_loras())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model.rnak", "4"], "unknown option --model.rnak: did you mean --model.rank?"),
        (["--data.box_nosie", "0.2"], "unknown option --data.box_nosie: did you mean --data.box_noise?"),
        (["--model.targets", "decoder"], "model.targets: decoder is not one of mask_decoder, image_encoder, all"),
    ],
)
def test_usage_errors_name_the_nearest_option(
    arguments: list[str], message: str, mask_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(CONFIG), "--data.data_dir", str(mask_folder), *arguments])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[0]


def test_a_misspelled_task_names_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(CONFIG), "--task", "segment-anythin"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "refiners-train: error: task: segment-anythin is not one of text-to-image, full-fine-tuning, autoencoder, segment-anything: did you mean "
        "segment-anything?"
    )


def test_a_missing_mask_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_mask_folder(tmp_path / "data", n=3, size=32)
    (folder / "masks" / "001.png").unlink()
    with pytest.raises(SystemExit) as exit:
        main([
            "fit", "--config", str(CONFIG), "--model.base", "tiny", "--model.weights", "null",
            "--data.data_dir", str(folder), "--trainer.default_root_dir", str(tmp_path / "outputs"),
        ])  # fmt: skip
    assert exit.value.code == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(folder / "images" / "001.png") in error
    assert error.endswith("or pass --data.skip_invalid true to leave such images out")
    assert not (tmp_path / "outputs").exists()  # nothing left behind
    with pytest.warns(UserWarning, match="001.png: left out"):
        assert len(MaskDataset(folder, image_size=IMAGE_SIZE, skip_invalid=True)) == 2


def test_a_model_and_data_of_different_sizes_is_a_one_line_error(
    mask_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:  # the shipped config prepares 1024-pixel images; the toy takes 128
        main([
            "fit", "--config", str(CONFIG), "--model.base", "tiny", "--model.weights", "null",
            "--data.data_dir", str(mask_folder), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path / "outputs"),
        ])  # fmt: skip
    assert exit.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error == (
        "refiners-train: error: the data module prepares 1024-pixel images but this SAM takes 128: set "
        "--data.image_size 128 in the data module"
    )
    assert not (tmp_path / "outputs").exists()  # no step trained: the run folders are removed


def test_an_unreadable_image_is_left_out_with_skip_invalid(tmp_path: Path) -> None:
    folder = make_mask_folder(tmp_path / "data", n=3, size=32)
    (folder / "images" / "002.png").write_bytes(b"not a png")
    with pytest.raises(TrainingSetupError, match=r"cannot read the image .*002\.png .*skip_invalid=True"):
        MaskDataset(folder)
    with pytest.warns(UserWarning, match="002.png: left out"):
        assert len(MaskDataset(folder, skip_invalid=True)) == 2
    # An image that breaks after the folder was read says which flag leaves it out.
    dataset = MaskDataset(make_mask_folder(tmp_path / "later", n=2, size=32), image_size=64)
    (tmp_path / "later" / "images" / "001.png").write_bytes(b"truncated")
    with pytest.raises(TrainingSetupError, match=r"cannot read the image .*001\.png .*skip_invalid=True"):
        dataset[1]


EXAMPLES = [
    (f"{module.__name__}.{name}", block)
    for module in (refiners.training.segment_anything.data, refiners.training.segment_anything.module)
    for name in module.__all__
    for block in re.findall(r"```py\n(.*?)\s*```", inspect.getdoc(getattr(module, name)) or "", flags=re.DOTALL)
]


def test_there_are_examples() -> None:
    assert {name.rsplit(".", 1)[-1] for name, _ in EXAMPLES} >= {"MaskDataModule", "SAMFineTuning"}


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_docstring_example(name: str, code: str) -> None:
    exec(compile(textwrap.dedent(code), f"<example of {name}>", "exec"), {"__name__": "example"})
