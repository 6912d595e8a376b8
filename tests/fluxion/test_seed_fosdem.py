"""The FOSDEM 2024 slides' Chain examples, as written (the seeds are the API contract)."""

import torch

import refiners.fluxion.layers as fl

channels, kernel_size = 128, 3
hidden_layer_in, hidden_layer_out, output_size = 21632, 200, 10


class BasicModel(fl.Chain):
    def __init__(self):
        super().__init__(
            fl.Conv2d(1, channels, kernel_size),
            fl.ReLU(),
            fl.MaxPool2d(2),
            fl.Flatten(start_dim=1),
            fl.Linear(hidden_layer_in, hidden_layer_out),
            fl.ReLU(),
            fl.Linear(hidden_layer_out, output_size),
            fl.Lambda(lambda x: torch.nn.functional.softmax(x, dim=0)),
        )


class ReferenceModel(torch.nn.Module):
    # The slide's "PyTorch (Before)" version.
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, kernel_size)
        self.linear_1 = torch.nn.Linear(hidden_layer_in, hidden_layer_out)
        self.maxpool = torch.nn.MaxPool2d(2)
        self.linear_2 = torch.nn.Linear(hidden_layer_out, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = torch.nn.functional.relu(x)
        x = self.maxpool(x)
        x = x.flatten(start_dim=1)
        x = self.linear_1(x)
        x = torch.nn.functional.relu(x)
        x = self.linear_2(x)
        return torch.nn.functional.softmax(x, dim=0)


EXPECTED_REPR = """\
(CHAIN) BasicModel()
  ├── Conv2d(in_channels=1, out_channels=128, kernel_size=(3, 3), device=cpu, dtype=float32)
  ├── ReLU() #1
  ├── MaxPool2d(kernel_size=2, stride=2)
  ├── Flatten(start_dim=1)
  ├── Linear(in_features=21632, out_features=200, device=cpu, dtype=float32) #1
  ├── ReLU() #2
  ├── Linear(in_features=200, out_features=10, device=cpu, dtype=float32) #2
  └── Lambda(<lambda>)"""


class ConvLayer(fl.Chain):
    pass


class HiddenLayer(fl.Chain):
    pass


class OutputLayer(fl.Chain):
    pass


EXPECTED_REORGANIZED_REPR = """\
(CHAIN) BasicModel()
  ├── (CHAIN) ConvLayer()
  │   ├── Conv2d(in_channels=1, out_channels=128, kernel_size=(3, 3), device=cpu, dtype=float32)
  │   ├── ReLU()
  │   └── MaxPool2d(kernel_size=2, stride=2)
  ├── (CHAIN) HiddenLayer()
  │   ├── Flatten(start_dim=1)
  │   ├── Linear(in_features=21632, out_features=200, device=cpu, dtype=float32)
  │   └── ReLU()
  └── (CHAIN) OutputLayer()
      ├── Linear(in_features=200, out_features=10, device=cpu, dtype=float32)
      └── Lambda(<lambda>)"""


def test_basic_model_repr() -> None:
    m = BasicModel()
    assert repr(m) == EXPECTED_REPR


def test_basic_model_equals_the_pytorch_version() -> None:
    m = BasicModel()
    reference = ReferenceModel()
    reference.load_state_dict(
        {
            "conv.weight": m.layer("Conv2d", fl.Conv2d).weight,
            "conv.bias": m.layer("Conv2d", fl.Conv2d).bias,
            "linear_1.weight": m.layer("Linear_1", fl.Linear).weight,
            "linear_1.bias": m.layer("Linear_1", fl.Linear).bias,
            "linear_2.weight": m.layer("Linear_2", fl.Linear).weight,
            "linear_2.bias": m.layer("Linear_2", fl.Linear).bias,
        }
    )
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(m(x), reference(x), atol=0, rtol=0)


def test_reorganization_with_insert_pop_insert_after_type_append() -> None:
    m = BasicModel()
    x = torch.randn(2, 1, 28, 28)
    expected = m(x)
    weights = {k: v.clone() for k, v in m.state_dict().items()}

    m.insert(0, ConvLayer(m.pop(0), m.pop(0), m.pop(0)))
    m.insert_after_type(ConvLayer, HiddenLayer(m.pop(1), m.pop(1), m.pop(1)))
    m.append(OutputLayer(m.pop(2), m.pop(2)))

    assert repr(m) == EXPECTED_REORGANIZED_REPR
    torch.testing.assert_close(m(x), expected, atol=0, rtol=0)
    assert list(m.state_dict()) == [
        "ConvLayer.Conv2d.weight",
        "ConvLayer.Conv2d.bias",
        "HiddenLayer.Linear.weight",
        "HiddenLayer.Linear.bias",
        "OutputLayer.Linear.weight",
        "OutputLayer.Linear.bias",
    ]
    assert torch.equal(m.state_dict()["HiddenLayer.Linear.weight"], weights["Linear_1.weight"])
