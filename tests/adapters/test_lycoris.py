"""LyCORIS kinds (LoCon, LoHa, LoKr, DoRA) against their published formulas, written out here, and against PEFT."""

import copy
import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model  # pyright: ignore[reportMissingTypeStubs]
from peft.tuners.lokr.layer import factorization as peft_factorization  # pyright: ignore[reportMissingTypeStubs]

import refiners.adapters.lora.lycoris as lycoris_module
import refiners.fluxion.layers as fl
from refiners.adapters.lora import Dora, LoCon, LoHa, LoKr, lokr_factorization, weight_update
from refiners.fluxion.adapters.lora import LinearLora, Lora, LoraAdapter, lora_parameters

ATOL, RTOL = 1e-5, 1e-5


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(target: fl.Linear | fl.Conv2d, lora: Lora[Any], x: torch.Tensor) -> torch.Tensor:
    """The output of `target` with `lora` injected in a model."""
    model = fl.Chain(target)
    LoraAdapter(target, lora).inject()
    return model(x)


def reference(target: fl.Linear | fl.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What `target` computes with `weight` in place of its own, in plain torch."""
    if isinstance(target, fl.Linear):
        return F.linear(x, weight, target.bias)
    if target.padding_mode == "reflect":
        padded = F.pad(x, tuple(target._reversed_padding_repeated_twice), mode="reflect")
        return F.conv2d(padded, weight, target.bias, target.stride, 0, target.dilation)
    return F.conv2d(x, weight, target.bias, target.stride, target.padding, target.dilation)


def mode_products(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The Tucker rebuild `W[p, r, k, l] = sum_ij core[i, j, k, l] left[i, p] right[j, r]`, as two matrix products
    per kernel position (the einsum of LyCORIS, written another way)."""
    spatial = core.permute(2, 3, 0, 1)  # (k, l, i, j)
    rebuilt = left.T @ spatial @ right  # (k, l, p, r)
    return rebuilt.permute(2, 3, 0, 1).contiguous()


# -- LoCon -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stride", "padding"), [(1, 1), (2, 0)])
def test_locon_runs_its_three_convolutions_and_fuses_their_kernel(stride: int, padding: int) -> None:
    conv = fl.Conv2d(4, 6, 3, stride=stride, padding=padding)
    down, mid, up = randn(2, 4, 1, 1, seed=1), randn(2, 2, 3, 3, seed=2), randn(6, 2, 1, 1, seed=3)
    locon = LoCon.from_factors("x", down, mid, up, alpha=1.0, scale=0.5)
    x = randn(2, 4, 9, 9, seed=4)
    weight = conv.weight.detach().clone()
    # The published form: 1x1 down, k x k mid sliding like the target, 1x1 up, times scale * alpha / rank.
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid, None, stride, padding), up)
    expected = reference(conv, weight, x) + 0.5 * 1.0 / 2 * chained
    torch.testing.assert_close(run(conv, locon, x), expected, atol=ATOL, rtol=RTOL)
    merged = 0.25 * mode_products(mid, up[:, :, 0, 0].T, down[:, :, 0, 0])
    torch.testing.assert_close(locon.delta_weight(), merged, atol=ATOL, rtol=RTOL)
    adapter = locon.parent
    assert isinstance(adapter, LoraAdapter)
    adapter.fuse()
    torch.testing.assert_close(conv.weight, weight + merged, atol=ATOL, rtol=RTOL)
    adapter.unfuse()
    assert torch.equal(conv.weight, weight)


# -- LoHa --------------------------------------------------------------------------------------------------------


def loha_factors(out: int, inp: int, rank: int, kernel: tuple[int, ...], tucker: bool) -> dict[str, torch.Tensor]:
    if tucker:
        shapes = {"w1_a": (rank, out), "w1_b": (rank, inp), "w2_a": (rank, out), "w2_b": (rank, inp)}
        shapes |= {"t1": (rank, rank, *kernel), "t2": (rank, rank, *kernel)}
    else:
        flat = inp * math.prod(kernel)
        shapes = {"w1_a": (out, rank), "w1_b": (rank, flat), "w2_a": (out, rank), "w2_b": (rank, flat)}
    return {name: randn(*shape, seed=seed) for seed, (name, shape) in enumerate(shapes.items())}


