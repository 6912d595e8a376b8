"""The names other libraries give the layers of `SD1UNet`: diffusers' module names, and the original ("ldm") ones.

Checkpoints and LoRA files name tensors after modules: `down_blocks.0.attentions.0.proj_in` in diffusers'
`UNet2DConditionModel`, `input_blocks.1.1.proj_in` in the original latent-diffusion code. `diffusers_unet_modules`
pairs every diffusers module name with the layer of a live `SD1UNet` that plays its role, by walking the UNet's blocks
in order and numbering them as diffusers does; `ldm_unet_renaming` pairs diffusers' names with the original ones.
The weight converters (`refiners.converters`) and the LoRA loaders (`refiners.adapters.lora`) both read them.

Example:
    ```py
    import refiners.fluxion.layers as fl
    from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
    from refiners.foundationals.latent_diffusion.unet_names import diffusers_unet_modules, ldm_unet_renaming

    modules = diffusers_unet_modules(SD1UNet(device="meta"))
    proj_in = modules["down_blocks.0.attentions.0.proj_in"]
    assert isinstance(proj_in, fl.Conv2d) and proj_in.in_channels == 320
    original = ldm_unet_renaming().to_original("down_blocks.0.attentions.0.proj_in")
    assert original == "input_blocks.1.1.proj_in"
    ```
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import Lora
from refiners.foundationals.latent_diffusion.cross_attention import CrossAttentionBlock2d
from refiners.foundationals.latent_diffusion.range_adapter import GuidanceEmbedding, RangeEncoder
from refiners.foundationals.latent_diffusion.unet import (
    DownBlocks,
    MiddleBlock,
    OutputBlock,
    ResidualBlock,
    UNet,
    UpBlocks,
)

__all__ = [
    "diffusers_unet_modules",
    "diffusers_encoder_modules",
    "ModuleRenaming",
    "ldm_unet_renaming",
    "unet_renaming",
]

T = TypeVar("T", bound=fl.Module)

_RESNET = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _layers(chain: fl.Chain, layer_type: type[T]) -> Iterator[T]:
    """The layers of `layer_type` in `chain`, depth first, but those of LoRAs: they update the model's layers (which
    stay inside their `LoraAdapter`), they are not layers of the model; nor those of an adapter of a layer without
    weights (an IP-Adapter's decoupled cross-attention, in the place of an attention's `ScaledDotProductAttention`)."""
    for child in chain:
        if isinstance(child, Lora):
            continue
        if isinstance(child, fl.Adapter) and next(child.target.parameters(), None) is None:
            continue
        if isinstance(child, layer_type):
            yield child
        if isinstance(child, fl.Chain):
            yield from _layers(child, layer_type)


def _the(modules: Iterable[T], what: str, count: int) -> list[T]:
    found = list(modules)
    if len(found) != count:
        raise ValueError(f"expected {count} {what}, found {len(found)}: is this a Stable Diffusion UNet?")
    return found


def _resnet(prefix: str, block: ResidualBlock) -> list[tuple[str, fl.WeightedModule]]:
    # In the order diffusers applies them: norm1, conv1 (+ time_emb_proj), norm2, conv2, and the 1x1 shortcut.
    norm1, norm2 = _the(_layers(block, fl.GroupNorm), "GroupNorms per ResidualBlock", 2)
    convs = list(_layers(block, fl.Conv2d))
    if len(convs) not in (2, 3):
        raise ValueError(
            f"expected 2 or 3 Conv2ds per ResidualBlock, found {len(convs)}: is this a Stable Diffusion UNet?"
        )
    conv1, conv2, *shortcut = convs
    (time_emb_proj,) = _the(_layers(block, fl.Linear), "Linear per ResidualBlock (timestep projection)", 1)
    modules: tuple[fl.WeightedModule, ...] = (norm1, conv1, time_emb_proj, norm2, conv2, *shortcut)
    return [(f"{prefix}.{name}", module) for name, module in zip(_RESNET, modules, strict=False)]


def _transformer(prefix: str, block: CrossAttentionBlock2d) -> list[tuple[str, fl.WeightedModule]]:
    depth = block.num_attention_layers
    (norm,) = _the(_layers(block, fl.GroupNorm), "GroupNorm per CrossAttentionBlock2d", 1)
    norms = _the(_layers(block, fl.LayerNorm), "LayerNorms per CrossAttentionBlock2d", 3 * depth)
    linears: list[fl.WeightedModule] = list(_layers(block, fl.Linear))
    projections: list[fl.WeightedModule]
    if block.use_linear_projection:
        _the(linears, "Linears per CrossAttentionBlock2d", 10 * depth + 2)
        projections, linears = [linears[0], linears[-1]], linears[1:-1]
    else:
        projections = list(_the(_layers(block, fl.Conv2d), "Conv2ds per CrossAttentionBlock2d", 2))
        _the(linears, "Linears per CrossAttentionBlock2d", 10 * depth)
    proj_in, proj_out = projections
    pairs: list[tuple[str, fl.WeightedModule]] = [(f"{prefix}.norm", norm), (f"{prefix}.proj_in", proj_in)]
    for k in range(depth):
        t = f"{prefix}.transformer_blocks.{k}"
        norm1, norm2, norm3 = norms[3 * k : 3 * k + 3]
        block_linears = linears[10 * k : 10 * k + 10]
        attn1, attn2, (ff_in, ff_out) = block_linears[0:4], block_linears[4:8], block_linears[8:10]
        pairs += [
            (f"{t}.norm1", norm1),
            *((f"{t}.attn1.{name}", module) for name, module in zip(_ATTENTION, attn1, strict=True)),
            (f"{t}.norm2", norm2),
            *((f"{t}.attn2.{name}", module) for name, module in zip(_ATTENTION, attn2, strict=True)),
            (f"{t}.norm3", norm3),
            # diffusers' GEGLU projection: one Linear for the values and the gates.
            (f"{t}.ff.net.0.proj", ff_in),
            (f"{t}.ff.net.2", ff_out),
        ]
    pairs.append((f"{prefix}.proj_out", proj_out))
    return pairs


def _level_blocks(prefix: str, blocks: Iterable[fl.Chain]) -> list[tuple[str, fl.WeightedModule]]:
    """The down or up blocks: one diffusers block per resolution, closed by its down- or upsampler (if any)."""
    pairs: list[tuple[str, fl.WeightedModule]] = []
    level, index = 0, 0
    for block in blocks:
        for layer in block:
            if isinstance(layer, ResidualBlock):
                pairs += _resnet(f"{prefix}.{level}.resnets.{index}", layer)
            elif isinstance(layer, CrossAttentionBlock2d):
                pairs += _transformer(f"{prefix}.{level}.attentions.{index}", layer)
            elif isinstance(layer, fl.Downsample | fl.Upsample):
                (conv,) = _the(_layers(layer, fl.Conv2d), f"Conv2d per {type(layer).__name__}", 1)
                kind = "downsamplers" if isinstance(layer, fl.Downsample) else "upsamplers"
                pairs.append((f"{prefix}.{level}.{kind}.0.conv", conv))
        if any(isinstance(layer, fl.Downsample | fl.Upsample) for layer in block):
            level, index = level + 1, 0
        elif block.find(ResidualBlock) is not None:
            index += 1
    return pairs


def diffusers_encoder_modules(
    model: fl.Chain, extra: Iterable[tuple[str, fl.WeightedModule]] = ()
) -> list[tuple[str, fl.WeightedModule]]:
    """The diffusers names of the layers of a UNet's encoder half: the timestep embedding, `extra` (e.g. SDXL's
    text-time embedding), `conv_in` (the first convolution of the first down block), the down blocks and the middle
    block. A UNet has them (see `diffusers_unet_modules`), and so has a ControlNet, a copy of them.

    Args:
        model: A Chain holding a `RangeEncoder`, `DownBlocks` and a `MiddleBlock` (its weights are not read).
        extra: The `(diffusers name, layer)` pairs of the layers outside the common blocks, after the timestep's.

    Raises:
        ValueError: The model is not laid out like a UNet's encoder.
    """
    pairs: list[tuple[str, fl.WeightedModule]] = []
    range_encoder = model.ensure_find(RangeEncoder)
    guidance = range_encoder.find(GuidanceEmbedding)
    guidance_linears = [] if guidance is None else list(_layers(guidance, fl.Linear))
    timestep_linears = [
        linear for linear in _layers(range_encoder, fl.Linear) if all(linear is not g for g in guidance_linears)
    ]
    linear_1, linear_2 = _the(timestep_linears, "Linears in the RangeEncoder", 2)
    pairs.append(("time_embedding.linear_1", linear_1))
    pairs += [("time_embedding.cond_proj", linear) for linear in guidance_linears]  # LCM's guidance embedding
    pairs.append(("time_embedding.linear_2", linear_2))
    pairs += extra

    down_blocks = model.layer("DownBlocks", DownBlocks)
    conv_in_block, *down = list(down_blocks.layers(fl.Chain))
    conv_in = next(iter(_layers(conv_in_block, fl.Conv2d)), None)
    if conv_in is None:
        raise ValueError("expected a Conv2d in the first down block: is this a Stable Diffusion UNet?")
    pairs.append(("conv_in", conv_in))
    pairs += _level_blocks("down_blocks", down)

    middle = model.layer("MiddleBlock", MiddleBlock)
    resnet_0, resnet_1 = _the(middle.layers(ResidualBlock), "ResidualBlocks in the MiddleBlock", 2)
    (attention,) = _the(middle.layers(CrossAttentionBlock2d), "CrossAttentionBlock2d in the MiddleBlock", 1)
    pairs += _resnet("mid_block.resnets.0", resnet_0)
    pairs += _transformer("mid_block.attentions.0", attention)
    pairs += _resnet("mid_block.resnets.1", resnet_1)

    return pairs


def diffusers_unet_modules(unet: UNet) -> dict[str, fl.WeightedModule]:
    """Every layer with weights of a UNet (`SD1UNet`, `SDXLUNet`), by the name of the module of diffusers'
    `UNet2DConditionModel` that plays its role, in diffusers' order.

    The names are derived from the structure, so they hold for every topology and width (`SD1UNet(channels=...)`),
    for the inpainting UNets, and with adapters injected (a layer wrapped in a `LoraAdapter` keeps its name; the
    layers of LoRAs are not the model's and have none). Layers outside the common blocks (SDXL's text-time
    embedding) are named by the UNet's `extra_diffusers_modules()`.

    Args:
        unet: The UNet (its weights are not read: it may live on the "meta" device).

    Raises:
        ValueError: The model is not laid out like an `SD1UNet`.
    """
    pairs = diffusers_encoder_modules(unet, unet.extra_diffusers_modules())
    pairs += _level_blocks("up_blocks", unet.layer("UpBlocks", UpBlocks).layers(fl.Chain))

    output = unet.layer("OutputBlock", OutputBlock)
    (norm_out,) = _the(_layers(output, fl.GroupNorm), "GroupNorm in the OutputBlock", 1)
    (conv_out,) = _the(_layers(output, fl.Conv2d), "Conv2d in the OutputBlock", 1)
    pairs += [("conv_norm_out", norm_out), ("conv_out", conv_out)]
    return dict(pairs)


# -- the original layout ---------------------------------------------------------------------------------------

_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


class ModuleRenaming:
    """Module paths of the original layout paired with diffusers'; a key is renamed by its longest paired prefix.

    Args:
        pairs: `(original, diffusers)` module paths. A pair renames the module and everything inside it; a longer
            pair inside it takes precedence (e.g. a resnet, then its `skip_connection` -> `conv_shortcut`).
        conv_as_linear: Diffusers paths of Linear layers that the original layout stores as 1x1 convolutions.

    Raises:
        ValueError: A path appears in two pairs.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]], conv_as_linear: Iterable[str] = ()) -> None:
        self.conv_as_linear = frozenset(conv_as_linear)
        self._to_diffusers: dict[str, str] = {}
        self._to_original: dict[str, str] = {}
        for original, diffusers in pairs:
            if original in self._to_diffusers or diffusers in self._to_original:
                raise ValueError(f"{original!r} <-> {diffusers!r} is paired twice")
            self._to_diffusers[original] = diffusers
            self._to_original[diffusers] = original

    @staticmethod
    def _rename(key: str, table: Mapping[str, str]) -> str | None:
        parts = key.split(".")
        for end in range(len(parts), -1, -1):
            if (renamed := table.get(".".join(parts[:end]))) is not None:
                return ".".join(part for part in (renamed, *parts[end:]) if part)
        return None

    def to_diffusers(self, key: str) -> str | None:
        """The diffusers name of an original key, or None if no paired module holds it."""
        return self._rename(key, self._to_diffusers)

    def to_original(self, key: str) -> str | None:
        """The original name of a diffusers key, or None if no paired module holds it."""
        return self._rename(key, self._to_original)


