"""ATen converters one by one: a tiny module using the op, through ``intq.from_torch`` and the
reference interpreter, against PyTorch within 1e-5 of the output range."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import intq

TOLERANCE = 1e-5


class _Fn(nn.Module):
    """A module running ``fn`` on its inputs."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(*inputs)


def _inputs(*shapes: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=3.0, size=s).astype(np.float32) for s in shapes]


def _check(module: nn.Module, inputs: list[np.ndarray]) -> intq.ir.Graph:
    module.eval()
    tensors = tuple(torch.from_numpy(a) for a in inputs)
    graph = intq.from_torch(module, tensors)
    with torch.no_grad():
        want = module(*(t.clone() for t in tensors))
    wants = list(want) if isinstance(want, (tuple, list)) else [want]
    feeds = {v.name: a for v, a in zip(graph.inputs, inputs)}
    got = intq.compile(graph, "reference").run(feeds)
    for value, expected in zip(graph.outputs, wants):
        expected = expected.numpy()
        assert got[value.name].shape == expected.shape
        error = np.abs(got[value.name] - expected).max() / max(np.ptp(expected), 1e-12)
        assert error <= TOLERANCE, (value.name, error)
    return graph


def _ops(graph: intq.ir.Graph) -> set[str]:
    return {node.op for node in graph}


X = (2, 4, 6, 6)

ELEMENTWISE = {
    "hardswish": (nn.Hardswish(), "HardSwish"),
    "hardswish_": (nn.Hardswish(inplace=True), "HardSwish"),
    "hardsigmoid": (nn.Hardsigmoid(), "HardSigmoid"),
    "hardsigmoid_": (nn.Hardsigmoid(inplace=True), "HardSigmoid"),
    "silu": (nn.SiLU(), "Sigmoid"),
    "prelu": (nn.PReLU(4, init=0.1), "PRelu"),
    "prelu_one_slope": (nn.PReLU(init=0.3), "PRelu"),
    "leaky_relu": (nn.LeakyReLU(0.1), "PRelu"),
    "leaky_relu_": (nn.LeakyReLU(0.2, inplace=True), "PRelu"),
    "softplus": (nn.Softplus(), "Softplus"),
    "softplus_beta_threshold": (nn.Softplus(beta=2.0, threshold=3.0), "Where"),
    "mish": (nn.Mish(), "Mish"),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_activations_match_pytorch(name):
    module, op = ELEMENTWISE[name]
    if isinstance(module, nn.PReLU):
        with torch.no_grad():
            module.weight.copy_(torch.linspace(-0.5, 0.5, module.weight.numel()))
    assert op in _ops(_check(module, _inputs(X)))


@pytest.mark.parametrize("fn", [torch.minimum, torch.maximum])
def test_minimum_and_maximum_broadcast(fn):
    graph = _check(_Fn(fn), _inputs(X, (1, 4, 1, 6)))
    assert _ops(graph) & {"Min", "Max"}


class _HardCNN(nn.Module):
    """A MobileNetV3-style block: the tabled activations lower to integer lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.Hardswish()
        self.gate = nn.Hardsigmoid()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        return self.fc((y * self.gate(y)).flatten(1))


def test_hard_activations_quantize_to_integers():
    torch.manual_seed(0)
    module = _HardCNN().eval()
    data = _inputs((32, 1, 8, 8), seed=1)[0]
    graph = _check(module, [data[:8]])
    int_graph = intq.quantize(graph, [{"x": data[i : i + 8]} for i in range(0, 32, 8)])
    float_ops = {"HardSwish", "HardSigmoid", "Conv", "Gemm"} & _ops(int_graph)
    assert not float_ops, float_ops
    got = intq.compile(int_graph, "reference").run({"x": data[:8]})[int_graph.outputs[0].name]
    with torch.no_grad():
        want = module(torch.from_numpy(data[:8])).numpy()
    assert np.abs(got - want).max() / np.ptp(want) < 0.1
