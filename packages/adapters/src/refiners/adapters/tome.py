"""Token merging for Stable Diffusion (ToMe, Bolya and Hoffman, 2023, https://arxiv.org/abs/2303.17604).

The UNet's transformers at the highest resolutions attend over thousands of tokens, many of them alike. Before a
transformer layer's self-attention, ToMe merges the most redundant tokens into others, runs the attention on fewer
tokens, then copies each merged token's output back to its place (`unmerge`), as `tomesd.apply_patch(ratio=...)`
does on each `BasicTransformerBlock`:

    x = x + unmerge(self_attention(merge(LayerNorm(x))))       cross-attention and MLP: the same, when chosen

The merge is a bipartite soft matching on the layer's input: the map is cut in `stride_y x stride_x` cells, one
token of each cell (the top left one, or one drawn at random) is a destination, and the `ratio * tokens` other tokens
most similar (cosine) to a destination are averaged into it.

Here a `ToMeBlock` adapter computes the matching before each transformer layer (`TokenMatcher`, into the context
`TOME_CONTEXT`), and `TokenMerging` / `TokenUnmerging` adapters put `merge` after the chosen sub-layers' LayerNorm and
`unmerge` after their last layer.
"""

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, Self, get_args

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts
from refiners.foundationals.latent_diffusion.cross_attention import TOKENS_SHAPE_CONTEXT, CrossAttentionBlock
from refiners.foundationals.latent_diffusion.unet import DownBlocks, MiddleBlock, UNet, UpBlocks

__all__ = [
    "TOME_CONTEXT",
    "MATCHING_KEY",
    "MergedSubLayer",
    "TokenMatching",
    "bipartite_soft_matching",
    "TokenMatcher",
    "MergeTokens",
    "UnmergeTokens",
    "TokenMerging",
    "TokenUnmerging",
    "ToMeBlock",
    "ToMeAdapter",
]

TOME_CONTEXT = "token_merging"
MATCHING_KEY = "matching"
"""`TOME_CONTEXT[MATCHING_KEY]`: the `TokenMatching` of the transformer layer that runs (None: nothing merged)."""

MergedSubLayer = Literal["self_attention", "cross_attention", "feed_forward"]
"""A sub-layer of a transformer layer that can run on merged tokens (tomesd's `merge_attn`, `merge_crossattn`,
`merge_mlp`)."""

_SUB_LAYERS: dict[MergedSubLayer, str] = {
    "self_attention": "Residual_1",
    "cross_attention": "Residual_2",
    "feed_forward": "Residual_3",
}


@dataclass(frozen=True)
class TokenMatching:
    """Which tokens merge into which, for a `(batch, tokens, channels)` sequence (tomesd's `merge` and `unmerge`).

    Indices are along the tokens, shaped `(1 or batch, n, 1)` for `torch.gather`.

    Args:
        sources: The tokens that may merge (all but the destinations).
        destinations: One token per cell, which the merged sources are averaged into.
        unmerged: Among the sources, those that stay.
        merged: Among the sources, those that merge.
        merged_into: For each merged source, its destination (among the destinations).
    """

    sources: Tensor
    destinations: Tensor
    unmerged: Tensor
    merged: Tensor
    merged_into: Tensor

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, channels = x.shape
        sources = torch.gather(x, 1, self.sources.expand(batch, -1, channels))
        destinations = torch.gather(x, 1, self.destinations.expand(batch, -1, channels))
        return sources, destinations

    def merge(self, x: Tensor) -> Tensor:
        """The unmerged sources, then the destinations averaged with the sources merged into them."""
        sources, destinations = self._split(x)
        batch, _, channels = sources.shape
        unmerged = torch.gather(sources, -2, self.unmerged.expand(batch, -1, channels))
        merged = torch.gather(sources, -2, self.merged.expand(batch, -1, channels))
        index = self.merged_into.expand(batch, -1, channels)
        destinations = destinations.scatter_reduce(-2, index, merged, reduce="mean")
        return torch.cat([unmerged, destinations], dim=1)

    def unmerge(self, x: Tensor) -> Tensor:
        """Back to every token: each merged source gets its destination's value."""
        batch, _, channels = x.shape
        num_unmerged = self.unmerged.shape[1]
        unmerged, destinations = x[..., :num_unmerged, :], x[..., num_unmerged:, :]
        merged = torch.gather(destinations, -2, self.merged_into.expand(batch, -1, channels))
        num_tokens = self.sources.shape[1] + self.destinations.shape[1]
        out = torch.zeros(batch, num_tokens, channels, device=x.device, dtype=x.dtype)
        out.scatter_(-2, self.destinations.expand(batch, -1, channels), destinations)
        sources = self.sources.expand(batch, -1, 1)
        out.scatter_(-2, torch.gather(sources, 1, self.unmerged).expand(batch, -1, channels), unmerged)
        out.scatter_(-2, torch.gather(sources, 1, self.merged).expand(batch, -1, channels), merged)
        return out


