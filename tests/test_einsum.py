"""Attention written with ``torch.einsum``, as Hugging Face CvT exports it: ONNX ``Einsum`` and
ATen ``aten.einsum.default`` decompose into Transpose, Reshape and MatMul, which quantize to
QBatchMatMul (``Q K^T``, ``P V``) and QMatMul (the projections), integer-only and bit-exact on
every backend. The equations one by one are in ``test_onnx_ops.py`` and ``test_torch_ops.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import intq
from intq.passes.integer_only import census

HEADS, DIM, TOKENS = 2, 16, 6


class _EinsumAttention(nn.Module):
    """CvT's self-attention: einsum ``"bhlk,bhtk->bhlt"``, softmax, ``"bhlt,bhtv->bhlv"``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.out = nn.Linear(DIM, DIM)
        self.scale = (DIM // HEADS) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, HEADS, DIM // HEADS).permute(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.einsum("bhlk,bhtk->bhlt", q, k) * self.scale
        context = torch.einsum("bhlt,bhtv->bhlv", torch.softmax(scores, dim=-1), v)
        return self.out(context.permute(0, 2, 1, 3).reshape(b, t, DIM))


def _feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(2, TOKENS, DIM)).astype(np.float32)}


def _from_onnx(module: nn.Module, path) -> intq.ir.Graph:
    import onnx

    args = (torch.from_numpy(_feeds(0)["x"]),)
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=["x"])
    model = onnx.load(str(path))
    model.ir_version = 8
    assert [n.op_type for n in model.graph.node].count("Einsum") == 2
    return intq.from_onnx(model)


def _from_torch(module: nn.Module, path) -> intq.ir.Graph:
    return intq.from_torch(module, (torch.from_numpy(_feeds(0)["x"]),), input_names=["x"])


def _backends() -> list[str]:
    return [t for t in ("onnxruntime", "tvm") if t in intq.backends.TARGETS]


@pytest.mark.parametrize("source", [_from_onnx, _from_torch], ids=["onnx", "torch"])
def test_einsum_attention_is_integer_only_and_bit_exact(source, tmp_path):
    torch.manual_seed(0)
    module = _EinsumAttention().eval()
    graph = source(module, tmp_path / "attention.onnx")
    assert "Einsum" not in {n.op for n in graph}
    feeds = _feeds(42)
    with torch.no_grad():
        want = module(torch.from_numpy(feeds["x"])).numpy()
    (float_out,) = intq.compile(graph, "reference").run(feeds).values()
    np.testing.assert_allclose(float_out, want, rtol=1e-5, atol=1e-5)

    quantized = intq.quantize(graph, [_feeds(s) for s in range(1, 9)])
    result = census(quantized)
    assert result.violations == [] and result.float_tail == []
    assert result.ops.get("QBatchMatMul") == 2 and {"QMatMul", "QSoftmax"} <= set(result.ops)
    (ref,) = intq.compile(quantized, "reference").run(feeds).values()
    # 8-bit activations through two matmuls and a softmax: close to float, not equal.
    assert np.abs(ref - want).max() < 0.1 * np.ptp(want)
    for target in _backends():
        (got,) = intq.compile(quantized, target).run(feeds).values()
        np.testing.assert_array_equal(got, ref, err_msg=target)