@pytest.mark.parametrize(
    ("layer", "tucker"),
    [("linear", False), ("conv", False), ("conv", True), ("conv1x1", False), ("conv-reflect", False)],
)
def test_loha_adds_the_hadamard_product_of_two_low_rank_products(layer: str, tucker: bool) -> None:
    target: fl.Linear | fl.Conv2d
    match layer:
        case "linear":
            target, x, kernel = fl.Linear(10, 6), randn(3, 10, seed=9), ()
        case "conv":
            target, x, kernel = fl.Conv2d(5, 6, 3, padding=1, stride=2), randn(2, 5, 7, 7, seed=9), (3, 3)
        case "conv-reflect":
            target = fl.Conv2d(5, 6, 3, padding=2, dilation=2, padding_mode="reflect")
            x, kernel = randn(2, 5, 7, 7, seed=9), (3, 3)
        case _:
            target, x, kernel = fl.Conv2d(5, 6, 1), randn(2, 5, 4, 4, seed=9), (1, 1)
    weight = target.weight.detach().clone()
    f = loha_factors(weight.shape[0], weight.shape[1], 3, kernel, tucker)
    loha = LoHa.from_factors("x", weight.shape, **f, alpha=4.0, scale=0.7)
    # FedPara / LyCORIS: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / rank, each product rebuilt from its core.
    if tucker:
        product = mode_products(f["t1"], f["w1_a"], f["w1_b"]) * mode_products(f["t2"], f["w2_a"], f["w2_b"])
    else:
        product = ((f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"])).reshape(weight.shape)
    delta = 0.7 * 4.0 / 3 * product
    torch.testing.assert_close(run(target, loha, x), reference(target, weight + delta, x), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loha.delta_weight(), delta, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("effective_conv2d", [False, True])
def test_loha_matches_peft(effective_conv2d: bool) -> None:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.Conv2d(6, 4, 3, padding=1))
    config = LoHaConfig(
        r=2, alpha=5, target_modules=["0", "1"], init_weights=False, use_effective_conv2d=effective_conv2d
    )
    peft_model: Any = get_peft_model(copy.deepcopy(base), config)
    linear, conv = fl.Linear(10, 6), fl.Conv2d(6, 4, 3, padding=1)
    model = fl.Chain(linear, fl.Chain(conv))
    targets: list[fl.Linear | fl.Conv2d] = [linear, conv]
    for index, ours in enumerate(targets):
        ours.load_state_dict(base[index].state_dict())
        layer = peft_model.base_model.model[index]
        factors = {name: getattr(layer, f"hada_{name}")["default"] for name in ("w1_a", "w1_b", "w2_a", "w2_b")}
        if "default" in layer.hada_t1:
            factors |= {"t1": layer.hada_t1["default"], "t2": layer.hada_t2["default"]}
        LoraAdapter(ours, LoHa.from_factors("x", ours.weight.shape, **factors, alpha=5.0)).inject()
    x = randn(2, 10, seed=1)
    hidden = randn(2, 6, 5, 5, seed=2)
    torch.testing.assert_close(model.layer(0, LoraAdapter)(x), peft_model.base_model.model[0](x), atol=ATOL, rtol=RTOL)
    conv_adapter = model.layer("Chain.LoraAdapter", LoraAdapter)
    torch.testing.assert_close(conv_adapter(hidden), peft_model.base_model.model[1](hidden), atol=ATOL, rtol=RTOL)


# -- LoKr --------------------------------------------------------------------------------------------------------


def test_lokr_factorization_is_lycoris() -> None:
    # LyCORIS's docstring table (where its code agrees: for 360 the code gives (18, 20), not the table's (8, 45)),
    # and PEFT's copy of the function.
    published = {
        (127, -1): (1, 127),
        (128, -1): (8, 16),
        (250, -1): (10, 25),
        (360, -1): (18, 20),
        (512, -1): (16, 32),
        (1024, -1): (32, 32),
        (128, 4): (4, 32),
        (250, 4): (2, 125),
        (360, 4): (4, 90),
        (512, 4): (4, 128),
    }
    for (dimension, factor), expected in published.items():
        assert lokr_factorization(dimension, factor) == expected, (dimension, factor)
    for dimension in range(1, 400):
        for factor in (-1, 2, 4, 8):
            # PEFT's copy returns (factor, dimension // factor) unsorted where LyCORIS puts the smaller part first.
            assert lokr_factorization(dimension, factor) == tuple(sorted(peft_factorization(dimension, factor)))


LOKR_CASES = {
    "linear, full w1, low-rank w2": ((12, 10), {"w1": (3, 2), "w2_a": (4, 2), "w2_b": (2, 5)}),
    "linear, both low-rank": ((12, 10), {"w1_a": (3, 1), "w1_b": (1, 2), "w2_a": (4, 2), "w2_b": (2, 5)}),
    "linear, both full": ((12, 10), {"w1": (3, 2), "w2": (4, 5)}),
    "conv, full w2": ((6, 4, 3, 3), {"w1": (2, 2), "w2": (3, 2, 3, 3)}),
    "conv, low-rank w2": ((6, 4, 3, 3), {"w1": (2, 2), "w2_a": (3, 2), "w2_b": (2, 2 * 9)}),
    "conv, Tucker w2": ((6, 4, 3, 3), {"w1": (2, 2), "w2_a": (2, 3), "w2_b": (2, 2), "t2": (2, 2, 3, 3)}),
}


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_adds_the_kronecker_product_of_its_factors(case: str) -> None:
    weight_shape, shapes = LOKR_CASES[case]
    target: fl.Linear | fl.Conv2d
    if len(weight_shape) == 2:
        target, x = fl.Linear(weight_shape[1], weight_shape[0]), randn(3, weight_shape[1], seed=7)
    else:
        target, x = fl.Conv2d(weight_shape[1], weight_shape[0], 3, padding=1), randn(2, weight_shape[1], 6, 6, seed=7)
    weight = target.weight.detach().clone()
    f = {name: randn(*shape, seed=seed) for seed, (name, shape) in enumerate(shapes.items())}
    lokr = LoKr.from_factors("x", weight_shape, f, alpha=3.0, scale=0.5)
    # LyCORIS / PEFT: ΔW = kron(w1, w2) * alpha / rank, w1 and w2 rebuilt from their factors; a kernel is the
    # Kronecker product of w1 as a 1x1 kernel with w2's kernel.
    w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
    if "w2" in f:
        w2 = f["w2"]
    elif "t2" in f:
        w2 = mode_products(f["t2"], f["w2_a"], f["w2_b"])
    else:
        w2 = (f["w2_a"] @ f["w2_b"]).reshape(
            weight_shape[0] // w1.shape[0], weight_shape[1] // w1.shape[1], *weight_shape[2:]
        )
    kron = torch.kron(w1[:, :, None, None], w2) if w2.dim() == 4 else torch.kron(w1, w2)
    rank = f["w2_b"].shape[0] if "w2_b" in f else f["w1_b"].shape[0] if "w1_b" in f else 1
    assert lokr.rank == rank
    delta = 0.5 * 3.0 / rank * kron
    torch.testing.assert_close(run(target, lokr, x), reference(target, weight + delta, x), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lokr.delta_weight(), delta, atol=ATOL, rtol=RTOL)


def test_lokr_matches_peft() -> None:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Conv2d(8, 6, 3, padding=1))
    config = LoKrConfig(
        r=2, alpha=3, target_modules=["0", "1"], init_weights=False, use_effective_conv2d=True, decompose_both=True
    )
    peft_model: Any = get_peft_model(copy.deepcopy(base), config)
    for index in range(len(base)):
        peft_layer = peft_model.base_model.model[index]
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        factors = {
            n: getattr(peft_layer, f"lokr_{n}")["default"]
            for n in names
            if "default" in getattr(peft_layer, f"lokr_{n}")
        }
        rank = factors["w2_b"].shape[0] if "w2_b" in factors else factors["w1_b"].shape[0] if "w1_b" in factors else 1
        # PEFT scales by alpha / r even for full factors: give the LoKr the same factor.
        lokr = LoKr.from_factors("x", tuple(peft_layer.get_base_layer().weight.shape), factors, alpha=3.0 / 2 * rank)
        expected = peft_layer.get_delta_weight("default")
        torch.testing.assert_close(lokr.delta_weight(), expected, atol=ATOL, rtol=RTOL)


# -- DoRA --------------------------------------------------------------------------------------------------------


def decomposed(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str) -> torch.Tensor:
    """DoRA (Liu et al., 2024, eq. 5): W' = m * (W + ΔW) / ||W + ΔW||, the norm per output row (over the input and
    the kernel) or per input column (over the output and the kernel)."""
    merged = weight + delta
    if axis == "output":
        norm = torch.sqrt((merged**2).flatten(1).sum(dim=1))
        return magnitude.reshape(-1, *[1] * (merged.dim() - 1)) * merged / norm.reshape(-1, *[1] * (merged.dim() - 1))
    norm = torch.sqrt((merged.transpose(0, 1) ** 2).flatten(1).sum(dim=1))
    shape = [1, -1, *[1] * (merged.dim() - 2)]
    return magnitude.reshape(shape) * merged / norm.reshape(shape)


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_dora_rescales_the_merged_weight_to_its_magnitude(axis: str, scale: float, layer: str) -> None:
    target: fl.Linear | fl.Conv2d
    if layer == "linear":
        target, x = fl.Linear(10, 6), randn(3, 10, seed=5)
        update: Lora[Any] = Lora[Any].from_weights("x", randn(2, 10, seed=1), randn(6, 2, seed=2), alpha=4.0)
    else:
        target, x = fl.Conv2d(5, 6, 3, padding=1), randn(2, 5, 6, 6, seed=5)
        update = Lora[Any].from_weights("x", randn(2, 5, 3, 3, seed=1), randn(6, 2, 1, 1, seed=2), alpha=4.0)
    weight = target.weight.detach().clone()
    size = weight.shape[0] if axis == "output" else weight.shape[1]
    magnitude = randn(size, seed=3).abs() + 0.5
    dora = Dora("x", update, axis, scale)  # pyright: ignore[reportArgumentType]
    with torch.no_grad():
        dora.magnitude.copy_(magnitude)
    low_rank = (update.up.weight.flatten(1) @ update.down.weight.flatten(1)).reshape(weight.shape).detach()
    expected_weight = decomposed(weight, scale * 4.0 / 2 * low_rank, magnitude, axis)
    torch.testing.assert_close(run(target, dora, x), reference(target, expected_weight, x), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dora.delta_weight(), expected_weight - weight, atol=1e-5, rtol=1e-5)


def test_dora_matches_peft_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.Conv2d(6, 4, 3, padding=1))
    peft_model: Any = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=3, target_modules=["0", "1"], use_dora=True, init_lora_weights=False),
    )
    inputs = [randn(3, 10, seed=1), randn(2, 6, 5, 5, seed=2)]
    for index, (module, x) in enumerate(zip(base, inputs, strict=True)):
        peft_layer = peft_model.base_model.model[index]
        with torch.no_grad():  # a magnitude that is not the weight's norm, so that DoRA changes the output
            peft_layer.lora_magnitude_vector["default"].weight.mul_(1.3)
        target = fl.Linear(10, 6) if index == 0 else fl.Conv2d(6, 4, 3, padding=1)
        target.load_state_dict(module.state_dict())
        down, up = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        dora = Dora("x", Lora[Any].from_weights("x", down.detach(), up.detach(), alpha=3.0))
        with torch.no_grad():
            dora.magnitude.copy_(peft_layer.lora_magnitude_vector["default"].weight.flatten())
        adapter = LoraAdapter(target, dora)
        for scale in (1.0, 0.6):
            peft_layer.set_scale("default", scale)
            dora.scale = scale
            ours, theirs = adapter(x), peft_layer(x)
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
        # The norm is a constant for gradients in both (DoRA, section 4.3).
        ours.square().sum().backward()
        theirs.square().sum().backward()
        pairs = [
            (dora.update.down.weight, peft_layer.lora_A["default"].weight),
            (dora.update.up.weight, peft_layer.lora_B["default"].weight),
            (dora.magnitude, peft_layer.lora_magnitude_vector["default"].weight),
        ]
        for mine, reference_parameter in pairs:
            assert mine.grad is not None and reference_parameter.grad is not None
            torch.testing.assert_close(mine.grad.flatten(), reference_parameter.grad.flatten(), atol=1e-4, rtol=1e-4)


