"""The shipped tiny config, unchanged, under two-process DDP on CPU (gloo): it runs to completion, the two ranks train
on different images and end with the same LoRA, and that LoRA is the one exported."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from refiners.fluxion.utils import load_from_safetensors
from refiners.training import LoraFineTuning
from refiners.training.sample_data import SampleImageFolder

ROOT = Path(__file__).resolve().parents[2]

# A callback the ranks load from PYTHONPATH: each saves its own LoRA weights and the captions it trained on.
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

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.captions += batch["captions"]

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        state = {key: tensor.detach().contiguous() for key, tensor in pl_module.state_dict().items()}
        save_to_safetensors(self.folder / f"rank{rank}.safetensors", state)
        info = {"world_size": trainer.world_size, "global_step": trainer.global_step, "captions": self.captions}
        (self.folder / f"rank{rank}.json").write_text(json.dumps(info))
"""


def test_two_process_ddp_ends_with_the_same_lora_on_both_ranks(
    metadata_folder: SampleImageFolder, tmp_path: Path
) -> None:
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "rank_probe.py").write_text(textwrap.dedent(PROBE))
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "probe")}
    command = [
        str(Path(sys.executable).parent / "refiners-train"), "fit",
        "--config", str(ROOT / "configs" / "tiny-lora.yaml"),
        "--data.data_dir", str(metadata_folder.path),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.callbacks+=rank_probe.RankProbe", "--trainer.callbacks.folder", str(tmp_path),
    ]  # fmt: skip
    # Its own process group, so that a hung rank (a DDP deadlock) is killed with the launcher on timeout.
    process = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"DDP training did not finish in 300 s:\n{output}") from None
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{output}"

    infos = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(info["world_size"] == 2 and info["global_step"] == 12 for info in infos)
    # Each rank sees half of every epoch: 24 images, 2 ranks, batches of 4, 12 steps = 4 epochs of 3 batches.
    assert all(len(info["captions"]) == 12 * 4 for info in infos)
    assert infos[0]["captions"] != infos[1]["captions"]

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
    exported = load_from_safetensors(
        tmp_path / "outputs" / "tiny-lora" / "tensorboard" / "version_0" / "loras" / "lora.safetensors"
    )
    for name, lora in initial.named_loras().items():
        prefix = f"loras.{name.replace('.', '/')}"
        for role, layer in (("lora_down", lora.down), ("lora_up", lora.up)):
            expected = ranks[0][f"{prefix}.{lora.key_of(layer)}.weight"]
            torch.testing.assert_close(
                exported[f"{initial.diffusers_names[name]}.{role}.weight"], expected, atol=0, rtol=0
            )