def bipartite_soft_matching(
    metric: Tensor,
    height: int,
    width: int,
    num_merged: int,
    stride_x: int = 2,
    stride_y: int = 2,
    generator: torch.Generator | None = None,
) -> TokenMatching | None:
    """Match the tokens of a `height x width` map: `num_merged` sources to their most similar destination.

    tomesd's `bipartite_soft_matching_random2d`, operation for operation (the same sorts, hence the same ties).

    Args:
        metric: The tokens, `(batch, height * width, channels)`: their cosine similarity decides.
        height: The map's height.
        width: The map's width.
        num_merged: How many tokens to merge away (at most the number of sources).
        stride_x: The cells' width: one destination per cell.
        stride_y: The cells' height.
        generator: Draw each cell's destination from it; None: the top left token of each cell.

    Returns:
        The matching, or None when `num_merged` is 0 (nothing to merge).
    """
    if num_merged <= 0:
        return None
    device = metric.device
    with torch.no_grad():
        cells_y, cells_x = height // stride_y, width // stride_x
        if generator is None:
            choice = torch.zeros(cells_y, cells_x, 1, device=device, dtype=torch.int64)
        else:
            choice = torch.randint(
                stride_y * stride_x, size=(cells_y, cells_x, 1), device=generator.device, generator=generator
            ).to(device)
        # Destinations are -1 and sources 0, so that an argsort lists the destinations first.
        cells = torch.zeros(cells_y, cells_x, stride_y * stride_x, device=device, dtype=torch.int64)
        cells.scatter_(dim=2, index=choice, src=-torch.ones_like(choice))
        roles = cells.view(cells_y, cells_x, stride_y, stride_x).transpose(1, 2).reshape(-1, cells_x * stride_x)
        if roles.shape != (height, width):  # a map that the cells do not tile: its right and bottom are sources
            padded = torch.zeros(height, width, device=device, dtype=torch.int64)
            padded[: roles.shape[0], : roles.shape[1]] = roles
            roles = padded
        order = roles.reshape(1, -1, 1).argsort(dim=1)
        num_destinations = cells_y * cells_x
        sources, destinations = order[:, num_destinations:, :], order[:, :num_destinations, :]

        batch, num_tokens, channels = metric.shape
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a = torch.gather(metric, 1, sources.expand(batch, num_tokens - num_destinations, channels))
        b = torch.gather(metric, 1, destinations.expand(batch, num_destinations, channels))
        scores = a @ b.transpose(-1, -2)
        num_merged = min(a.shape[1], num_merged)
        best, best_destination = scores.max(dim=-1)
        ranking = best.argsort(dim=-1, descending=True)[..., None]
        merged = ranking[..., :num_merged, :]
        return TokenMatching(
            sources=sources,
            destinations=destinations,
            unmerged=ranking[..., num_merged:, :],
            merged=merged,
            merged_into=torch.gather(best_destination[..., None], -2, merged),
        )