def test_a_fresh_dora_changes_nothing_and_trains_like_its_parameters() -> None:
    linear = fl.Linear(8, 4)
    model = fl.Chain(linear)
    x = randn(3, 8, seed=1)
    before = model(x)
    dora = Dora.from_target("x", linear, rank=2)
    LoraAdapter(linear, dora).inject()
    torch.testing.assert_close(model(x), before, atol=ATOL, rtol=RTOL)
    found = {id(parameter) for parameter in lora_parameters(model)}
    assert found == {id(p) for p in (dora.update.down.weight, dora.update.up.weight, dora.magnitude)}


def test_fusing_a_dora_with_another_lora_does_not_depend_on_the_order() -> None:
    linear = fl.Linear(8, 6)
    model = fl.Chain(linear)
    original = linear.weight.detach().clone()
    dora = Dora("dora", Lora[Any].from_weights("dora", randn(2, 8, seed=1), randn(6, 2, seed=2)))
    with torch.no_grad():
        dora.magnitude.copy_(randn(6, seed=3).abs() + 0.5)
    plain = LinearLora("plain", 8, 6, rank=2)
    with torch.no_grad():
        plain.up.weight.copy_(randn(6, 2, seed=4))
    adapter = LoraAdapter(linear, plain, dora).inject()
    x = randn(3, 8, seed=5)
    unfused = model(x)
    # Both updates are taken from the original weight, as PEFT's forward takes each adapter's from the base weight.
    expected = (
        original
        + plain.delta_weight()
        + (decomposed(original, weight_update(dora.update).detach(), dora.magnitude.detach(), "output") - original)
    )
    for order in (["plain", "dora"], ["dora", "plain"]):
        for name in order:
            adapter.fuse(name)
        torch.testing.assert_close(linear.weight, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), unfused, atol=ATOL, rtol=RTOL)
        adapter.unfuse()
        assert torch.equal(linear.weight, original)


