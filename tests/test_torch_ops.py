"""ATen converters one by one: a tiny module using the op, through ``intq.from_torch`` and the
reference interpreter, against PyTorch within 1e-5 of the output range."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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


SPLITS = {
    "split": lambda x: torch.split(x, 3, dim=1),  # 3 + 1
    "split_with_sizes": lambda x: torch.split(x, [1, 3], dim=1),
    "chunk": lambda x: torch.chunk(x, 3, dim=-1),  # 2 + 2 + 2
    "chunk_uneven": lambda x: torch.chunk(x, 4, dim=2),  # 2 + 2 + 2 (torch makes 3)
    "unbind": lambda x: torch.unbind(x, dim=1),
}


@pytest.mark.parametrize("name", list(SPLITS))
def test_multi_output_splits_give_every_piece(name):
    fn = SPLITS[name]
    graph = _check(_Fn(lambda x: tuple(p * (i + 1) for i, p in enumerate(fn(x)))), _inputs(X))
    with torch.no_grad():
        assert len(graph.outputs) == len(fn(torch.zeros(X)))


def test_one_unused_piece_is_dropped():
    graph = _check(_Fn(lambda x: torch.split(x, [1, 3], dim=1)[1]), _inputs(X))
    assert [node.op for node in graph].count("Slice") == 1


UPSAMPLES = {
    "nearest_scale": nn.Upsample(scale_factor=2),
    "nearest_scale_3": nn.Upsample(scale_factor=3),
    "nearest_size": _Fn(lambda x: F.interpolate(x, size=(9, 14))),
    "nearest_shrink": _Fn(lambda x: F.interpolate(x, size=(4, 5))),
    "bilinear": nn.Upsample(scale_factor=2, mode="bilinear"),
    "bilinear_size": _Fn(lambda x: F.interpolate(x, size=(9, 13), mode="bilinear")),
    "bilinear_corners": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    "bilinear_corners_size": _Fn(
        lambda x: F.interpolate(x, size=(5, 11), mode="bilinear", align_corners=True)
    ),
    "nearest_1d": _Fn(lambda x: F.interpolate(x.flatten(2), scale_factor=2)),
    "linear_1d": _Fn(lambda x: F.interpolate(x.flatten(2), size=50, mode="linear")),
}


@pytest.mark.parametrize("name", list(UPSAMPLES))
def test_upsample_matches_pytorch(name):
    assert "Resize" in _ops(_check(UPSAMPLES[name], _inputs(X)))


POSITION_IDS = {  # what RoBERTa's and MPNet's embeddings compute from the token ids
    "cumsum_float": lambda x: torch.cumsum(x, dim=1),
    "cumsum_mask": lambda x: torch.cumsum((x > 0).int(), dim=-1) * (x > 0).int() + 1,
    "where_scalar_other": lambda x: torch.where(x > 0, x, 0.5),
    "where_scalar_self": lambda x: torch.where(x > 0, -1.0, x),
    "where_tensors": lambda x: torch.where(x > 0, x, x * 2.0),
    "gather": lambda x: torch.gather(x, 1, (x > 1).long() + (x > 2).long()),
    "int_promotion": lambda x: (x > 0).int() * torch.cumsum((x > 0).int(), dim=1) / 2,
    "type_as": lambda x: (x > 0).type_as(x) * x,
}


@pytest.mark.parametrize("name", list(POSITION_IDS))
def test_position_id_ops_match_pytorch(name):
    _check(_Fn(POSITION_IDS[name]), _inputs(X))


BLOCKS = {  # nn.Unfold then nn.Fold: (kwargs, whether the blocks tile the image)
    "patches": ({"kernel_size": 2, "stride": 2}, True),
    "overlapping": ({"kernel_size": 3, "padding": 1}, False),
    "strided_dilated": ({"kernel_size": (2, 3), "stride": 2, "dilation": (2, 1)}, False),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_unfold_and_fold_match_pytorch(name):
    """MobileViT-V2's patches tile the image (a transpose each way); overlapping blocks are a
    one-hot (transposed) convolution, whose sums ``fold`` needs."""
    kwargs, tiles = BLOCKS[name]

    def unfold_fold(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = F.unfold(x, **kwargs)
        return cols * 0.5, F.fold(cols * 2.0, output_size=x.shape[2:], **kwargs)

    ops = _ops(_check(_Fn(unfold_fold), _inputs(X)))
    assert ({"Conv", "ConvTranspose"} <= ops) != tiles, ops


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},
        {"kernel_size": (2, 3), "stride": (2, 1), "bias": False},
        {"kernel_size": 3, "groups": 2, "dilation": 2},
    ],
)
def test_conv_transpose2d_matches_pytorch(kwargs):
    torch.manual_seed(0)
    graph = _check(nn.ConvTranspose2d(4, 6, **kwargs), _inputs(X))
    assert "ConvTranspose" in _ops(graph)


def test_conv_transpose1d_matches_pytorch():
    torch.manual_seed(0)
    _check(nn.ConvTranspose1d(4, 2, 3, stride=2), _inputs((2, 4, 7)))


Q = (2, 3, 5, 8)


def test_attention_decomposes_into_the_matmul_softmax_pattern():
    graph = _check(_Fn(F.scaled_dot_product_attention), _inputs(Q, (2, 3, 7, 8), (2, 3, 7, 4)))
    assert [node.op for node in graph] == ["Transpose", "MatMul", "Mul", "Softmax", "MatMul"]
    mask_fn = _Fn(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, scale=0.3))
    graph = _check(mask_fn, _inputs(Q, Q, Q, (2, 1, 5, 5)))
    assert "Add" in _ops(graph)
    _check(_Fn(F.scaled_dot_product_attention), _inputs((4, 5, 8), (4, 6, 8), (4, 6, 3)))


class _Attention(nn.Module):
    """Two-head self-attention through ``F.scaled_dot_product_attention`` with a padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, 2, 8).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), mask
        )
        return y.transpose(1, 2).reshape(b, t, 16)


