"""`torch.compile` on the SD1 and SDXL UNets (the families' TINY presets), with LoRAs injected.

- Whole UNets compile with `fullgraph=True`, so without a single graph break, and compute what they compute eagerly.
- `compile_repeated_blocks` compiles the transformer layers one by one: SD1's 16 share 6 graphs, whatever the latent
  size (the graphs' sequence lengths are dynamic).
- After `enable_lora_hotswap`, rescaling the LoRAs and swapping in another's weights (same rank, or lower and padded)
  runs the compiled UNet without recompiling, and equals a UNet given that LoRA plainly.

The backend counts the graphs Dynamo hands it and runs them as captured: Dynamo's tracing is what these tests check
(graph breaks, the Context API's values read at each call, recompilations); inductor's code generation, which takes
minutes on CI's CPUs, runs in `benchmarks/compile.py`. The SDXL UNet is TINY with one transformer layer per block
(instead of 1, 2, 3): the same layers, fewer of them to trace.
"""

import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import Tensor
from toy_sd1 import save_toy_sd1

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import (
    Conv2dLora,
    LinearLora,
    Lora,
    LoraAdapter,
    add_loras_to,
    enable_lora_hotswap,
)
from refiners.fluxion.compilation import compile_repeated_blocks
from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.latent_diffusion.cross_attention import CrossAttentionBlock
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY as SD1_TINY
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLUNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY as SDXL_TINY
from refiners.foundationals.latent_diffusion.unet import UNet

BATCH = 2
LATENT_SIZE = 16


class CountingBackend:
    """A `torch.compile` backend that counts the graphs it receives and runs them as Dynamo captured them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        self.graphs += 1
        return graph.forward


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    # Dynamo keeps compiled graphs per code object (all Chains share `Chain.forward`'s) and bounds their number
    # (`recompile_limit`): each test starts without those of the others.
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def build(family: str) -> UNet:
    """The family's TINY UNet with random weights (seeded), its side inputs set."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    unet: UNet
    if family == "sd1":
        unet = SD1_TINY.unet.build((SD1UNet,))
    else:
        config = ModelConfig(SDXL_TINY.unet.class_name, {**SDXL_TINY.unet.arguments, "transformer_depths": (1, 1, 1)})
        unet = config.build((SDXLUNet,))
        assert isinstance(unet, SDXLUNet)
        unet.set_pooled_text_embedding(torch.randn(BATCH, unet.pooled_embedding_dim, generator=generator))
        unet.set_time_ids(torch.randn(BATCH, unet.num_time_ids, generator=generator))
    unet.set_timestep(torch.tensor([999, 500]))
    unet.set_clip_text_embedding(torch.randn(BATCH, 7, unet.context_embedding_dim, generator=generator))
    return unet


