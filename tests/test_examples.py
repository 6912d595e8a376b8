"""Every example runs, as a user would run it, and prints what it is about, so that none of them rots."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# What an example's output (stdout or stderr) must contain, on top of a clean exit (the examples assert their claims).
EXPECTED_OUTPUT = {
    "framework_demo.py": [
        "(CHAIN) BasicModel()",
        "(CHAIN) HiddenLayer()",
        "(SUM) SingleLoraAdapter()",
        "after eject: the original Linears are back in place and the output is exactly the same",
        # The Context API's seed example: 4 from `set_context`, plus 2, printed by a layer deep in the tree.
        "m() prints: 6\n",
    ],
    "stable_diffusion_demo.py": [
        # refiners-convert --check: each component's output next to diffusers' / transformers' (1e-4 of its scale).
        "tolerance 0.0001): ok\nautoencoder: checking",
        "tolerance 0.0001): ok\nunet: checking",
        "tolerance 0.0001): ok\n",
        "LoRA exported to lora/lora.safetensors, lora/lora-peft.safetensors, lora/lora-kohya.safetensors",
        "LoRA ejected: mean |pixel change| = 0.00 / 255",
        # refiners-train's progress (configs/tiny-lora.yaml's TrainingProgress), and each step's duration.
        "training 97,792 parameters on cpu to step 24\nstep 1/24  loss ",
        "\nstep 24/24  loss ",
        "\n[4/5] done in ",
    ],
    "digits_demo.py": [
        "right on digits it never saw",
        "  accuracy ",
        "training 45,568 parameters on cpu to step 100\nstep 1/100  loss ",
        "sevens (judged ",
        "LoRA ejected: the base model's images are back, bit for bit",
        "unet: max abs difference 0 (0 of the output's scale",  # refiners-convert sd1 --check, after the export
        "the model converted there and back draws the same images, bit for bit",
    ],
    "digits_data.py": ["wrote "],
}
# What an example must not print: third-party notices that do not concern its reader.
UNEXPECTED_OUTPUT = {
    "stable_diffusion_demo.py": [
        "requires torchvision",  # transformers' image processors falling back to Pillow
        "Writing model shards",  # transformers' save_pretrained progress bar
        "Loading weights",  # transformers' from_pretrained progress bar (refiners-convert --check)
        "💡 Tip",  # Lightning's advertisements
        "GPU available",  # Lightning's device lines
        "TPU available",
        "LOCAL_RANK",
        "Seed set to",
        "Epoch ",  # Lightning's progress bar, which counts epochs
        "┃",  # Lightning's model summary table
        "LeafSpec",  # torch's deprecation of what Lightning uses
        "Traceback",
    ],
}
# The arguments that make an example write its outputs under the test's folder ("{tmp}"), out of the repository.
ARGUMENTS = {
    "stable_diffusion_demo.py": ["--output", "{tmp}"],
    "digits_demo.py": ["--output", "{tmp}"],
    "digits_data.py": ["{tmp}/digits"],
}


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    output = [argument.format(tmp=tmp_path) for argument in ARGUMENTS.get(script.name, [])]
    result = subprocess.run(
        [sys.executable, str(script), *output], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), f"{script.name} printed nothing"
    for expected in EXPECTED_OUTPUT.get(script.name, []):
        assert expected in result.stdout + result.stderr, expected
    for unexpected in UNEXPECTED_OUTPUT.get(script.name, []):
        assert unexpected not in result.stdout + result.stderr, unexpected


def test_expectations_name_existing_examples() -> None:
    assert set(EXPECTED_OUTPUT) | set(UNEXPECTED_OUTPUT) | set(ARGUMENTS) <= {path.name for path in EXAMPLES}