def test_attention_lowers_to_integer_attention():
    torch.manual_seed(0)
    x = _inputs((2, 5, 16))[0]
    mask = np.zeros((2, 1, 1, 5), np.float32)
    mask[1, ..., 3:] = -1e4
    graph = _check(_Attention(), [x, mask])
    feeds = {graph.inputs[0].name: x, graph.inputs[1].name: mask}
    int_graph = intq.quantize(graph, [feeds], intq.QuantConfig(progress=False))
    assert {"QBatchMatMul", "QSoftmax"} <= _ops(int_graph)
    assert not {"Softmax", "MatMul"} & _ops(int_graph)


def test_attention_refuses_what_it_cannot_express():
    qkv = tuple(torch.zeros(Q) for _ in range(3))
    causal = _Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(intq.UnsupportedOpError, match="is_causal") as info:
        intq.from_torch(causal, qkv)
    assert "scaled_dot_product_attention" in str(info.value)


def test_attention_takes_a_boolean_mask():
    """True keeps a position: an additive 0 / float32-lowest mask; an all-true constant mask
    (a bidirectional model's, folded at the captured shapes) is no mask at all."""
    keep = np.random.default_rng(3).random((2, 1, 5, 5)) > 0.4
    keep[..., 0] = True  # no row masked entirely (torch gives NaN there)
    graph = intq.from_torch(
        _Fn(F.scaled_dot_product_attention),
        (*map(torch.from_numpy, _inputs(Q, Q, Q)), torch.from_numpy(keep)),
    )
    assert "Where" in _ops(graph)
    q, k, v = _inputs(Q, Q, Q)
    with torch.no_grad():
        want = F.scaled_dot_product_attention(
            *map(torch.from_numpy, (q, k, v)), torch.from_numpy(keep)
        )
    got = intq.compile(graph, "reference").run(
        dict(zip([i.name for i in graph.inputs], (q, k, v, keep)))
    )
    np.testing.assert_allclose(next(iter(got.values())), want.numpy(), atol=1e-5)

    ones = torch.ones(5, 5, dtype=torch.bool)
    graph = intq.from_torch(
        _Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, ones)),
        tuple(map(torch.from_numpy, (q, k, v))),
    )
    assert [node.op for node in graph] == ["Transpose", "MatMul", "Mul", "Softmax", "MatMul"]


