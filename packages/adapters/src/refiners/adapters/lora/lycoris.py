"""LyCORIS kinds of LoRA as fluxion `Lora`s: LoCon with a Tucker core, LoHa, LoKr, and DoRA over any kind.

Each one plugs into fluxion's `LoraAdapter`: it checks that it fits its target, takes the target's convolution
settings when it joins the adapter, runs like the target with its update as the weight, and gives the update as
`delta_weight` (float32, the target weight's shape) so that `LoraAdapter.fuse` and `unfuse` work unchanged.

The updates, with `factor = scale * alpha / rank` (LyCORIS, https://github.com/KohakuBlueleaf/LyCORIS):

- LoCon (Tucker): a 1x1 `down`, a k x k `mid` between ranks, a 1x1 `up`: `ΔW = factor * up ×₀ mid ×₁ down`.
- LoHa (FedPara, https://arxiv.org/abs/2108.06098): `ΔW = factor * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`; with Tucker
  cores each product is `einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`.
- LoKr (https://arxiv.org/abs/2309.14859): `ΔW = factor * kron(w1, w2)`, each factor full or a low-rank product
  (`w2` with an optional Tucker core `t2`).
- DoRA (https://arxiv.org/abs/2402.09353): `W' = m * (W + s ΔW) / ||W + s ΔW||`, where `s ΔW` is the update of
  another kind at this LoRA's scale: the update is `W' - W`, which depends on the target's weight `W`.

Example:
    ```py
    import torch
    import refiners.fluxion.layers as fl
    from refiners.fluxion.adapters.lora import LoraAdapter
    from refiners.adapters.lora import LoHa

    linear = fl.Linear(8, 4)
    model = fl.Chain(linear)
    x = torch.randn(3, 8)
    before = model(x)
    loha = LoHa.from_target("style", linear, rank=2)
    adapter = LoraAdapter(linear, loha).inject()
    assert torch.equal(model(x), before)  # `w2_b` starts at zero
    torch.nn.init.normal_(loha.product.w2_b)
    unfused = model(x)
    adapter.fuse()  # the target's weight becomes W + delta_weight(): same outputs, no extra cost
    assert torch.allclose(model(x), unfused, atol=1e-5)
    ```
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import Conv2dLora, LinearLora, Lora, LoraAdapter, LoraScaling, unfused_weight

__all__ = [
    "MagnitudeAxis",
    "LoCon",
    "WeightProduct",
    "HadamardProduct",
    "LoHa",
    "KroneckerProduct",
    "LoKr",
    "WeightDecomposition",
    "Dora",
    "lokr_factorization",
    "weight_update",
]

MagnitudeAxis = Literal["output", "input"]
"""Along which axis DoRA normalises the merged weight: one norm per output row (PEFT's `lora_magnitude_vector`,
LyCORIS's default `wd_on_out=True`, `dora_scale` shaped `(out, 1, ...)`) or one per input column (LyCORIS's
`wd_on_out=False`, `dora_scale` shaped `(1, in, ...)`, as ComfyUI tells them apart)."""


@dataclass(frozen=True)
class _TargetOp:
    """How the target applies a weight: `F.linear`, or `F.conv2d` with the target's settings (as torch's Conv2d)."""

    convolution: bool
    stride: tuple[int, ...] = (1, 1)
    padding: str | tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    padding_mode: str = "zeros"
    reversed_padding: tuple[int, ...] = (0, 0, 0, 0)

    @staticmethod
    def of(target: fl.WeightedModule) -> "_TargetOp":
        if isinstance(target, fl.Conv2d):
            return _TargetOp(
                convolution=True,
                stride=target.stride,
                padding=target.padding,
                dilation=target.dilation,
                padding_mode=target.padding_mode,
                reversed_padding=tuple(target._reversed_padding_repeated_twice),
            )
        return _TargetOp(convolution=False)

    @staticmethod
    def for_shape(weight_shape: Sequence[int]) -> "_TargetOp":
        """Before the LoRA joins its target: a Linear for a matrix, an unpadded stride-1 convolution for a kernel."""
        return _TargetOp(convolution=len(weight_shape) == 4)

    def __call__(self, x: Tensor, weight: Tensor) -> Tensor:
        if not self.convolution:
            return F.linear(x, weight)
        if self.padding_mode != "zeros":
            padded = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            return F.conv2d(padded, weight, None, self.stride, 0, self.dilation)
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)  # pyright: ignore[reportArgumentType]


def _check_target(kind: str, layer: fl.Module, weight_shape: tuple[int, ...]) -> str | None:
    if not isinstance(layer, fl.Linear | fl.Conv2d):
        return f"a {kind} updates a Linear or a Conv2d, not a {type(layer).__name__}"
    if isinstance(layer, fl.Conv2d) and layer.groups != 1:
        return f"the layer is a grouped convolution (groups={layer.groups}), a {kind} needs groups=1"
    if tuple(layer.weight.shape) != weight_shape:
        return f"the {kind} updates a weight of shape {weight_shape}, the layer's is {tuple(layer.weight.shape)}"
    return None


def _no_pair(lora: Lora[Any], what: str) -> TypeError:
    return TypeError(
        f"{type(lora).__name__} {lora.name!r} has no `{what}`: it is not a down/up pair ({lora._describe_weights()}). "
        f"Use `delta_weight()` for its update."
    )


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


# -- LoCon -----------------------------------------------------------------------------------------------------


class LoCon(Lora[fl.Conv2d]):
    """LyCORIS's LoCon with a Tucker core (`lora_mid`): a 1x1 `down`, a `mid` that slides like the target, a 1x1 `up`.

    Its update is `factor * einsum("o a, a b k l, b i -> o i k l", up, mid, down)`: the kernel of the three
    convolutions in a row. A plain convolution LoRA (a k x k `down`, a 1x1 `up`) is fluxion's `Conv2dLora`.

    Args:
        name: The LoRA's name.
        in_channels: The target's input channels.
        out_channels: The target's output channels.
        rank: The channels between `down`, `mid` and `up`.
        kernel_size: The target's kernel size (that of `mid`).
        alpha: See `Lora`; defaults to `rank`.
        scale: See `Lora`.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        name: str,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int | tuple[int, int],
        alpha: float | None = None,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        down = fl.Conv2d(in_channels, rank, 1, use_bias=False, device=device, dtype=dtype)
        mid = fl.Conv2d(rank, rank, kernel_size, use_bias=False, device=device, dtype=dtype)
        up = fl.Conv2d(rank, out_channels, 1, use_bias=False, device=device, dtype=dtype)
        super().__init__(name, down, mid, up, LoraScaling(1.0), rank=rank, alpha=alpha, scale=scale)

    @property
    def mid(self) -> fl.Conv2d:
        """The Tucker core: a convolution between ranks that slides like the target (LyCORIS's `lora_mid`)."""
        return self.layer(1, fl.Conv2d)

    @property
    def up(self) -> fl.Conv2d:
        return self.layer(2, fl.Conv2d)

    @property
    def in_channels(self) -> int:
        return self.down.in_channels

    @property
    def out_channels(self) -> int:
        return self.up.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.mid.kernel_size

    def reset_parameters(self) -> None:
        """Initialise like LyCORIS: Kaiming-uniform `down` and `mid`, zero `up`."""
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(self.mid.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.up.weight)

    def weight_update(self) -> Tensor:
        """`factor * up ×₀ mid ×₁ down`, with gradients, in the weights' dtype."""
        up, down = self.up.weight.flatten(1), self.down.weight.flatten(1)
        return self.factor * torch.einsum("o a, a b k l, b i -> o i k l", up, self.mid.weight, down)

    def delta_weight(self, target_weight: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return self.weight_update().float()

    def _describe_weights(self) -> str:
        shapes = (_shape(self.down.weight), _shape(self.mid.weight), _shape(self.up.weight))
        return "down {}, mid {}, up {}".format(*shapes)

    def _incompatibility(self, layer: fl.Module) -> str | None:
        if not isinstance(layer, fl.Conv2d):
            return f"a LoCon updates a Conv2d, not a {type(layer).__name__}"
        return _check_target("LoCon", layer, (self.out_channels, self.in_channels, *self.kernel_size))

    def _follow(self, target: fl.Conv2d) -> None:
        mid = self.mid
        mid.stride = target.stride
        mid.padding = target.padding
        mid.dilation = target.dilation
        mid.padding_mode = target.padding_mode
        mid._reversed_padding_repeated_twice = target._reversed_padding_repeated_twice

    @classmethod
    def from_target(
        cls,
        name: str,
        target: fl.WeightedModule,
        rank: int = 16,
        alpha: float | None = None,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """A fresh LoCon for a Conv2d (see `Lora.from_target`)."""
        if not isinstance(target, fl.Conv2d) or target.groups != 1:
            raise TypeError(f"a LoCon updates a Conv2d with groups=1: {target.get_path()} is not one")
        kernel_height, kernel_width = target.kernel_size
        lora = cls(
            name,
            target.in_channels,
            target.out_channels,
            rank,
            (kernel_height, kernel_width),
            alpha,
            scale,
            device=target.device if device is None else device,
            dtype=target.dtype if dtype is None else dtype,
        )
        lora._follow(target)
        return lora

    @classmethod
    def from_factors(
        cls, name: str, down: Tensor, mid: Tensor, up: Tensor, alpha: float | None = None, scale: float = 1.0
    ) -> Self:
        """A LoCon holding trained weights (LyCORIS's `lora_down`, `lora_mid`, `lora_up`), on their device and dtype.

        Args:
            name: The LoRA's name.
            down: `(rank, in_channels, 1, 1)`.
            mid: `(rank, rank, kernel_height, kernel_width)`.
            up: `(out_channels, rank, 1, 1)`.
            alpha: See `Lora`; defaults to the rank.
            scale: See `Lora`.
        """
        shapes = f"down {_shape(down)}, mid {_shape(mid)}, up {_shape(up)}"
        rank = mid.shape[0] if mid.dim() == 4 else -1
        if (
            down.dim() != 4
            or up.dim() != 4
            or mid.dim() != 4
            or _shape(down)[::2] != (rank, 1)
            or _shape(up)[1:] != (rank, 1, 1)
            or mid.shape[1] != rank
            or down.shape[3] != 1
        ):
            raise ValueError(
                f"LoCon {name!r}: {shapes} do not make a Tucker LoCon: expected down (rank, in, 1, 1), "
                f"mid (rank, rank, k, k) and up (out, rank, 1, 1)"
            )
        kernel_height, kernel_width = mid.shape[2], mid.shape[3]
        lora = cls(
            name,
            down.shape[1],
            up.shape[0],
            rank,
            (kernel_height, kernel_width),
            alpha,
            scale,
            device=down.device,
            dtype=down.dtype,
        )
        with torch.no_grad():
            lora.down.weight.copy_(down)
            lora.mid.weight.copy_(mid)
            lora.up.weight.copy_(up)
        return lora


# -- LoHa and LoKr: updates made whole, then applied like the target ------------------------------------------------


class WeightProduct(fl.Module):
    """Factors whose product is a whole weight update (LoHa's, LoKr's), applied to the input like the target.

    Subclasses set `weight_shape` and `op`, and define `factors` and `update`.
    """

    weight_shape: tuple[int, ...]
    op: "_TargetOp"

    def factors(self) -> dict[str, Tensor]:
        """The weights, by LyCORIS name without the format's prefix."""
        raise NotImplementedError

    def update(self) -> Tensor:
        """The unscaled update, with the target weight's shape."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x, self.update())


class _ProductLora(Lora[fl.WeightedModule]):
    """A LoRA whose update is a `WeightProduct` (LoHa, LoKr): it has no `down`/`up` pair to run `up(down(x))`."""

    kind: ClassVar[str]

    @property
    def product(self) -> WeightProduct:
        return self.layer(0, WeightProduct)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.product.weight_shape

    @property
    def down(self) -> fl.WeightedModule:
        raise _no_pair(self, "down")

    @property
    def up(self) -> fl.WeightedModule:
        raise _no_pair(self, "up")

    def weight_update(self) -> Tensor:
        """`factor` times the product's update, with gradients, in the weights' dtype."""
        return self.factor * self.product.update()

    def delta_weight(self, target_weight: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return self.weight_update().float()

    def _describe_weights(self) -> str:
        return ", ".join(f"{name} {_shape(factor)}" for name, factor in self.product.factors().items())

    def _incompatibility(self, layer: fl.Module) -> str | None:
        return _check_target(self.kind, layer, self.weight_shape)

    def _follow(self, target: fl.WeightedModule) -> None:
        self.product.op = _TargetOp.of(target)


class HadamardProduct(WeightProduct):
    """LoHa's factors and its unscaled update `(w1_a @ w1_b) ⊙ (w2_a @ w2_b)`, applied to the input like the target.

    Without Tucker cores, `w1_a`, `w2_a` are `(out, rank)` and `w1_b`, `w2_b` are `(rank, in * k * k)` (a kernel is
    flattened). With them (LyCORIS's `use_tucker` for k x k convolutions), `w*_a` are `(rank, out)`, `w*_b`
    `(rank, in)` and `t1`, `t2` are `(rank, rank, k, k)`.

    Args:
        weight_shape: The target's weight shape: `(out, in)` or `(out, in, k, k)`.
        rank: The rank of each of the two products.
        tucker: Whether the products have Tucker cores (needs a kernel).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    t1: torch.nn.Parameter | None
    t2: torch.nn.Parameter | None

    def __init__(
        self,
        weight_shape: Sequence[int],
        rank: int,
        tucker: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.rank = rank
        self.tucker = tucker
        out_features, in_features, *kernel = self.weight_shape
        if tucker and not kernel:
            raise ValueError(f"LoHa: Tucker cores need a convolution kernel, the weight is {self.weight_shape}")

        def parameter(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))

        if tucker:
            self.w1_a, self.w1_b = parameter(rank, out_features), parameter(rank, in_features)
            self.w2_a, self.w2_b = parameter(rank, out_features), parameter(rank, in_features)
            self.t1, self.t2 = parameter(rank, rank, *kernel), parameter(rank, rank, *kernel)
        else:
            flat_in = in_features * math.prod(kernel)
            self.w1_a, self.w1_b = parameter(out_features, rank), parameter(rank, flat_in)
            self.w2_a, self.w2_b = parameter(out_features, rank), parameter(rank, flat_in)
            self.t1 = self.t2 = None
        self.op = _TargetOp.for_shape(self.weight_shape)

    def factors(self) -> dict[str, Tensor]:
        """The weights by LyCORIS name without the `hada_` prefix: `w1_a`, `w1_b`, `w2_a`, `w2_b` (`t1`, `t2`)."""
        factors: dict[str, Tensor] = {"w1_a": self.w1_a, "w1_b": self.w1_b, "w2_a": self.w2_a, "w2_b": self.w2_b}
        if self.t1 is not None and self.t2 is not None:
            factors |= {"t1": self.t1, "t2": self.t2}
        return factors

    def update(self) -> Tensor:
        """`(w1_a @ w1_b) ⊙ (w2_a @ w2_b)`, or its Tucker form, with the target weight's shape."""
        if self.t1 is not None and self.t2 is not None:
            first = torch.einsum("i j k l, j r, i p -> p r k l", self.t1, self.w1_b, self.w1_a)
            second = torch.einsum("i j k l, j r, i p -> p r k l", self.t2, self.w2_b, self.w2_a)
            return (first * second).reshape(self.weight_shape)
        return ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)).reshape(self.weight_shape)

    def basic_attributes(self) -> dict[str, Any]:
        return {"weight_shape": self.weight_shape, "rank": self.rank} | ({"tucker": True} if self.tucker else {})


class LoHa(_ProductLora):
    """A LoHa: the Hadamard product of two low-rank products, `factor * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`.

    Its rank-`r` update has rank up to `r²`, for the parameters of a rank-`2r` LoRA. It runs like its target with the
    update as the weight (the Hadamard product does not factor through the input as `up(down(x))` does).

    Args:
        name: The LoRA's name.
        weight_shape: The target's weight shape: `(out, in)` for a Linear, `(out, in, k, k)` for a Conv2d.
        rank: The rank of each product.
        alpha: See `Lora`; defaults to `rank`.
        scale: See `Lora`.
        tucker: Whether the products have Tucker cores `t1`, `t2` (convolutions only).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    kind = "LoHa"

    def __init__(
        self,
        name: str,
        weight_shape: Sequence[int],
        rank: int,
        alpha: float | None = None,
        scale: float = 1.0,
        tucker: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        product = HadamardProduct(weight_shape, rank, tucker, device=device, dtype=dtype)
        super().__init__(name, product, LoraScaling(1.0), rank=rank, alpha=alpha, scale=scale)

    @property
    def product(self) -> HadamardProduct:
        return self.layer(0, HadamardProduct)

    @property
    def tucker(self) -> bool:
        return self.product.tucker

    def reset_parameters(self) -> None:
        """Initialise like PEFT: Kaiming-uniform factors but a zero `w2_b`, so that the update starts at zero."""
        product = self.product
        for factor in product.factors().values():
            torch.nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        torch.nn.init.zeros_(product.w2_b)

    @classmethod
    def from_target(
        cls,
        name: str,
        target: fl.WeightedModule,
        rank: int = 16,
        alpha: float | None = None,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """A fresh LoHa (without Tucker cores) for a Linear or Conv2d (see `Lora.from_target`)."""
        if (reason := _check_target("LoHa", target, tuple(target.weight.shape))) is not None:
            raise TypeError(f"cannot build a LoHa for {target.get_path()}: {reason}")
        device = target.device if device is None else device
        dtype = target.dtype if dtype is None else dtype
        lora = cls(name, target.weight.shape, rank, alpha, scale, device=device, dtype=dtype)
        lora._follow(target)
        return lora

    @classmethod
    def from_factors(
        cls,
        name: str,
        weight_shape: Sequence[int],
        w1_a: Tensor,
        w1_b: Tensor,
        w2_a: Tensor,
        w2_b: Tensor,
        t1: Tensor | None = None,
        t2: Tensor | None = None,
        alpha: float | None = None,
        scale: float = 1.0,
    ) -> Self:
        """A LoHa holding trained factors (LyCORIS's and PEFT's `hada_*`), on their device and dtype.

        Args:
            name: The LoRA's name.
            weight_shape: The target's weight shape.
            w1_a: See `HadamardProduct` for the shapes of the factors.
            w1_b: The first product's right factor.
            w2_a: The second product's left factor.
            w2_b: The second product's right factor.
            t1: The first Tucker core, if any.
            t2: The second Tucker core, if any.
            alpha: See `Lora`; defaults to the rank (`w1_b.shape[0]`).
            scale: See `Lora`.
        """
        if (t1 is None) != (t2 is None):
            raise ValueError(f"LoHa {name!r}: give both Tucker cores t1 and t2, or neither")
        lora = cls(
            name, weight_shape, w1_b.shape[0], alpha, scale, t1 is not None, device=w1_a.device, dtype=w1_a.dtype
        )
        given = {"w1_a": w1_a, "w1_b": w1_b, "w2_a": w2_a, "w2_b": w2_b} | (
            {"t1": t1, "t2": t2} if t1 is not None and t2 is not None else {}
        )
        _copy_factors(lora, lora.product.factors(), given)
        return lora


def _copy_factors(lora: Lora[Any], factors: dict[str, Tensor], given: dict[str, Tensor]) -> None:
    wrong = {n: (_shape(given[n]), _shape(f)) for n, f in factors.items() if _shape(given[n]) != _shape(f)}
    if wrong:
        listing = ", ".join(f"{n} {got} (expected {expected})" for n, (got, expected) in wrong.items())
        raise ValueError(f"{type(lora).__name__} {lora.name!r}: factors of the wrong shape: {listing}")
    with torch.no_grad():
        for name, factor in factors.items():
            factor.copy_(given[name])


# -- LoKr -------------------------------------------------------------------------------------------------------


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into `m * n` with `m <= n` as LyCORIS does: `m = factor` if it divides `dimension`, else the
    most balanced split with `m <= factor` (any `m` for `factor=-1`).

    Args:
        dimension: The size to split.
        factor: The preferred size of the smaller part; -1 for the most balanced split.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    length = m + n
    while m < n:
        candidate = m + 1
        while dimension % candidate != 0:
            candidate += 1
        if candidate + dimension // candidate > length or candidate > factor:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


class KroneckerProduct(WeightProduct):
    """LoKr's factors and its unscaled update `kron(w1, w2)`, applied to the input like the target.

    For a weight `(out, in, *kernel)` with `out = a * b` and `in = c * d`: `w1` is `(a, c)`, full or `w1_a @ w1_b`;
    `w2` is `(b, d, *kernel)` full, or `w2_a @ w2_b` with `w2_a` `(b, rank)` and `w2_b` `(rank, d * k * k)`, or,
    with a Tucker core `t2` `(rank, rank, k, k)`, `einsum("i j k l, i p, j r -> p r k l", t2, w2_a, w2_b)` with
    `w2_a` `(rank, b)` and `w2_b` `(rank, d)`.

    Args:
        weight_shape: The target's weight shape.
        w1_shape: `(a, c)`, which must divide the weight's `(out, in)`.
        w1_rank: The rank of `w1 = w1_a @ w1_b`, or None for a full `w1`.
        w2_rank: The rank of `w2`'s factors, or None for a full `w2`.
        tucker: Whether `w2` has a Tucker core (needs a kernel and a `w2_rank`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    w1: torch.nn.Parameter | None
    w1_a: torch.nn.Parameter | None
    w1_b: torch.nn.Parameter | None
    w2: torch.nn.Parameter | None
    w2_a: torch.nn.Parameter | None
    w2_b: torch.nn.Parameter | None
    t2: torch.nn.Parameter | None

    def __init__(
        self,
        weight_shape: Sequence[int],
        w1_shape: tuple[int, int],
        w1_rank: int | None = None,
        w2_rank: int | None = None,
        tucker: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.w1_shape = w1_shape
        self.w1_rank = w1_rank
        self.w2_rank = w2_rank
        self.tucker = tucker
        out_features, in_features, *kernel = self.weight_shape
        a, c = w1_shape
        if a < 1 or c < 1 or out_features % a or in_features % c:
            raise ValueError(f"LoKr: w1 {w1_shape} does not divide the weight {self.weight_shape}'s (out, in)")
        if tucker and (not kernel or w2_rank is None):
            raise ValueError("LoKr: a Tucker core needs a convolution kernel and a w2_rank")
        b, d = out_features // a, in_features // c

        def parameter(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))

        self.w1 = self.w1_a = self.w1_b = self.w2 = self.w2_a = self.w2_b = self.t2 = None
        if w1_rank is None:
            self.w1 = parameter(a, c)
        else:
            self.w1_a, self.w1_b = parameter(a, w1_rank), parameter(w1_rank, c)
        if w2_rank is None:
            self.w2 = parameter(b, d, *kernel)
        elif tucker:
            self.w2_a, self.w2_b = parameter(w2_rank, b), parameter(w2_rank, d)
            self.t2 = parameter(w2_rank, w2_rank, *kernel)
        else:
            self.w2_a, self.w2_b = parameter(b, w2_rank), parameter(w2_rank, d * math.prod(kernel))
        self.op = _TargetOp.for_shape(self.weight_shape)

    def factors(self) -> dict[str, Tensor]:
        """The weights present, by LyCORIS name without the `lokr_` prefix (`w1` or `w1_a`, `w1_b`; `w2` or ...)."""
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        return {name: factor for name in names if (factor := getattr(self, name)) is not None}

    def update(self) -> Tensor:
        """`kron(w1, w2)` with the target weight's shape."""
        w1 = self.w1 if self.w1 is not None else _product(self.w1_a, self.w1_b)
        if self.w2 is not None:
            w2 = self.w2
        elif self.t2 is not None:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", self.t2, self.w2_a, self.w2_b)
        else:
            w2 = _product(self.w2_a, self.w2_b)
        # A kernel flattened into w2's columns: kron then spreads it as a 4-D kron of w1[:, :, None, None] would.
        return torch.kron(w1, w2.flatten(1)).reshape(self.weight_shape)

    def basic_attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {"weight_shape": self.weight_shape, "w1_shape": self.w1_shape}
        for name in ("w1_rank", "w2_rank"):
            if (value := getattr(self, name)) is not None:
                attributes[name] = value
        return attributes | ({"tucker": True} if self.tucker else {})


def _product(a: Tensor | None, b: Tensor | None) -> Tensor:
    assert a is not None and b is not None, "a factorised LoKr factor has both halves"
    return a @ b


class LoKr(_ProductLora):
    """A LoKr: the Kronecker product of two factors, `factor * kron(w1, w2)` (see `KroneckerProduct`).

    `factor` is `scale * alpha / rank` as for every `Lora`; LyCORIS files apply `alpha / rank` only when a factor is
    a low-rank product (a LoKr with two full factors has factor `scale`): their parser gives such a LoKr rank 1 and
    alpha 1. `rank` is that of the low-rank factors (`w2`'s if both are).

    Args:
        name: The LoRA's name.
        weight_shape: The target's weight shape.
        w1_shape: See `KroneckerProduct`.
        w1_rank: See `KroneckerProduct`.
        w2_rank: See `KroneckerProduct`.
        tucker: See `KroneckerProduct`.
        alpha: See `Lora`; defaults to the rank.
        scale: See `Lora`.
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    kind = "LoKr"

    def __init__(
        self,
        name: str,
        weight_shape: Sequence[int],
        w1_shape: tuple[int, int],
        w1_rank: int | None = None,
        w2_rank: int | None = None,
        tucker: bool = False,
        alpha: float | None = None,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        product = KroneckerProduct(weight_shape, w1_shape, w1_rank, w2_rank, tucker, device=device, dtype=dtype)
        rank = w2_rank if w2_rank is not None else w1_rank if w1_rank is not None else 1
        super().__init__(name, product, LoraScaling(1.0), rank=rank, alpha=alpha, scale=scale)

    @property
    def product(self) -> KroneckerProduct:
        return self.layer(0, KroneckerProduct)

    def reset_parameters(self) -> None:
        """Initialise like LyCORIS: Kaiming-uniform factors but a zero `w2` (or `w2_b`): the update starts at zero."""
        factors = self.product.factors()
        for factor in factors.values():
            torch.nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        torch.nn.init.zeros_(factors["w2"] if "w2" in factors else factors["w2_b"])

    @classmethod
    def from_target(
        cls,
        name: str,
        target: fl.WeightedModule,
        rank: int = 16,
        alpha: float | None = None,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """A fresh LoKr for a Linear or Conv2d, split as LyCORIS does by default (see `lokr_factorization`).

        `w1` is full; `w2` is a rank-`rank` product unless `rank` is at least half its larger side, where LyCORIS
        keeps it full too.
        """
        weight_shape = tuple(target.weight.shape)
        if (reason := _check_target("LoKr", target, weight_shape)) is not None:
            raise TypeError(f"cannot build a LoKr for {target.get_path()}: {reason}")
        (a, b), (c, d) = lokr_factorization(weight_shape[0]), lokr_factorization(weight_shape[1])
        w2_rank = rank if rank < max(b, d) / 2 else None
        lora = cls(
            name,
            weight_shape,
            (a, c),
            w2_rank=w2_rank,
            alpha=alpha,
            scale=scale,
            device=target.device if device is None else device,
            dtype=target.dtype if dtype is None else dtype,
        )
        lora._follow(target)
        return lora

    @classmethod
    def from_factors(
        cls,
        name: str,
        weight_shape: Sequence[int],
        factors: dict[str, Tensor],
        alpha: float | None = None,
        scale: float = 1.0,
    ) -> Self:
        """A LoKr holding trained factors, on their device and dtype.

        Args:
            name: The LoRA's name.
            weight_shape: The target's weight shape.
            factors: By LyCORIS name without `lokr_`: `w1` or `w1_a` and `w1_b`; `w2`, or `w2_a` and `w2_b` (with
                `t2` for a Tucker core). See `KroneckerProduct` for their shapes.
            alpha: See `Lora`; defaults to the rank.
            scale: See `Lora`.
        """
        known = {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"}
        has = set(factors)
        w1_full, w2_full = "w1" in has, "w2" in has
        if (
            not has <= known
            or w1_full == ({"w1_a", "w1_b"} <= has)
            or w2_full == ({"w2_a", "w2_b"} <= has)
            or (w1_full and has & {"w1_a", "w1_b"})
            or (w2_full and has & {"w2_a", "w2_b", "t2"})
        ):
            raise ValueError(
                f"LoKr {name!r}: factors {sorted(has)} do not make a LoKr: give w1 or (w1_a, w1_b), and w2 or "
                f"(w2_a, w2_b[, t2])"
            )
        w1_shape = _shape(factors["w1"]) if w1_full else (factors["w1_a"].shape[0], factors["w1_b"].shape[1])
        any_factor = next(iter(factors.values()))
        lora = cls(
            name,
            weight_shape,
            (w1_shape[0], w1_shape[1]),
            w1_rank=None if w1_full else factors["w1_b"].shape[0],
            w2_rank=None if w2_full else factors["w2_b"].shape[0],
            tucker="t2" in has,
            alpha=alpha,
            scale=scale,
            device=any_factor.device,
            dtype=any_factor.dtype,
        )
        _copy_factors(lora, lora.product.factors(), factors)
        return lora


# -- DoRA ------------------------------------------------------------------------------------------------------


class WeightDecomposition(fl.WeightedModule):
    """DoRA's magnitude `m` and its rescaling of a merged weight `V` to `m * V / ||V||`.

    The norm is taken per output row (`axis="output"`: PEFT's `lora_magnitude_vector`, LyCORIS's default) or per
    input column (`axis="input"`: LyCORIS's `wd_on_out=False`), over the kernel too for a convolution. As in PEFT and
    the paper (section 4.3), the norm is a constant for gradients; LyCORIS's `eps` keeps a zero row finite.

    Args:
        size: The number of norms: the weight's output size, or its input size.
        axis: `"output"` or `"input"`.
        device: Where the magnitude lives.
        dtype: The magnitude's dtype.
    """

    def __init__(
        self,
        size: int,
        axis: MagnitudeAxis = "output",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if axis not in ("output", "input"):
            raise ValueError(f"WeightDecomposition: axis must be 'output' or 'input', got {axis!r}")
        self.size = size
        self.axis: MagnitudeAxis = axis
        self.weight = torch.nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def norm(self, merged: Tensor) -> Tensor:
        """`||merged||` along the axis, shaped to broadcast against `merged`."""
        dims = tuple(dim for dim in range(merged.dim()) if dim != (0 if self.axis == "output" else 1))
        return torch.linalg.vector_norm(merged, dim=dims, keepdim=True)

    def forward(self, merged: Tensor) -> Tensor:
        shape = [1] * merged.dim()
        shape[0 if self.axis == "output" else 1] = self.size
        norm = self.norm(merged).detach() + torch.finfo(torch.float32).eps
        return self.weight.reshape(shape).to(merged.dtype) * merged / norm


class Dora(Lora[fl.WeightedModule]):
    """A DoRA: another kind's update `s ΔW`, then a rescaling of the merged weight to a learned magnitude.

    The target runs with `W' = m * (W + s ΔW) / ||W + s ΔW||` (see `WeightDecomposition`), i.e. this LoRA adds
    `W' - W`, where `W` is the target's weight without any fused LoRA (`unfused_weight`) and `s ΔW` the update of
    `update` with this DoRA's scale: `scale * alpha / rank * ΔW` as PEFT computes it. At scale 1 this is also
    LyCORIS's DoRA; at other scales LyCORIS (and ComfyUI) interpolate `W'` instead, which differs.

    Args:
        name: The LoRA's name.
        update: The update being decomposed: a `LinearLora`, `Conv2dLora`, `LoCon`, `LoHa` or `LoKr`, in no tree.
            Its own scale is set to 1: the DoRA's scale applies.
        axis: See `WeightDecomposition`.
        scale: See `Lora`.
    """

    def __init__(self, name: str, update: Lora[Any], axis: MagnitudeAxis = "output", scale: float = 1.0) -> None:
        if update.parent is not None or isinstance(update, Dora):
            raise ValueError(f"Dora {name!r}: its update must be a LoRA of another kind, in no tree")
        update.scale = 1.0
        weight_shape = _update_shape(update)
        size = weight_shape[0 if axis == "output" else 1]
        decomposition = WeightDecomposition(size, axis, device=update.device, dtype=update.dtype)
        super().__init__(name, update, decomposition, rank=update.rank, alpha=update.alpha, scale=scale)
        self.op = _TargetOp.for_shape(weight_shape)

    @property
    def update(self) -> Lora[Any]:
        """The decomposed update (its `delta_weight` is `alpha / rank * ΔW`)."""
        return self.layer(0, Lora)

    @property
    def decomposition(self) -> WeightDecomposition:
        return self.layer(1, WeightDecomposition)

    @property
    def magnitude(self) -> torch.nn.Parameter | Tensor:
        """`m`: one value per output row or input column (PEFT's `lora_magnitude_vector`, LyCORIS's `dora_scale`)."""
        return self.decomposition.weight

    @property
    def axis(self) -> MagnitudeAxis:
        return self.decomposition.axis

    @property
    def down(self) -> fl.WeightedModule:
        return self.update.down

    @property
    def up(self) -> fl.WeightedModule:
        return self.update.up

    def reset_parameters(self) -> None:
        """Leave the weights as they are: the update comes with its own, and a fresh magnitude is the norms of the
        target's weight, which a DoRA only knows from its target (see `Dora.from_target`)."""

    def weight_update(self, target_weight: Tensor) -> Tensor:
        """`W' - W` for `target_weight` `W`, with gradients, in float32."""
        weight = target_weight.float()
        merged = weight + self.scale * weight_update(self.update).float()
        return self.decomposition(merged) - weight

    def delta_weight(self, target_weight: Tensor | None = None) -> Tensor:
        if target_weight is None:
            target_weight = unfused_weight(self._adapter().target)
        with torch.no_grad():
            return self.weight_update(target_weight.detach())

    def forward(self, *args: Any) -> Any:
        (x,) = args
        target_weight = unfused_weight(self._adapter().target).detach()
        return self.op(x, self.weight_update(target_weight).to(x.dtype))

    def _adapter(self) -> LoraAdapter:
        adapter = self.parent
        if not isinstance(adapter, LoraAdapter):
            raise RuntimeError(
                f"Dora {self.name!r} needs its target's weight: put it in a LoraAdapter first "
                f"(`LoraAdapter(target, dora)`), or pass the weight to `delta_weight`"
            )
        return adapter

    def _describe_weights(self) -> str:
        return f"{self.update._describe_weights()}, magnitude ({self.decomposition.size},) per {self.axis}"

    def _incompatibility(self, layer: fl.Module) -> str | None:
        return self.update._incompatibility(layer)

    def _follow(self, target: fl.WeightedModule) -> None:
        self.update._follow(target)
        self.op = _TargetOp.of(target)

    @classmethod
    def from_target(
        cls,
        name: str,
        target: fl.WeightedModule,
        rank: int = 16,
        alpha: float | None = None,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """A fresh DoRA over a classic LoRA for `target`, its magnitude the norms of the target's rows (as PEFT):
        it starts as a no-op."""
        update = Lora[Any].from_target(name, target, rank=rank, alpha=alpha, device=device, dtype=dtype)
        dora = cls(name, update, "output", scale)
        with torch.no_grad():
            norm = dora.decomposition.norm(target.weight.detach().float()).flatten()
            dora.magnitude.copy_(norm)
        dora._follow(target)
        return dora


def _update_shape(lora: Lora[Any]) -> tuple[int, ...]:
    match lora:
        case LoHa() | LoKr():
            return lora.weight_shape
        case LoCon():
            return (lora.out_channels, lora.in_channels, *lora.kernel_size)
        case LinearLora():
            return (lora.out_features, lora.in_features)
        case Conv2dLora():
            return (lora.out_channels, lora.in_channels, *lora.kernel_size)
        case _:
            raise TypeError(
                f"a DoRA decomposes a LinearLora, Conv2dLora, LoCon, LoHa or LoKr, not a {type(lora).__name__}"
            )


def weight_update(lora: Lora[Any]) -> Tensor:
    """A LoRA's update of its target's weight with gradients, in its weights' dtype (`delta_weight` without
    `detach`); not for DoRA, whose update depends on the target's weight (see `Dora.weight_update`).

    Args:
        lora: A `LinearLora`, `Conv2dLora`, `LoCon`, `LoHa` or `LoKr`.
    """
    match lora:
        case LoCon() | LoHa() | LoKr():
            return lora.weight_update()
        case LinearLora() | Conv2dLora():
            down, up = lora.down.weight, lora.up.weight
            return lora.factor * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        case _:
            raise TypeError(f"no additive weight update for a {type(lora).__name__}")
