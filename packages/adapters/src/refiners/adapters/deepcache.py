"""DeepCache (Ma et al., 2023, https://arxiv.org/abs/2312.00858): reuse the UNet's deep features between steps.

From one denoising step to the next, the UNet's deep features (the lower resolutions) barely change. Every
`cache_interval`-th step runs the whole UNet and keeps the output of its deep branch; the steps in between run only
the shallow branch (the first down layers and the last up layers) on the kept feature, as the `deepcache` package's
`DeepCacheSDHelper` does with its "uniform" schedule:

    step i of the run, counted from 0:   full pass when i % cache_interval == 0, shallow pass otherwise

`cache_branch_id` picks where the branch splits, as the helper numbers it: `block = id // 3`, `layer = id % 3`
(SD1 and SDXL have `layers_per_block = 2`: three layers per up level, the third down layer being the downsampler).
The shallow branch is the down layers before layer `layer` of level `block` (the input convolution first) and the up
layers of level `block` from the mirror of that layer on; its first up layer concatenates the kept feature (the
output of the up layer before it, or of the middle block) with its skip connection, which the shallow down layers
computed anew.

Here this is an adapter on each deep layer of the UNet (`DeepCacheFeature` on the last one, which keeps its output,
`DeepCacheSkip` on the others); they read the step from `DENOISING_CONTEXT`, which `LatentDiffusionModel` sets.
"""

from typing import Any, Self

from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts
from refiners.foundationals.latent_diffusion.model import DENOISING_CONTEXT, STEP_INDEX_KEY
from refiners.foundationals.latent_diffusion.unet import DownBlocks, MiddleBlock, UNet, UpBlocks

__all__ = ["DeepCacheAdapter", "DeepCacheLayer", "DeepCacheSkip", "DeepCacheFeature"]


class DeepCacheLayer(fl.Chain, fl.Adapter[fl.Chain]):
    """A deep layer of the UNet, run on the full steps only (every `cache_interval`-th step of the run).

    Args:
        target: The layer (a child of `DownBlocks` or `UpBlocks`, or the `MiddleBlock`).
        cache_interval: The number of steps between two full passes.
    """

    def __init__(self, target: fl.Chain, cache_interval: int) -> None:
        self.cache_interval = cache_interval
        with self.setup_adapter(target):
            super().__init__(target)

    def init_context(self) -> Contexts:
        return {DENOISING_CONTEXT: {STEP_INDEX_KEY: None}}

    def is_full_step(self) -> bool:
        """Whether this forward's step runs the whole UNet."""
        step: int | None = self.use_context(DENOISING_CONTEXT).get(STEP_INDEX_KEY)
        if step is None:
            raise ValueError(
                "DeepCache needs the step of the run: call the UNet through a LatentDiffusionModel, or set "
                f"`unet.set_context({DENOISING_CONTEXT!r}, {{{STEP_INDEX_KEY!r}: step}})` before each forward"
            )
        return step % self.cache_interval == 0


class DeepCacheSkip(DeepCacheLayer):
    """A deep layer that the shallow steps skip: its input passes unchanged (what follows it is skipped too, up to the
    `DeepCacheFeature`, which replaces it by the kept feature)."""

    def forward(self, *args: Any) -> Any:
        if self.is_full_step():
            return super().forward(*args)
        return args[0] if len(args) == 1 else args


class DeepCacheFeature(DeepCacheLayer):
    """The last deep layer: on full steps its output is kept (`feature`), on the others it is returned instead."""

    def __init__(self, target: fl.Chain, cache_interval: int) -> None:
        super().__init__(target, cache_interval)
        self.feature: Tensor | None = None

    def forward(self, *args: Any) -> Any:
        if self.is_full_step():
            feature: Tensor = super().forward(*args)
            self.feature = feature
            return feature
        if self.feature is None or self.feature.shape[0] != args[0].shape[0]:
            raise ValueError(
                "DeepCache has no deep feature of this batch to reuse: the first step of a run (step 0) must be a "
                "full pass"
            )
        return self.feature


class DeepCacheAdapter:
    """DeepCache on a Stable Diffusion UNet (SD1, SDXL): `inject` caches its deep branch, `eject` undoes it.

    Equal to `DeepCacheSDHelper.set_params(cache_interval, cache_branch_id)` (skip mode "uniform") on diffusers'
    UNet. The step is the one `LatentDiffusionModel` gives the UNet: its position in the run, 0 first.

    Example:
        ```py
        from refiners.adapters.deepcache import DeepCacheAdapter
        from refiners.foundationals.latent_diffusion import SD1UNet
        from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY

        unet = TINY.unet.build((SD1UNet,))
        deepcache = DeepCacheAdapter(target=unet, cache_interval=3, cache_branch_id=0).inject()
        assert len(deepcache.layers) == 23  # 11 down layers, the middle block, 11 up layers
        deepcache.eject()
        ```

    Args:
        target: The UNet.
        cache_interval: The number of steps between two full passes (1: every step is a full one).
        cache_branch_id: Where the shallow branch ends, as `DeepCacheSDHelper` numbers it: `3 * level + layer`.
            0, the default and the fastest, leaves the input convolution and the last up layer.
    """

    def __init__(self, target: UNet, cache_interval: int = 3, cache_branch_id: int = 0) -> None:
        levels = len(target.topology.channels)
        per_level = target.topology.layers_per_block + 1
        if cache_interval < 1:
            raise ValueError(
                f"cache_interval must be at least 1 (a full pass every that many steps), got {cache_interval}"
            )
        if not 0 <= cache_branch_id < levels * per_level:
            raise ValueError(
                f"cache_branch_id must be in [0, {levels * per_level}) for this UNet ({levels} levels of {per_level} "
                f"layers), got {cache_branch_id}"
            )
        self.target = target
        self.cache_interval = cache_interval
        self.cache_branch_id = cache_branch_id
        level, layer = divmod(cache_branch_id, per_level)
        down = list(target.layer("DownBlocks", DownBlocks).layers(fl.Chain))
        up = list(target.layer("UpBlocks", UpBlocks).layers(fl.Chain))
        # DownBlocks starts with the input convolution; UpBlocks starts at the lowest level, each in reverse order.
        first_deep_down = 1 + level * per_level + layer
        first_shallow_up = (levels - 1 - level) * per_level + (per_level - 1 - layer)
        deep = [*down[first_deep_down:], target.layer("MiddleBlock", MiddleBlock), *up[:first_shallow_up]]
        self.layers: list[DeepCacheLayer] = [DeepCacheSkip(chain, cache_interval) for chain in deep[:-1]]
        self.feature = DeepCacheFeature(deep[-1], cache_interval)
        self.layers.append(self.feature)
        self._injected = False

    def inject(self) -> Self:
        """Wrap the deep layers: from now on, only every `cache_interval`-th step runs them."""
        if self._injected:
            raise ValueError("this DeepCacheAdapter is already injected; eject it first")
        for layer in self.layers:
            layer.inject()
        self._injected = True
        return self

    def eject(self) -> None:
        """Unwrap the deep layers and drop the kept feature: the UNet is as it was before `inject`."""
        if not self._injected:
            raise ValueError("this DeepCacheAdapter is not injected: nothing to eject")
        for layer in self.layers:
            layer.eject()
        self.feature.feature = None
        self._injected = False