EINSUMS = [
    ("bhlk,bhtk->bhlt", [(2, 3, 4, 5), (2, 3, 6, 5)]),
    ("bhlt,bhtv->bhlv", [(2, 3, 4, 6), (2, 3, 6, 5)]),
    ("bij,jk->bik", [(2, 3, 4), (4, 5)]),
    ("abc,cd->dba", [(2, 3, 4), (4, 5)]),
    ("ijk,jl->il", [(2, 3, 4), (3, 5)]),
    ("bk,bk->b", [(3, 4), (3, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),
    ("bxij,bjk", [(2, 3, 4, 5), (2, 5, 6)]),
    ("ij->ji", [(3, 4)]),
    ("bij->bj", [(2, 3, 4)]),
]


@pytest.mark.parametrize(("equation", "shapes"), EINSUMS, ids=[e for e, _ in EINSUMS])
def test_einsum_matches_pytorch(equation, shapes):
    graph = _check(_Fn(lambda *xs: torch.einsum(equation, *xs)), _inputs(*shapes))
    assert _ops(graph) <= {"Transpose", "Reshape", "MatMul", "ReduceSum"}


def test_einsum_refuses_a_diagonal():
    with pytest.raises(intq.UnsupportedOpError, match="'ii->i'.*repeated within"):
        intq.from_torch(_Fn(lambda x: torch.einsum("ii->i", x)), (torch.zeros(3, 3),))


L2_NORMS = {
    "vector_norm": lambda x: torch.linalg.vector_norm(x, dim=-1),
    "norm_keepdim": lambda x: torch.norm(x, p=2, dim=(1, 2), keepdim=True),  # ConvNeXt-V2's GRN
    "vector_norm_all": lambda x: torch.linalg.vector_norm(x),
    "normalize": lambda x: F.normalize(x, dim=-1),  # SwiftFormer's attention
}


@pytest.mark.parametrize("name", list(L2_NORMS))
def test_l2_norm_matches_pytorch(name):
    graph = _check(_Fn(L2_NORMS[name]), _inputs(X))
    assert {"Mul", "ReduceSum", "Sqrt"} <= _ops(graph)


def test_l2_normalize_quantizes_to_an_integer_norm_and_quotient():
    """``F.normalize(x, dim=-1)`` from the PyTorch import: one ``QReduceL2`` (the sum of
    squares and a division-free square root) and one ``QDiv``, close to the float op."""
    graph = intq.from_torch(_Fn(lambda x: F.normalize(x, dim=-1)), (torch.ones(2, 8),))
    feeds = [{graph.inputs[0].name: x} for x in _inputs((2, 8), (2, 8), (2, 8))]
    lowered = intq.quantize(graph, feeds, intq.QuantConfig(progress=False))
    assert {"QReduceL2", "QDiv"} <= _ops(lowered)
    got = intq.compile(lowered).run(feeds[0])
    want = intq.compile(graph).run(feeds[0])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=0.02)


def test_vector_norm_refuses_other_orders():
    with pytest.raises(intq.UnsupportedOpError, match="ord=1"):
        intq.from_torch(_Fn(lambda x: torch.linalg.vector_norm(x, ord=1)), (torch.ones(3),))


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


def _affine(module: nn.Module, channels: int) -> nn.Module:
    """``module`` with a non-trivial affine (torch starts it at 1 and 0)."""
    with torch.no_grad():
        module.weight.copy_(torch.linspace(-1.5, 2.0, channels))
        module.bias.copy_(torch.linspace(0.5, -1.0, channels))
    return module


NORMS = {
    "group_norm": (_affine(nn.GroupNorm(2, 4), 4), X),
    "group_norm_one_group": (_affine(nn.GroupNorm(1, 4), 4), X),
    "group_norm_no_affine": (nn.GroupNorm(4, 4, affine=False), (2, 4, 7)),
    "native_group_norm": (
        _Fn(lambda x: torch.ops.aten.native_group_norm(x, None, None, 2, 4, 36, 2, 1e-3)[0]),
        X,
    ),
    "instance_norm2d": (_affine(nn.InstanceNorm2d(4, affine=True), 4), X),
    "instance_norm1d": (nn.InstanceNorm1d(4), (2, 4, 9)),
    "instance_norm_running_stats": (nn.InstanceNorm2d(4, track_running_stats=True), X),
    "batch_norm_one_sample_batch_stats": (
        _Fn(lambda x: F.batch_norm(x, None, None, training=True, eps=1e-3)),
        (1, 4, 5, 5),
    ),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_normalizations_match_pytorch(name):
    module, shape = NORMS[name]
    graph = _check(module, _inputs(shape))
    assert "LayerNormalization" in _ops(graph) or name == "instance_norm_running_stats"


class _StdConv(nn.Module):
    """BiT's weight-standardized convolution: the weight's own batch norm, a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        flat = F.batch_norm(w.reshape(1, 6, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, flat.reshape_as(w))


def test_weight_standardization_folds_to_a_constant_weight():
    torch.manual_seed(0)
    graph = _check(_StdConv(), _inputs(X))
    assert [node.op for node in graph] == ["Conv"]


def test_batch_statistics_of_several_samples_are_refused():
    module = _Fn(lambda x: F.batch_norm(x, None, None, training=True))
    with pytest.raises(intq.UnsupportedOpError, match="more than one sample"):
        intq.from_torch(module.eval(), (torch.randn(2, 4, 3, 3),))