# -- in fluxion's adapter ----------------------------------------------------------------------------------------


def test_lycoris_kinds_live_in_a_lora_adapter_like_any_lora() -> None:
    conv = fl.Conv2d(4, 4, 3, padding=1)
    model = fl.Chain(fl.Chain(conv), fl.ReLU())
    before = repr(model)
    loras: list[Lora[Any]] = [
        LoCon.from_target("locon", conv, rank=2),
        LoHa.from_target("loha", conv, rank=2),
        LoKr.from_target("lokr", conv, rank=1),
        Dora.from_target("dora", conv, rank=2),
    ]
    adapter = LoraAdapter(conv, *loras).inject()
    assert adapter.names == ["locon", "loha", "lokr", "dora"]
    x = randn(1, 4, 5, 5, seed=1)
    torch.testing.assert_close(model(x), F.relu(conv(x)), atol=ATOL, rtol=RTOL)  # every kind starts at zero
    assert set(map(id, lora_parameters(model))) == {id(p) for lora in loras for p in lora.parameters()}
    loha = adapter.loras["loha"]
    assert isinstance(loha, LoHa)
    torch.nn.init.normal_(loha.product.w2_b)
    delta = loha.delta_weight()
    adapter.set_scale("loha", 2.0)
    torch.testing.assert_close(loha.delta_weight(), 2 * delta)
    adapter.eject()
    assert repr(model) == before


