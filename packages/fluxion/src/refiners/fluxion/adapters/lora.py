"""LoRA: low-rank updates of Linear and Conv2d weights, injected and ejected with the Adapter API.

A LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) adds `scale * alpha / rank * up(down(x))` to the output of
a target layer `W`, i.e. it runs the target with the weight `W + scale * alpha / rank * up @ down`. `down` projects to
`rank` features, `up` projects back; `up` starts at zero so that a fresh LoRA changes nothing.

Example:
    ```py
    import torch
    import refiners.fluxion.layers as fl
    from refiners.fluxion.adapters.lora import SingleLoraAdapter, lora_parameters

    model = fl.Chain(fl.Linear(8, 8), fl.ReLU(), fl.Linear(8, 4))
    x = torch.randn(2, 8)
    before = model(x)
    for linear, parent in model.walk(fl.Linear):
        SingleLoraAdapter(target=linear, rank=2).inject(parent)
    assert torch.equal(model(x), before)  # `up` starts at zero
    assert len(lora_parameters(model)) == 4  # what an optimizer trains: down and up of both LoRAs
    ```
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any, Generic, Self, TypeVar, cast

import torch
from torch import Tensor

from refiners.fluxion.adapters.adapter import Adapter

# Submodules rather than `import refiners.fluxion.layers as fl`: `refiners.fluxion.layers` imports this package
# (for `fl.Adapter`), so its names may not exist yet while this module loads.
from refiners.fluxion.layers.chain import Chain
from refiners.fluxion.layers.combinators import Sum
from refiners.fluxion.layers.conv import Conv2d, PaddingMode
from refiners.fluxion.layers.linear import Linear
from refiners.fluxion.layers.module import Module, WeightedModule

__all__ = [
    "Lora",
    "LinearLora",
    "Conv2dLora",
    "LoraScaling",
    "LoraAdapter",
    "SingleLoraAdapter",
    "add_loras_to",
    "enable_lora_hotswap",
    "lora_parameters",
    "unfused_weight",
]

T = TypeVar("T", bound=WeightedModule)


class LoraScaling(Module):
    """Multiply by a LoRA's factor `scale * alpha / rank` (kept up to date by the `Lora` that holds it).

    The factor is a Python float, which `torch.compile` bakes into the graph: a compiled model recompiles when it
    changes. `hold_as_tensor` makes it a 0-dim float32 buffer, changed in place (see `enable_lora_hotswap`).

    Args:
        factor: The multiplier.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor: float | Tensor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def set_factor(self, factor: float) -> None:
        """Set the multiplier (in place when it is held as a tensor)."""
        if isinstance(self.factor, Tensor):
            with torch.no_grad():
                self.factor.fill_(factor)
        else:
            self.factor = factor

    def hold_as_tensor(self, device: torch.device | str | None = None) -> None:
        """Keep the factor in a 0-dim float32 buffer (not saved in state dicts), changed in place from now on.

        Args:
            device: Where the buffer lives (the LoRA's weights' device); it follows the model's moves.
        """
        if isinstance(self.factor, Tensor):
            return
        factor = torch.tensor(self.factor, dtype=torch.float32, device=device)
        del self.factor
        self.register_buffer("factor", factor, persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        factor = self.factor
        super()._apply(fn, recurse)
        if isinstance(factor, Tensor):
            # Moved, never cast: a 0-dim float32 factor multiplies a float16 or bfloat16 input at full precision, as
            # a Python float does, whereas cast along with the model it would be rounded to the model's dtype.
            self._buffers["factor"] = factor.to(device=self._buffers["factor"].device)
        return self


class Lora(Generic[T], Chain, ABC):
    """A named update of a target layer's weight; the classic kind is `down`, then `up`, then `scale * alpha / rank`.

    Use `LinearLora` or `Conv2dLora`; build one for a layer with `Lora.from_target`, or from trained tensors with
    `Lora.from_weights`. `down` is initialised like PEFT's `lora_A` (Kaiming-uniform, `a=sqrt(5)`) and `up` is zero.

    Other kinds (LoCon, LoHa, LoKr, DoRA: `refiners.adapters.lora`) subclass `Lora` with their own children: they
    override `delta_weight` (the update of the target's weight, which `LoraAdapter.fuse` adds to it),
    `reset_parameters` and `_describe_weights`; a kind without a `down`/`up` pair overrides those two properties to
    say so. Every `LoraScaling` child is kept at `factor`.

    Args:
        name: The LoRA's name, unique among the LoRAs of a `LoraAdapter` (e.g. `"default"`, `"pokemon"`).
        *layers: The LoRA's children, run in order (for the classic kind: `down`, `up` and a `LoraScaling`).
        rank: The inner size of the update (for the classic kind: the number of outputs of `down`).
        alpha: With the rank, sets the factor `alpha / rank` (PEFT's `lora_alpha`); defaults to the rank (factor 1).
        scale: How much of the update to apply; change it with `scale = ...` or `LoraAdapter.set_scale`.
    """

    def __init__(self, name: str, *layers: Module, rank: int, alpha: float | None = None, scale: float = 1.0) -> None:
        _check_rank(name, rank)
        self.name = name
        self._rank = rank
        self._alpha = float(rank if alpha is None else alpha)
        self._scale = float(scale)
        # Set by `LoraAdapter.fuse`: the update is already in the target's weight, so the adapter skips this LoRA.
        self._fused = False
        super().__init__(*layers)
        self._sync_scaling()
        self.reset_parameters()

    @property
    def down(self) -> T:
        """The projection to `rank` features (PEFT's `lora_A`)."""
        return cast(T, self[0])

    @property
    def up(self) -> T:
        """The projection back to the target's output features (PEFT's `lora_B`)."""
        return cast(T, self[1])

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = float(value)
        self._sync_scaling()
        self._refuse()

    def _refuse(self) -> None:
        """Write the target's fused weight again if this LoRA is fused (its update changed)."""
        if self._fused:
            adapter = self.parent
            assert isinstance(adapter, LoraAdapter), "a fused LoRA is inside the adapter that fused it"
            _write_fused_weight(adapter.target)

    @property
    def factor(self) -> float:
        """The multiplier of `up(down(x))`: `scale * alpha / rank`."""
        return self._scale * self._alpha / self._rank

    @property
    def is_fused(self) -> bool:
        """Whether this LoRA is folded into its target's weight (see `LoraAdapter.fuse`)."""
        return self._fused

    def _sync_scaling(self) -> None:
        for layer in self:
            if isinstance(layer, LoraScaling):
                layer.set_factor(self.factor)

    def reset_parameters(self) -> None:
        """Initialise like PEFT: Kaiming-uniform `down`, zero `up` (so that the LoRA starts as a no-op)."""
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.up.weight)

    def delta_weight(self, target_weight: Tensor | None = None) -> Tensor:
        """The update of the target's weight, `factor * up @ down`, in float32 and with the target weight's shape.

        Args:
            target_weight: The target's weight without any LoRA fused into it. The classic kind ignores it; a kind
                whose update depends on the weight (DoRA) computes from it.
        """
        down = self.down.weight.detach().float()
        up = self.up.weight.detach().float()
        # `up` is a 1x1 convolution for Conv2d: flattened, both cases are one matrix product.
        return self.factor * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    def is_compatible(self, layer: Module) -> bool:
        """Whether this LoRA can update the weight of `layer`."""
        return self._incompatibility(layer) is None

    def check_compatible(self, layer: Module) -> None:
        """Raise a ValueError that names both shapes if this LoRA cannot update the weight of `layer`."""
        if (reason := self._incompatibility(layer)) is not None:
            weight = tuple(layer.weight.shape) if isinstance(layer, WeightedModule) else "no weight"
            raise ValueError(
                f"{type(self).__name__} {self.name!r} ({self._describe_weights()}) does not fit {type(layer).__name__} at "
                f"{layer.get_path()} (weight {weight}): {reason}. Build the LoRA for this layer with "
                f"`Lora.from_target(name, layer, rank=...)`, or check which layer these weights belong to."
            )

    def _describe_weights(self) -> str:
        """The shapes of this LoRA's weights, for error messages."""
        return f"down {tuple(self.down.weight.shape)}, up {tuple(self.up.weight.shape)}"

    @abstractmethod
    def _incompatibility(self, layer: Module) -> str | None:
        """Why this LoRA cannot update `layer`, or None if it can."""

    def _follow(self, target: T) -> None:
        """Take from the target what the weights do not carry (a convolution's stride, padding...)."""

    @classmethod
    def from_target(
        cls,
        name: str,
        target: WeightedModule,
        rank: int = 16,
        alpha: float | None = None,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """A fresh LoRA that fits `target`: a `LinearLora` for a Linear, a `Conv2dLora` for a Conv2d.

        Args:
            name: The LoRA's name.
            target: The layer whose weight it updates.
            rank: The inner size of the update.
            alpha: See `Lora`; defaults to `rank`.
            scale: See `Lora`.
            device: Where the LoRA's weights live; defaults to the target's device.
            dtype: The LoRA's dtype; defaults to the target's dtype.
        """
        device = target.device if device is None else device
        dtype = target.dtype if dtype is None else dtype
        lora: Lora[Any]
        match target:
            case Linear():
                lora = LinearLora(
                    name, target.in_features, target.out_features, rank, scale, alpha=alpha, device=device, dtype=dtype
                )
            case Conv2d():
                if target.groups != 1:
                    raise ValueError(
                        f"cannot build a LoRA for {target.get_path()}: it is a grouped convolution "
                        f"(groups={target.groups}), and Conv2dLora only updates convolutions with groups=1"
                    )
                kernel_height, kernel_width = target.kernel_size
                lora = Conv2dLora(
                    name,
                    target.in_channels,
                    target.out_channels,
                    rank,
                    scale,
                    alpha=alpha,
                    kernel_size=(kernel_height, kernel_width),
                    device=device,
                    dtype=dtype,
                )
                lora._follow(target)
            case _:
                raise TypeError(
                    f"cannot build a LoRA for {target.get_path()}: it is a {type(target).__name__}, and LoRAs update "
                    f"Linear and Conv2d layers only"
                )
        if not isinstance(lora, cls):
            raise TypeError(
                f"{cls.__name__} cannot update {target.get_path()}, a {type(target).__name__}: use "
                f"{type(lora).__name__}.from_target (or Lora.from_target, which picks the right kind)"
            )
        return lora

    @classmethod
    def from_weights(cls, name: str, down: Tensor, up: Tensor, alpha: float | None = None, scale: float = 1.0) -> Self:
        """A LoRA holding trained `down` and `up` weights (PEFT's `lora_A` and `lora_B`), on their device and dtype.

        Matrices make a `LinearLora`; 4D kernels (with a 1x1 `up`) make a `Conv2dLora`, whose stride, padding and
        dilation are taken from its target when it joins a `LoraAdapter`.

        Args:
            name: The LoRA's name.
            down: `(rank, in_features)` or `(rank, in_channels, kernel_height, kernel_width)`.
            up: `(out_features, rank)` or `(out_channels, rank, 1, 1)`.
            alpha: See `Lora`; defaults to the rank (what most LoRA files assume when they store no alpha).
            scale: See `Lora`.
        """
        shapes = f"down {tuple(down.shape)} and up {tuple(up.shape)}"
        if down.dim() != up.dim() or down.dim() not in (2, 4):
            raise ValueError(
                f"LoRA {name!r}: {shapes} must both be matrices (Linear) or both 4D kernels (Conv2d). Pass the "
                f"`down` (lora_A) and `up` (lora_B) weights of the same layer."
            )
        if down.shape[0] != up.shape[1]:
            raise ValueError(
                f"LoRA {name!r}: {shapes} disagree on the rank (down.shape[0]={down.shape[0]}, "
                f"up.shape[1]={up.shape[1]}). Check that `down` is lora_A and `up` is lora_B of the same layer."
            )
        rank = down.shape[0]
        lora: Lora[Any]
        if down.dim() == 2:
            lora = LinearLora(
                name, down.shape[1], up.shape[0], rank, scale, alpha=alpha, device=down.device, dtype=down.dtype
            )
        else:
            if tuple(up.shape[2:]) != (1, 1):
                raise ValueError(f"LoRA {name!r}: {shapes}: a Conv2d LoRA's `up` must be a 1x1 kernel")
            lora = Conv2dLora(
                name,
                down.shape[1],
                up.shape[0],
                rank,
                scale,
                alpha=alpha,
                kernel_size=(down.shape[2], down.shape[3]),
                device=down.device,
                dtype=down.dtype,
            )
        if not isinstance(lora, cls):
            raise TypeError(f"{cls.__name__}.from_weights got weights of a {type(lora).__name__}: {shapes}")
        with torch.no_grad():
            lora.down.weight.copy_(down)
            lora.up.weight.copy_(up)
        return lora


class LinearLora(Lora[Linear]):
    """A LoRA for a Linear: `down` is `Linear(in_features, rank)`, `up` is `Linear(rank, out_features)`, no biases.

    Args:
        name: The LoRA's name.
        in_features: The target's input size.
        out_features: The target's output size.
        rank: The inner size of the update.
        scale: See `Lora` (the fifth positional argument, as in the original Refiners).
        device: Where the weights live.
        dtype: The weights' dtype.
        alpha: See `Lora`; defaults to `rank` (keyword only: the original Refiners has no alpha).
    """

    def __init__(
        self,
        name: str,
        in_features: int,
        out_features: int,
        rank: int = 16,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        alpha: float | None = None,
    ) -> None:
        _check_rank(name, rank)
        super().__init__(
            name,
            Linear(in_features, rank, bias=False, device=device, dtype=dtype),
            Linear(rank, out_features, bias=False, device=device, dtype=dtype),
            LoraScaling(1.0),
            rank=rank,
            alpha=alpha,
            scale=scale,
        )

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    def pad_rank(self, rank: int) -> None:
        """Grow to `rank` with zeros: the same update, from weights that hold a LoRA of any rank up to `rank`.

        The new rows of `down` and columns of `up` are zero and `alpha` is multiplied by `rank / self.rank`, so
        the factor and the update do not change (the padded LoRA saves and fuses as the same update). New weight
        tensors replace the old ones: pad before compiling or building an optimizer.

        Args:
            rank: The new rank, at least the current one.
        """
        _pad_rank(self, rank)
        self.down.out_features = self.up.in_features = rank

    def swap_weights(self, down: Tensor, up: Tensor, alpha: float | None = None) -> None:
        """Load another LoRA's weights into this one's, in place, padded with zeros up to this LoRA's rank.

        The scale is kept; `alpha` becomes the new LoRA's (scaled as `pad_rank` does). Only the weights and the
        `LoraScaling` factor change, in place: a model compiled after `enable_lora_hotswap` does not recompile.

        Args:
            down: `(rank, in_features)`, with a rank up to this LoRA's.
            up: `(out_features, rank)`.
            alpha: The new LoRA's alpha; defaults to its rank.
        """
        _swap_weights(self, down, up, alpha)

    def _incompatibility(self, layer: Module) -> str | None:
        if not isinstance(layer, Linear):
            return f"a LinearLora updates a Linear, not a {type(layer).__name__}"
        if (layer.in_features, layer.out_features) != (self.in_features, self.out_features):
            return (
                f"the LoRA maps {self.in_features} to {self.out_features} features, the layer maps "
                f"{layer.in_features} to {layer.out_features}"
            )
        return None


class Conv2dLora(Lora[Conv2d]):
    """A LoRA for a Conv2d: `down` is a convolution to `rank` channels that slides like the target, `up` is 1x1.

    The stride, padding, dilation and padding mode of `down` are the target's: weights do not carry them, so they
    are taken from the target when the LoRA joins a `LoraAdapter` (a LoRA updates the target's kernel, so it must
    slide exactly like it).

    Args:
        name: The LoRA's name.
        in_channels: The target's input channels.
        out_channels: The target's output channels.
        rank: The inner size of the update.
        scale: See `Lora` (the fifth positional argument, as in the original Refiners).
        alpha: See `Lora`; defaults to `rank`. This and all that follow are keyword only.
        kernel_size: The target's kernel size, which `down` has (`up` is 1x1). Not the original Refiners'
            `kernel_size=(down, up)` pair: a LoRA here updates the target's kernel, so it slides exactly like it.
        stride: The target's stride.
        padding: The target's padding.
        dilation: The target's dilation.
        padding_mode: The target's padding mode.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        name: str,
        in_channels: int,
        out_channels: int,
        rank: int = 16,
        scale: float = 1.0,
        *,
        alpha: float | None = None,
        kernel_size: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        padding_mode: PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_rank(name, rank)
        down = Conv2d(
            in_channels,
            rank,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=padding_mode,
            use_bias=False,
            device=device,
            dtype=dtype,
        )
        up = Conv2d(rank, out_channels, 1, use_bias=False, device=device, dtype=dtype)
        super().__init__(name, down, up, LoraScaling(1.0), rank=rank, alpha=alpha, scale=scale)

    @property
    def in_channels(self) -> int:
        return self.down.in_channels

    @property
    def out_channels(self) -> int:
        return self.up.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.down.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.down.stride

    @property
    def padding(self) -> str | tuple[int, ...]:
        return self.down.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.down.dilation

    @property
    def padding_mode(self) -> PaddingMode:
        return self.down.padding_mode

    def pad_rank(self, rank: int) -> None:
        """Grow to `rank` with zeros: the same update (see `LinearLora.pad_rank`).

        Args:
            rank: The new rank, at least the current one.
        """
        _pad_rank(self, rank)
        self.down.out_channels = self.up.in_channels = rank

    def swap_weights(self, down: Tensor, up: Tensor, alpha: float | None = None) -> None:
        """Load another LoRA's weights into this one's, in place (see `LinearLora.swap_weights`).

        Args:
            down: `(rank, in_channels, kernel_height, kernel_width)`, with a rank up to this LoRA's.
            up: `(out_channels, rank, 1, 1)`.
            alpha: The new LoRA's alpha; defaults to its rank.
        """
        _swap_weights(self, down, up, alpha)

    def _incompatibility(self, layer: Module) -> str | None:
        if not isinstance(layer, Conv2d):
            return f"a Conv2dLora updates a Conv2d, not a {type(layer).__name__}"
        if layer.groups != 1:
            return f"the layer is a grouped convolution (groups={layer.groups}), Conv2dLora needs groups=1"
        ours = (self.in_channels, self.out_channels, self.kernel_size)
        theirs = (layer.in_channels, layer.out_channels, layer.kernel_size)
        if ours != theirs:
            return (
                f"the LoRA maps {ours[0]} to {ours[1]} channels with a {ours[2]} kernel, the layer maps "
                f"{theirs[0]} to {theirs[1]} channels with a {theirs[2]} kernel (a Conv2dLora's `kernel_size` is its "
                f"target's, not the original Refiners' (down, up) pair)"
            )
        return None

    def _follow(self, target: Conv2d) -> None:
        down = self.down
        down.stride = target.stride
        down.padding = target.padding
        down.dilation = target.dilation
        down.padding_mode = target.padding_mode
        # torch derives this from padding and kernel size (equal to the target's) in `__init__`: copy it too.
        down._reversed_padding_repeated_twice = target._reversed_padding_repeated_twice


def _check_rank(name: str, rank: int) -> None:
    if rank < 1:
        raise ValueError(f"LoRA {name!r}: rank must be a positive integer, got {rank}")


def _pad_rank(lora: Lora[Any], rank: int) -> None:
    if rank < lora.rank:
        raise ValueError(f"LoRA {lora.name!r} has rank {lora.rank}: it cannot be padded to the lower rank {rank}")
    down, up = lora.down.weight, lora.up.weight
    with torch.no_grad():
        padded_down = down.new_zeros(rank, *down.shape[1:])
        padded_down[: lora.rank] = down
        padded_up = up.new_zeros(up.shape[0], rank, *up.shape[2:])
        padded_up[:, : lora.rank] = up
    lora.down.weight = torch.nn.Parameter(padded_down, requires_grad=down.requires_grad)
    lora.up.weight = torch.nn.Parameter(padded_up, requires_grad=up.requires_grad)
    lora._alpha = lora._alpha * rank / lora.rank
    lora._rank = rank


def _swap_weights(lora: Lora[Any], down: Tensor, up: Tensor, alpha: float | None) -> None:
    rank = down.shape[0]
    held_down, held_up = lora.down.weight, lora.up.weight
    fits = (
        down.shape[1:] == held_down.shape[1:]
        and up.dim() == held_up.dim()
        and up.shape[0] == held_up.shape[0]
        and up.shape[1] == rank
        and up.shape[2:] == held_up.shape[2:]
    )
    if not fits:
        raise ValueError(
            f"LoRA {lora.name!r} ({lora._describe_weights()}) cannot take down {tuple(down.shape)} and up "
            f"{tuple(up.shape)}: they must update the same layer (equal shapes but for the rank)"
        )
    if rank > lora.rank:
        raise ValueError(
            f"LoRA {lora.name!r} has rank {lora.rank}, the weights swapped in have rank {rank}: pad it first "
            f"(`pad_rank({rank})`, or `enable_lora_hotswap(model, target_rank=...)` before compiling)"
        )
    with torch.no_grad():
        held_down.zero_()
        held_down[:rank].copy_(down)
        held_up.zero_()
        held_up[:, :rank].copy_(up)
    lora._alpha = float(rank if alpha is None else alpha) * lora.rank / rank
    lora._sync_scaling()
    lora._refuse()


class _Fusion:
    """What undoes `fuse` exactly: the target's weight before any LoRA was folded into it, and those LoRAs.

    It lives on the target (not on an adapter) because adapters stacked on one target fuse into the same weight.
    """

    def __init__(self, original: Tensor) -> None:
        self.original = original
        self.loras: list[Lora[Any]] = []


_FUSION_KEY = "_lora_fusion"


def _fusion_of(target: WeightedModule) -> _Fusion | None:
    return target.__dict__.get(_FUSION_KEY)


def _write_fused_weight(target: WeightedModule) -> None:
    """Set the target's weight to its original plus the updates of the LoRAs fused into it, or to the original."""
    fusion = _fusion_of(target)
    assert fusion is not None, "only called on a target with fused LoRAs"
    with torch.no_grad():
        if not fusion.loras:
            # A copy of the original, not a subtraction: in float16/bfloat16 `(W + d) - d` is not `W`.
            target.weight.copy_(fusion.original)
            del target.__dict__[_FUSION_KEY]
            return
        # Every update is computed from the original weight, as an unfused LoRA's forward computes it (see
        # `unfused_weight`): the fused weight does not depend on the order in which LoRAs were fused.
        original = fusion.original.float()
        merged = original + sum(lora.delta_weight(original).to(original.device) for lora in fusion.loras)
        # One rounding to the stored dtype, whatever the number of LoRAs.
        target.weight.copy_(merged)


def unfused_weight(target: WeightedModule) -> Tensor:
    """The weight of `target` without the LoRAs fused into it: what a weight-dependent LoRA (DoRA) updates.

    Args:
        target: A layer that LoRAs may be fused into (see `LoraAdapter.fuse`).
    """
    fusion = _fusion_of(target)
    return target.weight if fusion is None else fusion.original


class LoraAdapter(Sum, Adapter[WeightedModule]):
    """Named LoRAs on one Linear or Conv2d: the output is `target(x) + sum(lora(x) for lora in loras)`.

    Each LoRA has its own scale (`scales`, `set_scale`). LoRAs can be added and removed while injected. `fuse` folds
    LoRAs into the target's weight, so that inference costs no more than the bare target; `unfuse` restores the
    weight bit for bit. Ejecting unfuses this adapter's LoRAs, then restores the tree exactly.

    Args:
        target: The Linear or Conv2d to update.
        *loras: The LoRAs, with distinct names, each fitting the target.

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl
        from refiners.fluxion.adapters.lora import LinearLora, LoraAdapter

        model = fl.Chain(fl.Linear(8, 4))
        linear = model.layer(0, fl.Linear)
        adapter = LoraAdapter(linear, LinearLora("style", 8, 4, rank=2), LinearLora("subject", 8, 4, rank=2)).inject()
        adapter.set_scale("style", 0.5)
        assert adapter.scales == {"style": 0.5, "subject": 1.0}
        subject = adapter.remove_lora("subject")
        assert adapter.names == ["style"] and subject.parent is None
        adapter.eject()
        assert model.layer(0, fl.Linear) is linear
        ```
    """

    def __init__(self, target: WeightedModule, *loras: Lora[Any]) -> None:
        _check_distinct_names([lora.name for lora in loras])
        for lora in loras:
            self._prepare(lora, target)
        with self.setup_adapter(target):
            super().__init__(target, *loras)

    @property
    def loras(self) -> dict[str, Lora[Any]]:
        """This adapter's LoRAs by name, in order."""
        return {layer.name: layer for layer in self if isinstance(layer, Lora)}

    @property
    def names(self) -> list[str]:
        return list(self.loras)

    @property
    def scales(self) -> dict[str, float]:
        """The scale of each LoRA by name (a copy); assign a dict to set some of them: `adapter.scales = {"a": 0.5}`."""
        return {name: lora.scale for name, lora in self.loras.items()}

    @scales.setter
    def scales(self, values: dict[str, float]) -> None:
        for name in values:
            self._lora(name)  # every name is checked before any scale changes
        for name, scale in values.items():
            self.set_scale(name, scale)

    # The original Refiners spells the setter `scale` (`adapter.scale = {"a": 0.5}`): same property.
    scale = scales

    def set_scale(self, name: str, scale: float) -> None:
        """Set the scale of the LoRA `name` (a fused LoRA is re-fused at the new scale)."""
        self._lora(name).scale = scale

    def add_lora(self, lora: Lora[Any]) -> None:
        """Add `lora`, which must fit the target and have a name this adapter does not have yet."""
        _check_distinct_names([*self.names, lora.name])
        self._prepare(lora, self.target)
        with self._holding_target():
            self.append(lora)

    def remove_lora(self, name: str) -> Lora[Any]:
        """Remove the LoRA `name` (unfused first if needed) and return it, out of the tree."""
        lora = self._lora(name)
        self.unfuse(name)
        with self._holding_target():
            self.remove(lora)
        return lora

    def fuse(self, name: str | None = None) -> None:
        """Fold the LoRA `name` (default: all of them) into the target's weight; forwards then skip it.

        The updates are summed in float32 with the original weight and written once in the weight's dtype. The
        original weight is kept (a clone, on its device and in its dtype) until every LoRA fused into this target is
        unfused: fusing costs one extra copy of the target's weight, whatever the number of LoRAs. A fused LoRA
        gets no gradient; unfuse it to train it. A model cast or moved while fused unfuses to its original weight
        cast or moved the same way (the kept copy itself stays where it was made).
        """
        loras = [lora for lora in self._selected(name) if not lora.is_fused]
        if not loras:
            return
        target = self.target
        fusion = _fusion_of(target)
        if fusion is None:
            fusion = _Fusion(original=target.weight.detach().clone())
            object.__setattr__(target, _FUSION_KEY, fusion)
        for lora in loras:
            fusion.loras.append(lora)
            lora._fused = True
        _write_fused_weight(target)

    def unfuse(self, name: str | None = None) -> None:
        """Take the LoRA `name` (default: all of them) out of the target's weight; forwards apply it again.

        Once no LoRA is fused into the target, its weight is the original, bit for bit (in any dtype).
        """
        loras = [lora for lora in self._selected(name) if lora.is_fused]
        if not loras:
            return
        target = self.target
        fusion = _fusion_of(target)
        assert fusion is not None, "fused LoRAs have a fusion record on their target"
        for lora in loras:
            fusion.loras = [fused for fused in fusion.loras if fused is not lora]
            lora._fused = False
        _write_fused_weight(target)

    def eject(self) -> None:
        """Unfuse this adapter's LoRAs and restore the tree as it was before `inject`."""
        super().eject()
        self.unfuse()

    def forward(self, *args: Any) -> Any:
        output: Any = None
        for layer in self:
            if isinstance(layer, Lora) and layer.is_fused:
                continue
            layer_output = self._call_layer(layer, *args)
            output = layer_output if output is None else output + layer_output
        return output

    def _lora(self, name: str) -> Lora[Any]:
        loras = self.loras
        if name not in loras:
            raise LookupError(
                f"{self.get_path()} has no LoRA named {name!r}; its LoRAs are {list(loras)}. Pass one of these names."
            )
        return loras[name]

    def _selected(self, name: str | None) -> list[Lora[Any]]:
        return list(self.loras.values()) if name is None else [self._lora(name)]

    @staticmethod
    def _prepare(lora: Lora[Any], target: WeightedModule) -> None:
        lora.check_compatible(target)
        lora._follow(target)

    @contextmanager
    def _holding_target(self) -> Generator[None]:
        # Before `inject` the target is our child but still belongs to its model: hold it as the Adapter API does
        # while our children change, so that it is not taken from its tree.
        target = self.target
        holds = target in self and target.parent is not self
        object.__setattr__(self, "_foreign_child", target if holds else None)
        try:
            yield
        finally:
            object.__setattr__(self, "_foreign_child", None)


def _check_distinct_names(names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"LoRA names must be distinct within an adapter: {repeated} would appear more than once in {names}. "
            f"Give each LoRA its own name."
        )


class SingleLoraAdapter(LoraAdapter):
    """A `LoraAdapter` with one fresh LoRA fit to its target: a `LinearLora` or a `Conv2dLora`.

    Args:
        target: The Linear or Conv2d to update.
        rank: The inner size of the update.
        alpha: See `Lora`; defaults to `rank`.
        scale: See `Lora`.
        name: The LoRA's name.
        device: Where the LoRA's weights live; defaults to the target's device.
        dtype: The LoRA's dtype; defaults to the target's dtype.

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl
        from refiners.fluxion.adapters.lora import SingleLoraAdapter

        model = fl.Chain(fl.Conv2d(3, 8, 3, padding=1), fl.ReLU(), fl.Chain(fl.Linear(8, 8)))
        for layer in model.layers(fl.Chain):
            for linear, parent in layer.walk(fl.Linear):
                SingleLoraAdapter(target=linear, rank=4).inject(parent)
        adapter = model.layer("Chain.SingleLoraAdapter", SingleLoraAdapter)
        assert adapter.lora.rank == 4 and adapter.names == ["default"]
        ```
    """

    def __init__(
        self,
        target: WeightedModule,
        rank: int = 16,
        alpha: float | None = None,
        scale: float = 1.0,
        name: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        lora = Lora[Any].from_target(name, target, rank=rank, alpha=alpha, scale=scale, device=device, dtype=dtype)
        super().__init__(target, lora)

    @property
    def lora(self) -> Lora[Any]:
        """The adapter's LoRA."""
        loras = list(self.loras.values())
        if len(loras) != 1:
            raise LookupError(f"{self.get_path()} holds {len(loras)} LoRAs ({self.names}); use `loras[name]`")
        return loras[0]


def add_loras_to(
    model: Chain,
    select: type[WeightedModule] | Callable[[Module, Chain], bool],
    rank: int = 16,
    alpha: float | None = None,
    scale: float = 1.0,
    name: str = "default",
) -> list[LoraAdapter]:
    """Add a fresh LoRA named `name` to every Linear or Conv2d of `model` that `select` picks.

    A layer that already has a `LoraAdapter` gets the LoRA in that adapter; any other gets a new `LoraAdapter`,
    injected in its place. The layers inside LoRAs are never selected.

    Args:
        model: The model to patch.
        select: A layer type (e.g. `fl.Linear`), or a function of `(layer, parent)`.
        rank: The inner size of the updates.
        alpha: See `Lora`; defaults to `rank`.
        scale: See `Lora`.
        name: The new LoRAs' name.

    Returns:
        The adapters that received a LoRA, in tree order.
    """
    if isinstance(select, type):
        layer_type = select

        def selects(layer: Module, parent: Chain) -> bool:
            return isinstance(layer, layer_type) and not isinstance(parent, Lora)

    else:
        predicate = select

        def selects(layer: Module, parent: Chain) -> bool:
            return not isinstance(parent, Lora) and predicate(layer, parent)

    adapters: list[LoraAdapter] = []
    for layer, parent in model.walk(selects):
        if not isinstance(layer, Linear | Conv2d):
            raise TypeError(
                f"add_loras_to selected {layer.get_path()}, a {type(layer).__name__}: LoRAs update Linear and Conv2d "
                f"layers only. Make `select` pick only those."
            )
        lora = Lora[Any].from_target(name, layer, rank=rank, alpha=alpha, scale=scale)
        if isinstance(parent, LoraAdapter) and parent.target is layer:
            parent.add_lora(lora)
            adapters.append(parent)
        else:
            adapters.append(LoraAdapter(layer, lora).inject(parent))
    if not adapters:
        raise LookupError(f"add_loras_to found no layer to update in {model.get_path()}: `select` picked none")
    return adapters


def enable_lora_hotswap(model: Chain, target_rank: int | None = None) -> list[Lora[Any]]:
    """Prepare the LoRAs of `model` to be rescaled and swapped under `torch.compile` without recompiling.

    diffusers' `enable_lora_hotswap`: every LoRA's factor is held in a tensor changed in place
    (`LoraScaling.hold_as_tensor`), so that `set_scale` does not recompile; with `target_rank`, every `LinearLora`
    and `Conv2dLora` is padded to that rank (`pad_rank`), so that `swap_weights` loads any LoRA of rank up to it in
    place. Call it once the LoRAs are injected and before compiling; outputs do not change.

    Args:
        model: The model holding the LoRAs (e.g. a UNet).
        target_rank: The highest rank of the LoRAs to swap in; None pads nothing (swaps of equal ranks only).

    Returns:
        The LoRAs of `model`, in tree order.

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl
        from refiners.fluxion.adapters.lora import LinearLora, LoraAdapter, enable_lora_hotswap

        model = fl.Chain(fl.Linear(8, 4))
        adapter = LoraAdapter(model.layer(0, fl.Linear), LinearLora("style", 8, 4, rank=2)).inject()
        (lora,) = enable_lora_hotswap(model, target_rank=8)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        compiled(torch.randn(2, 8))
        with torch.compiler.set_stance("fail_on_recompile"):
            adapter.set_scale("style", 0.5)
            lora.swap_weights(torch.randn(4, 8), torch.randn(4, 4), alpha=2.0)
            compiled(torch.randn(2, 8))
        assert lora.rank == 8 and lora.factor == 0.5 * 2.0 / 4
        ```
    """
    loras: list[Lora[Any]] = list(model.layers(Lora))
    if not loras:
        raise LookupError(f"enable_lora_hotswap found no LoRA in {model.get_path()}: inject the LoRAs first")
    if target_rank is not None:
        unpaddable = [lora.get_path() for lora in loras if not isinstance(lora, LinearLora | Conv2dLora)]
        if unpaddable:
            raise TypeError(
                f"only LinearLora and Conv2dLora can be padded to target_rank={target_rank}, not {unpaddable}. "
                "Pass target_rank=None to make only their scales hot-swappable."
            )
        too_large = [f"{lora.get_path()} (rank {lora.rank})" for lora in loras if lora.rank > target_rank]
        if too_large:
            raise ValueError(f"target_rank={target_rank} is lower than the rank of {too_large}: raise it")
        for lora in loras:
            assert isinstance(lora, LinearLora | Conv2dLora)
            lora.pad_rank(target_rank)
    for lora in loras:
        for scaling in lora.layers(LoraScaling):
            scaling.hold_as_tensor(device=lora.device)
    return loras


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of every `Lora` in `model` (found by type, not by name): what a LoRA training optimises."""
    parameters: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, Lora):
            for parameter in module.parameters():
                parameters.setdefault(id(parameter), parameter)
    return list(parameters.values())