class TokenMatcher(fl.ContextModule):
    """Match the tokens of the layer's input (see `bipartite_soft_matching`) into `TOME_CONTEXT`; the input passes.

    The map's height and width are those of the transformer's `ImageToTokens`. With an odd batch, the destinations
    are the top left tokens even with a generator (tomesd's rule: the prompt's and the negative prompt's halves must
    merge alike).

    Args:
        ratio: The share of the tokens merged away.
        stride_x: The cells' width.
        stride_y: The cells' height.
        generator: Draw the destinations from it (shared by the layers: one draw per layer and forward, in order).
    """

    def __init__(self, ratio: float, stride_x: int, stride_y: int, generator: torch.Generator | None) -> None:
        super().__init__()
        self.ratio = ratio
        self.stride_x = stride_x
        self.stride_y = stride_y
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        shape = self.use_context(TOKENS_SHAPE_CONTEXT)
        generator = self.generator if x.shape[0] % 2 == 0 else None
        matching = bipartite_soft_matching(
            x,
            shape["height"],
            shape["width"],
            int(x.shape[1] * self.ratio),
            self.stride_x,
            self.stride_y,
            generator,
        )
        self.set_context(TOME_CONTEXT, {MATCHING_KEY: matching})
        return x


class MergeTokens(fl.ContextModule):
    """`TokenMatching.merge` of the layer's matching (nothing when there is none)."""

    def forward(self, x: Tensor) -> Tensor:
        matching: TokenMatching | None = self.use_context(TOME_CONTEXT)[MATCHING_KEY]
        return x if matching is None else matching.merge(x)


class UnmergeTokens(fl.ContextModule):
    """`TokenMatching.unmerge` of the layer's matching (nothing when there is none)."""

    def forward(self, x: Tensor) -> Tensor:
        matching: TokenMatching | None = self.use_context(TOME_CONTEXT)[MATCHING_KEY]
        return x if matching is None else matching.unmerge(x)


class TokenMerging(fl.Chain, fl.Adapter[fl.LayerNorm]):
    """The LayerNorm that opens a sub-layer, then `MergeTokens`.

    Args:
        target: The sub-layer's LayerNorm.
    """

    def __init__(self, target: fl.LayerNorm) -> None:
        with self.setup_adapter(target):
            super().__init__(target, MergeTokens())


class TokenUnmerging(fl.Chain, fl.Adapter[fl.Module]):
    """The last layer of a sub-layer, then `UnmergeTokens`.

    Args:
        target: The sub-layer's last layer (its attention, or the MLP's second Linear).
    """

    def __init__(self, target: fl.Module) -> None:
        with self.setup_adapter(target):
            super().__init__(target, UnmergeTokens())


class ToMeBlock(fl.Chain, fl.Adapter[CrossAttentionBlock]):
    """A `TokenMatcher`, then the transformer layer.

    Args:
        target: The transformer layer.
        matcher: Its matcher.
    """

    def __init__(self, target: CrossAttentionBlock, matcher: TokenMatcher) -> None:
        with self.setup_adapter(target):
            super().__init__(matcher, target)

    def init_context(self) -> Contexts:
        return {TOME_CONTEXT: {MATCHING_KEY: None}}


