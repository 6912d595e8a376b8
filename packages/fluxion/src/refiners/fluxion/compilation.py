"""Regional compilation: `torch.compile` a model's repeated blocks one by one instead of the whole model.

A UNet or a transformer is mostly a few kinds of blocks repeated many times. Compiled one by one
(`torch.nn.Module.compile`), blocks of one kind share their compiled code: Dynamo traces each kind once per distinct
shape instead of tracing the whole model, so the warm-up takes a fraction of a full `torch.compile(model)`'s, for
most of its speed (PyTorch's regional compilation recipe,
https://docs.pytorch.org/tutorials/recipes/regional_compilation.html, and diffusers' `compile_repeated_blocks`).

A model family declares the kinds of blocks it repeats in a `repeated_blocks` class attribute (the Stable Diffusion
UNets: their transformer layers, `CrossAttentionBlock`); `compile_repeated_blocks` compiles every block of those
kinds in the tree. The Context API works across the compiled regions: a region reads and writes the store of its
tree as the eager layers around it do.
"""

from collections.abc import Sequence
from typing import Any

from refiners.fluxion.layers.chain import Chain
from refiners.fluxion.layers.module import Module

__all__ = ["compile_repeated_blocks", "repeated_blocks_of"]


def repeated_blocks_of(model: Chain) -> tuple[type[Module], ...]:
    """The kinds of blocks `model` declares it repeats (its class attribute `repeated_blocks`).

    Args:
        model: A model whose class declares `repeated_blocks: ClassVar[tuple[type[Module], ...]]`.
    """
    declared: object = getattr(model, "repeated_blocks", None)
    if not isinstance(declared, tuple) or not declared:
        raise ValueError(
            f"{type(model).__name__} declares no repeated blocks: give its class a `repeated_blocks` attribute (a "
            f"tuple of Module classes, e.g. its transformer layer), or pass `block_types` to compile_repeated_blocks"
        )
    kinds: list[type[Module]] = []
    for kind in declared:  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(kind, type) or not issubclass(kind, Module):
            raise TypeError(
                f"{type(model).__name__}.repeated_blocks must hold Module classes, got {kind!r} in {declared!r}"
            )
        kinds.append(kind)
    return tuple(kinds)


def compile_repeated_blocks(
    model: Chain, block_types: Sequence[type[Module]] | None = None, **options: Any
) -> list[Module]:
    """Compile, in place, every block of `model` of the kinds it repeats; the rest of the model stays eager.

    Each block is compiled with `Module.compile(**options)`: calling the model runs it as before, the blocks through
    their compiled code. Blocks of one kind and one shape share a single compiled graph. A block inside another
    selected block is compiled as part of it. Compile after injecting adapters (LoRAs...): an adapter injected into a
    compiled block later is traced again at the next call.

    Dynamo keeps compiled graphs per function and bounds their number (`torch._dynamo.config.recompile_limit`, 8 by
    default; past it, the function runs eagerly, or raises with `fullgraph=True`), and the blocks of every Chain
    class without a `forward` of its own share `Chain.forward`. SD1.5's UNet needs 7 graphs at one image size and 8
    for any number of sizes (the second makes the shapes dynamic); the TINY presets' UNets need 6 (SD1) and 5 (SDXL).
    A batch of 1 after a batch of 2 compiles each again (Dynamo specialises sizes of 1), and so do the blocks of
    another model compiled in the same process: raise the limit for those.

    Args:
        model: The model, e.g. an `SD1UNet` or an `SDXLUNet`.
        block_types: The kinds of blocks to compile; defaults to what the model declares (see `repeated_blocks_of`).
        **options: Passed to `torch.compile` (`backend`, `mode`, `fullgraph`, `dynamic`...).

    Returns:
        The compiled blocks, in tree order.

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl
        from refiners.fluxion.compilation import compile_repeated_blocks

        class Block(fl.Residual):
            def __init__(self, width: int) -> None:
                super().__init__(fl.LayerNorm(width), fl.Linear(width, width), fl.GeLU())

        class Model(fl.Chain):
            repeated_blocks = (Block,)

        model = Model(fl.Linear(8, 16), *(Block(16) for _ in range(4)), fl.Linear(16, 2))
        x = torch.randn(3, 8)
        expected = model(x)
        assert len(compile_repeated_blocks(model, backend="eager", fullgraph=True)) == 4
        torch.testing.assert_close(model(x), expected)
        ```
    """
    kinds = tuple(block_types) if block_types is not None else repeated_blocks_of(model)
    blocks = [module for module, _ in model.walk(lambda module, _: isinstance(module, kinds))]
    if not blocks:
        raise LookupError(
            f"no block of the kinds {[kind.__name__ for kind in kinds]} in {model.get_path()}: nothing to compile"
        )
    for block in blocks:
        block.compile(**options)
    return blocks