def test_docstring_examples_run() -> None:
    for example in re.findall(r"```py\n(.*?)```", lycoris_module.__doc__ or "", flags=re.DOTALL):
        lines = example.splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        exec("\n".join(line[indent:] for line in lines), {})


# -- errors ------------------------------------------------------------------------------------------------------


def test_kinds_that_do_not_fit_are_refused_with_their_shapes() -> None:
    linear = fl.Linear(8, 6)
    loha = LoHa("x", (6, 4), rank=2)
    with pytest.raises(
        ValueError,
        match=r"LoHa 'x' \(w1_a \(6, 2\), w1_b \(2, 4\), w2_a \(6, 2\), w2_b \(2, 4\)\) does not fit Linear .*"
        r"the LoHa updates a weight of shape \(6, 4\), the layer's is \(6, 8\)",
    ):
        LoraAdapter(linear, loha)
    with pytest.raises(TypeError, match=r"LoHa 'x' has no `down`: it is not a down/up pair"):
        _ = loha.down
    with pytest.raises(ValueError, match=r"LoHa 'x': factors of the wrong shape: w2_b \(3, 4\) \(expected \(2, 4\)\)"):
        LoHa.from_factors(
            "x", (6, 4), randn(6, 2, seed=0), randn(2, 4, seed=0), randn(6, 2, seed=0), randn(3, 4, seed=0)
        )
    with pytest.raises(ValueError, match=r"LoKr 'x': factors \['w1', 'w1_a', 'w2'\] do not make a LoKr"):
        LoKr.from_factors(
            "x", (6, 4), {"w1": randn(2, 2, seed=0), "w1_a": randn(2, 1, seed=0), "w2": randn(3, 2, seed=0)}
        )
    with pytest.raises(ValueError, match=r"LoKr: w1 \(4, 3\) does not divide the weight \(6, 4\)'s \(out, in\)"):
        LoKr("x", (6, 4), (4, 3))
    with pytest.raises(ValueError, match=r"do not make a Tucker LoCon"):
        LoCon.from_factors("x", randn(2, 4, 3, 3, seed=0), randn(2, 2, 3, 3, seed=0), randn(6, 2, 1, 1, seed=0))
    with pytest.raises(TypeError, match=r"a LoCon updates a Conv2d with groups=1: Linear is not one"):
        LoCon.from_target("x", linear)


def test_a_dora_needs_its_target() -> None:
    dora = Dora("x", LinearLora("x", 8, 6, rank=2))
    with pytest.raises(RuntimeError, match=r"Dora 'x' needs its target's weight: put it in a LoraAdapter first"):
        dora(randn(2, 8, seed=0))
    with pytest.raises(ValueError, match=r"Dora 'y': its update must be a LoRA of another kind, in no tree"):
        Dora("y", dora)
    assert dora.delta_weight(torch.ones(6, 8)).shape == (6, 8)