class ToMeAdapter:
    """Token merging on a Stable Diffusion UNet (SD1, SDXL): `inject` merges tokens in its transformers, `eject`
    undoes it.

    Equal to `tomesd.apply_patch(pipe, ratio, max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn,
    merge_mlp)` on diffusers. tomesd tells a transformer's resolution by its number of tokens; here it is its level
    in the UNet (the same for maps of the usual sizes).

    Example:
        ```py
        import torch
        from refiners.adapters.tome import ToMeAdapter
        from refiners.foundationals.latent_diffusion import SD1UNet
        from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY

        unet = TINY.unet.build((SD1UNet,))
        tome = ToMeAdapter(target=unet, ratio=0.5, generator=torch.Generator().manual_seed(0)).inject()
        assert len(tome.blocks) == 5  # the highest resolution's transformers: 2 down, 3 up
        tome.eject()
        ```

    Args:
        target: The UNet.
        ratio: The share of the tokens merged away (tomesd's default 0.5; at most `1 - 1 / (stride_x * stride_y)`).
        max_downsample: Merge in the transformers of the levels downsampled at most this much (1: the highest
            resolution only, 2: the two highest, and so on).
        stride_x: The width of the cells that each give one destination (tomesd's `sx`).
        stride_y: Their height (`sy`).
        use_rand: Draw each cell's destination at random (with an even batch); else its top left token.
        generator: Where the random destinations are drawn from; default: a fork of torch's global generator, taken
            here (tomesd forks it at the first forward).
        merge_in: The sub-layers that run on merged tokens: tomesd's default is the self-attention alone.
    """

    def __init__(
        self,
        target: UNet,
        ratio: float = 0.5,
        max_downsample: int = 1,
        stride_x: int = 2,
        stride_y: int = 2,
        use_rand: bool = True,
        generator: torch.Generator | None = None,
        merge_in: Collection[MergedSubLayer] = ("self_attention",),
    ) -> None:
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio is the share of the tokens merged away, in [0, 1): got {ratio}")
        unknown = set(merge_in) - set(get_args(MergedSubLayer))
        if unknown:
            raise ValueError(f"merge_in takes {get_args(MergedSubLayer)}, got {sorted(unknown)}")
        self.target = target
        self.ratio = ratio
        self.max_downsample = max_downsample
        if use_rand and generator is None:
            generator = torch.Generator().set_state(torch.get_rng_state())
        self.generator = generator if use_rand else None
        self.blocks: list[ToMeBlock] = []
        self.sub_layers: list[TokenMerging | TokenUnmerging] = []
        for layer in _transformer_layers(target, max_downsample):
            self.blocks.append(ToMeBlock(layer, TokenMatcher(ratio, stride_x, stride_y, self.generator)))
            for name in merge_in:
                sub_layer = layer.layer(_SUB_LAYERS[name], fl.Residual)
                self.sub_layers.append(TokenMerging(sub_layer.layer("LayerNorm", fl.LayerNorm)))
                self.sub_layers.append(TokenUnmerging(sub_layer.layer(-1, fl.Module)))
        self._injected = False

    def inject(self) -> Self:
        """Match tokens before each transformer layer of the chosen levels, merge and unmerge around the chosen
        sub-layers."""
        if self._injected:
            raise ValueError("this ToMeAdapter is already injected; eject it first")
        for adapter in [*self.blocks, *self.sub_layers]:
            adapter.inject()
        self._injected = True
        return self

    def eject(self) -> None:
        """Take the merging out: the UNet is as it was before `inject`."""
        if not self._injected:
            raise ValueError("this ToMeAdapter is not injected: nothing to eject")
        for adapter in [*self.sub_layers, *self.blocks]:
            adapter.eject()
        self._injected = False


def _transformer_layers(unet: UNet, max_downsample: int) -> list[CrossAttentionBlock]:
    """The transformer layers of the levels downsampled at most `max_downsample` times, down, middle, then up."""
    levels = len(unet.topology.channels)
    per_level = unet.topology.layers_per_block + 1
    down = list(unet.layer("DownBlocks", DownBlocks).layers(fl.Chain))[1:]  # after the input convolution
    up = list(unet.layer("UpBlocks", UpBlocks).layers(fl.Chain))
    leveled: list[tuple[int, fl.Chain]] = [
        *((index // per_level, block) for index, block in enumerate(down)),
        (levels - 1, unet.ensure_find(MiddleBlock)),
        *((levels - 1 - index // per_level, block) for index, block in enumerate(up)),
    ]
    return [
        layer for level, block in leveled if 2**level <= max_downsample for layer in block.layers(CrossAttentionBlock)
    ]
