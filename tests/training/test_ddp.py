"""The shipped tiny config, unchanged, under two-process DDP and FSDP on CPU (gloo).

DDP: it runs to completion, the two ranks train on different images (in a new order each epoch) and end with the same
LoRA, and that LoRA is the one exported. FSDP (Lightning's `FSDPStrategy`, sharding the LoRAs and their optimizer
state): the same run ends with the same LoRA as DDP's. Lightning accepts FSDP only with a GPU; a CPU run needs the
small `CPUFSDPStrategy` subclass below, which only gives FSDP the CPU as its device."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.strategies import FSDPStrategy

from refiners.fluxion.utils import load_from_safetensors
from refiners.training import LoraFineTuning
from refiners.training.sample_data import SampleImageFolder

ROOT = Path(__file__).resolve().parents[2]

# A callback the ranks load from PYTHONPATH: each saves its own LoRA weights, and the images (by their cached latents'
# first values: the tiny config neither crops at random nor flips) and captions it trained on.
PROBE = """
import json
from pathlib import Path

import torch.distributed
from lightning import Callback

from refiners.fluxion.utils import save_to_safetensors


class RankProbe(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.captions: list[str] = []
        self.images: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.captions += batch["captions"]
        self.images += [" ".join(f"{value:.4f}" for value in row[:6].tolist()) for row in batch["latents"].flatten(1)]

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        # The full weights (gathered under FSDP, on rank zero only).
        full = trainer.strategy.lightning_module_state_dict()
        state = {key: tensor.detach().contiguous() for key, tensor in full.items()}
        if state:
            save_to_safetensors(self.folder / f"rank{rank}.safetensors", state)
        info = {"world_size": trainer.world_size, "global_step": trainer.global_step, "captions": self.captions}
        info["images"] = self.images
        info["strategy"] = type(trainer.strategy).__name__
        (self.folder / f"rank{rank}.json").write_text(json.dumps(info))


class StopAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        # Lightning passes FSDP the device's index, which a CPU device lacks: wrap here, Lightning does the rest.
        wrapped = FullyShardedDataParallel(
            module=model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs
        )
        return super()._setup_model(wrapped)
"""
PROBE_IMPORTS = """
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
"""
EXPORTED = Path("outputs") / "tiny-lora" / "tensorboard" / "version_0" / "loras" / "lora.safetensors"


def train(folder: Path, images: Path, *strategy: str) -> None:
    """`refiners-train fit` with the tiny config on 2 CPU processes, in `folder`, with the probe."""
    (folder / "probe").mkdir(parents=True, exist_ok=True)
    (folder / "probe" / "rank_probe.py").write_text(textwrap.dedent(PROBE_IMPORTS + PROBE))
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(folder / "probe")}
    command = [
        str(Path(sys.executable).parent / "refiners-train"), "fit",
        "--config", str(ROOT / "configs" / "tiny-lora.yaml"), "--data.data_dir", str(images),
        *strategy, "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.callbacks+=rank_probe.RankProbe", "--trainer.callbacks.folder", str(folder),
    ]  # fmt: skip
    # Its own process group, so that a hung rank (a deadlock) is killed with the launcher on timeout.
    process = subprocess.Popen(
        command, cwd=folder, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"distributed training did not finish in 300 s:\n{output}") from None
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{output}"


@pytest.fixture(scope="module")
def ddp_run(metadata_folder: SampleImageFolder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    train(folder, metadata_folder.path, "--trainer.strategy", "ddp")
    return folder


def test_two_process_ddp_ends_with_the_same_lora_on_both_ranks(ddp_run: Path) -> None:
    tmp_path = ddp_run
    infos = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(info["world_size"] == 2 and info["global_step"] == 12 for info in infos)
    # Each rank sees half of every epoch: 24 images, 2 ranks, batches of 4, 12 steps = 4 epochs of 3 batches.
    assert all(len(info["captions"]) == 12 * 4 for info in infos)
    assert infos[0]["captions"] != infos[1]["captions"]
    # Every epoch, the two ranks share out the whole dataset, in a new order (Lightning forwards the epoch to our
    # sampler through its distributed wrapper).
    epochs = [[info["images"][start : start + 12] for info in infos] for start in range(0, 48, 12)]
    assert all(len(set(rank0 + rank1)) == 24 for rank0, rank1 in epochs)
    assert all(epoch[0] != epochs[0][0] for epoch in epochs[1:])

    ranks = [load_from_safetensors(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for key, tensor in ranks[0].items():
        torch.testing.assert_close(ranks[1][key], tensor, atol=0, rtol=0, msg=key)

    # The LoRA trained, and rank 0 exported what both ranks hold.
    initial = LoraFineTuning(base="tiny", targets="transformer", rank=4, train_text_encoder=True)
    assert all(
        not torch.equal(ranks[0][key], tensor)
        for key, tensor in initial.state_dict().items()
        if key.endswith("_2.weight")
    )
    exported = load_from_safetensors(tmp_path / EXPORTED)
    for name, lora in initial.named_loras().items():
        prefix = f"loras.{name.replace('.', '/')}"
        for role, layer in (("lora_down", lora.down), ("lora_up", lora.up)):
            expected = ranks[0][f"{prefix}.{lora.key_of(layer)}.weight"]
            torch.testing.assert_close(
                exported[f"{initial.diffusers_names[name]}.{role}.weight"], expected, atol=0, rtol=0
            )


def test_fsdp_trains_the_same_lora_as_ddp(ddp_run: Path, metadata_folder: SampleImageFolder, tmp_path: Path) -> None:
    strategy = ["--trainer.strategy", "rank_probe.CPUFSDPStrategy", "--trainer.strategy.process_group_backend", "gloo"]
    train(tmp_path, metadata_folder.path, *strategy)
    infos = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(info["strategy"] == "CPUFSDPStrategy" and info["global_step"] == 12 for info in infos)
    ddp_infos = [json.loads((ddp_run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [info["images"] for info in infos] == [info["images"] for info in ddp_infos]
    assert [info["captions"] for info in infos] == [info["captions"] for info in ddp_infos]

    # The gathered weights and the exported LoRA equal DDP's (the gradients are averaged in another order).
    fsdp, ddp = (
        load_from_safetensors(tmp_path / "rank0.safetensors"),
        load_from_safetensors(ddp_run / "rank0.safetensors"),
    )
    assert fsdp.keys() == ddp.keys()
    for key, tensor in ddp.items():
        torch.testing.assert_close(fsdp[key], tensor, atol=1e-6, rtol=1e-5, msg=key)
    fsdp_exported, ddp_exported = load_from_safetensors(tmp_path / EXPORTED), load_from_safetensors(ddp_run / EXPORTED)
    assert fsdp_exported.keys() == ddp_exported.keys()
    for key, tensor in ddp_exported.items():
        torch.testing.assert_close(fsdp_exported[key], tensor, atol=1e-6, rtol=1e-5, msg=key)
    # The checkpoint holds the full LoRA weights, as under DDP.
    checkpoint = torch.load(tmp_path / EXPORTED.parents[1] / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"].keys() == ddp.keys()


def test_ddp_resumed_mid_epoch_ends_with_the_same_lora(
    ddp_run: Path, metadata_folder: SampleImageFolder, tmp_path: Path
) -> None:
    # Interrupted at step 4 (3 steps per epoch: one batch into the second), resumed from that step's checkpoint.
    checkpoints = tmp_path / "checkpoints"
    checkpointing = [
        "--trainer.strategy", "ddp", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(checkpoints), "--trainer.callbacks.every_n_train_steps", "4",
        "--trainer.callbacks.save_top_k", "-1",
    ]  # fmt: skip
    stop = ["--trainer.callbacks+=rank_probe.StopAtStep", "--trainer.callbacks.step", "4"]
    train(tmp_path / "first", metadata_folder.path, *checkpointing, *stop)
    (checkpoint,) = checkpoints.glob("*step=4.ckpt")
    train(tmp_path / "second", metadata_folder.path, *checkpointing, "--ckpt_path", str(checkpoint))

    ddp_infos = [json.loads((ddp_run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, expected in enumerate(ddp_infos):
        first, second = (json.loads((tmp_path / run / f"rank{rank}.json").read_text()) for run in ("first", "second"))
        assert first["global_step"] == 4 and second["global_step"] == 12
        assert first["images"] + second["images"] == expected["images"]  # each rank's batches, none replayed
    resumed, expected_state = (
        load_from_safetensors(tmp_path / "second" / "rank0.safetensors"),
        load_from_safetensors(ddp_run / "rank0.safetensors"),
    )
    assert resumed.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        torch.testing.assert_close(resumed[key], tensor, atol=0, rtol=0, msg=key)


class _CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy, accepted with a CPU accelerator (Lightning refuses the class itself without a GPU)."""


def test_ema_under_fsdp_is_a_clear_error(tmp_path: Path) -> None:
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=_CPUFSDPStrategy(), callbacks=[EMAWeightAveraging()], logger=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    module = LoraFineTuning(base="tiny", rank=2)
    module.trainer = trainer
    with pytest.raises(ValueError, match=r"EMA \(Lightning's WeightAveraging callback\) does not work under FSDP"):
        module.on_fit_start()