def forward(model: Callable[[Tensor], Tensor], size: int = LATENT_SIZE) -> Tensor:
    latents = torch.randn(BATCH, 4, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(latents)


def assert_equal_to_eager(actual: Tensor, expected: Tensor) -> None:
    """Equal within 1e-5 of the eager output's largest magnitude."""
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def is_lora_target(layer: fl.Module, parent: fl.Chain) -> bool:
    return isinstance(layer, fl.Linear | fl.Conv2d)


def with_random_loras(unet: UNet, rank: int = 2) -> list[LoraAdapter]:
    """A LoRA on every Linear and Conv2d, with a non-zero `up` so that each changes the output."""
    adapters = add_loras_to(unet, is_lora_target, rank=rank)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in adapters:
            up = adapter.loras["default"].up.weight
            up.copy_(0.05 * torch.randn(up.shape, generator=generator))
    return adapters


def test_sdxl_unet_with_loras_compiles_whole_without_graph_breaks() -> None:
    unet = build("sdxl")
    expected_without_loras = forward(unet)
    with_random_loras(unet)
    expected = forward(unet)
    assert not torch.allclose(expected, expected_without_loras, atol=1e-3)  # the LoRAs count

    backend = CountingBackend()
    compiled = torch.compile(unet, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    assert_equal_to_eager(forward(compiled), expected)
    assert_equal_to_eager(forward(compiled), expected)  # nothing of the first call leaked into the context
    assert backend.graphs == 1


def test_regional_compilation_shares_graphs_between_blocks_and_sizes() -> None:
    unet = build("sd1")
    with_random_loras(unet)
    expected, expected_larger = forward(unet), forward(unet, size=2 * LATENT_SIZE)

    backend = CountingBackend()
    compiled = compile_repeated_blocks(unet, backend=backend, fullgraph=True)
    assert len(compiled) == 16 and all(isinstance(block, CrossAttentionBlock) for block in compiled)
    assert_equal_to_eager(forward(unet), expected)
    # 16 blocks of 3 widths, in the down and up halves and the middle block: Dynamo compiles a first graph with
    # static shapes, then dynamic ones; the blocks of one width and place share a graph.
    assert backend.graphs == 6
    assert_equal_to_eager(forward(unet, size=2 * LATENT_SIZE), expected_larger)
    assert backend.graphs == 6  # another latent size: no new graph


def lora_weights(unet: UNet, rank: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Random `(down, up)` weights of one LoRA for each target of `is_lora_target`, in tree order."""
    generator = torch.Generator().manual_seed(seed)
    weights: list[tuple[Tensor, Tensor]] = []
    for layer in lora_targets(unet):
        down_shape = (rank, *layer.weight.shape[1:])
        up_shape = (layer.weight.shape[0], rank, *((1, 1) if isinstance(layer, fl.Conv2d) else ()))
        down = torch.randn(down_shape, generator=generator) / layer.weight[0].numel() ** 0.5
        weights.append((down, 0.1 * torch.randn(up_shape, generator=generator)))
    return weights


def lora_targets(unet: UNet) -> list[fl.Linear | fl.Conv2d]:
    targets: list[fl.Linear | fl.Conv2d] = []
    for layer, _ in unet.walk(is_lora_target):
        assert isinstance(layer, fl.Linear | fl.Conv2d)
        targets.append(layer)
    return targets


def plainly(weights: list[tuple[Tensor, Tensor]], alpha: float | None, scale: float) -> Tensor:
    """The eager output of a fresh SD1 UNet given these LoRA weights as plain LoRAs."""
    unet = build("sd1")
    for layer, (down, up) in zip(lora_targets(unet), weights, strict=True):
        LoraAdapter(layer, Lora[Any].from_weights("plain", down, up, alpha=alpha, scale=scale)).inject()
    return forward(unet)


def test_lora_hotswap_rescales_and_swaps_without_recompiling() -> None:
    unet = build("sd1")
    # Three LoRAs: the one compiled with (rank 2, padded to 4), one of the highest rank and one of a lower rank.
    first, same_rank, lower_rank = (lora_weights(unet, rank, seed) for rank, seed in ((2, 10), (4, 11), (3, 12)))
    adapters = [
        LoraAdapter(layer, Lora[Any].from_weights("hot", down, up, alpha=1.0)).inject()
        for layer, (down, up) in zip(lora_targets(unet), first, strict=True)
    ]
    loras = enable_lora_hotswap(unet, target_rank=4)
    assert len(loras) == len(adapters) and all(lora.rank == 4 for lora in loras)

    backend = CountingBackend()
    compiled = torch.compile(unet, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    assert_equal_to_eager(forward(compiled), plainly(first, alpha=1.0, scale=1.0))
    assert backend.graphs == 1

    with torch.compiler.set_stance("fail_on_recompile"):
        for adapter in adapters:
            adapter.set_scale("hot", 0.5)
        assert_equal_to_eager(forward(compiled), plainly(first, alpha=1.0, scale=0.5))
        for adapter, (down, up) in zip(adapters, same_rank, strict=True):
            lora = adapter.loras["hot"]
            assert isinstance(lora, LinearLora | Conv2dLora)
            lora.swap_weights(down, up, alpha=8.0)
        assert_equal_to_eager(forward(compiled), plainly(same_rank, alpha=8.0, scale=0.5))
        for adapter, (down, up) in zip(adapters, lower_rank, strict=True):
            lora = adapter.loras["hot"]
            assert isinstance(lora, LinearLora | Conv2dLora)
            lora.swap_weights(down, up)
        assert_equal_to_eager(forward(compiled), plainly(lower_rank, alpha=None, scale=0.5))
    assert backend.graphs == 1


@pytest.mark.parametrize("documented", [compile_repeated_blocks, enable_lora_hotswap], ids=lambda f: f.__name__)
def test_docstring_example_runs(documented: Callable[..., Any]) -> None:
    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(documented) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), f"<{documented.__name__} example>", "exec"), {"__name__": "example"})


def test_the_readme_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `### torch.compile` block on the toy SD1 (converted as `sd15/`), word for word but for 3 steps
    instead of 30 and the "eager" backend (inductor's code generation takes minutes on CI's CPUs)."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme[readme.index("### torch.compile") :]
    (block,) = re.findall(r"^```py\n(.*?)^```$", re.split(r"\n##+ ", section, maxsplit=1)[0], re.MULTILINE | re.DOTALL)
    block, steps = re.subn(r"num_inference_steps=30\b", "num_inference_steps=3", block)
    block, backends = re.subn(
        r"compile_repeated_blocks\(sd15.unet\)", 'compile_repeated_blocks(sd15.unet, backend="eager")', block
    )
    assert (steps, backends) == (2, 1)
    _, converted = save_toy_sd1(tmp_path)
    (tmp_path / "sd15").symlink_to(converted, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md, torch.compile block", "exec"), {"__name__": "readme"})
    assert Image.open("compiled_cat.png").size == Image.open("compiled_cat_swapped.png").size == (64, 64)