def _unet_resnet(original: str, diffusers: str) -> list[tuple[str, str]]:
    return [(f"{original}.{o}", f"{diffusers}.{d}") for o, d in _UNET_RESNET]


def unet_renaming(unet: UNet) -> ModuleRenaming:
    """The original layout's module paths of `unet` (SD1's `openaimodel`, SDXL's SGM) and diffusers', from its topology.

    Args:
        unet: The UNet (its weights are not read).
    """
    topology = unet.topology
    return ldm_unet_renaming(topology.layers_per_block, topology.attention_levels, unet.extra_original_modules())


def ldm_unet_renaming(
    layers_per_block: int = 2,
    attention_levels: Sequence[bool] = (True, True, True, False),
    extra_pairs: Iterable[tuple[str, str]] = (),
) -> ModuleRenaming:
    """The original UNet's (`openaimodel.UNetModel`) module paths and diffusers' `UNet2DConditionModel`'s.

    The original numbers its blocks flat: `input_blocks.0` is `conv_in`, then each resolution has
    `layers_per_block` blocks (`.0` a resnet, `.1` a spatial transformer where there is attention) and a
    downsampler (`.0.op`) but the last; `output_blocks` mirror them with one more block per resolution, the
    upsampler being the block's last layer (`.1.conv`, or `.2.conv` after a transformer).

    Args:
        layers_per_block: Resnets per down block (diffusers' `layers_per_block`; SD1: 2).
        attention_levels: For each resolution, highest first, whether its blocks have a transformer (SD1: all but
            the lowest).
        extra_pairs: `(original, diffusers)` paths of the modules outside the common blocks (SDXL's `label_emb`).
    """
    levels = len(attention_levels)
    pairs = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    block = 1
    for level, attention in enumerate(attention_levels):
        for index in range(layers_per_block):
            pairs += _unet_resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{index}")
            if attention:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{index}"))
            block += 1
        if level < levels - 1:
            pairs.append((f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            block += 1
    pairs += _unet_resnet("middle_block.0", "mid_block.resnets.0")
    pairs.append(("middle_block.1", "mid_block.attentions.0"))
    pairs += _unet_resnet("middle_block.2", "mid_block.resnets.1")
    block = 0
    for level, attention in enumerate(reversed(attention_levels)):
        for index in range(layers_per_block + 1):
            pairs += _unet_resnet(f"output_blocks.{block}.0", f"up_blocks.{level}.resnets.{index}")
            if attention:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{level}.attentions.{index}"))
            if index == layers_per_block and level < levels - 1:
                upsampler = f"output_blocks.{block}.{2 if attention else 1}.conv"
                pairs.append((upsampler, f"up_blocks.{level}.upsamplers.0.conv"))
            block += 1
    return ModuleRenaming([*pairs, *extra_pairs])
