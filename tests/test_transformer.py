"""Integer-only transformers end to end: pattern fusion, MiniLM quantized integer-only,
bit-exact on ONNX Runtime, and close to FP32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import intq
from intq.backends.onnxruntime import onnx_census
from intq.passes import pipeline
from intq.passes.integer_only import census


def _export(module: nn.Module, x: torch.Tensor, path) -> intq.ir.Graph:
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    import onnx

    model = onnx.load(str(path))
    model.ir_version = 8
    return intq.from_onnx(model)


class _Decomposed(nn.Module):
    """GELU (erf and tanh forms) and a hand-written LayerNorm, as exporters spell them."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.beta = nn.Parameter(torch.linspace(-0.2, 0.2, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x * 0.5 * (1.0 + torch.erf(x / 1.4142135623730951))
        b = 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3))))
        y = a + b
        mean = y.mean(-1, keepdim=True)
        var = ((y - mean) ** 2).mean(-1, keepdim=True)
        return (y - mean) / torch.sqrt(var + 1e-5) * self.gamma + self.beta


def test_exported_gelu_and_layernorm_forms_are_fused(tmp_path):
    x = torch.randn(2, 3, 8)
    graph = _export(_Decomposed().eval(), x, tmp_path / "m.onnx")
    want = intq.compile(graph, "reference").run({"x": x.numpy()})
    pipeline("fuse-transformer,dce")(graph)
    ops = [n.op for n in graph]
    assert ops.count("Gelu") == 2 and ops.count("LayerNormalization") == 1
    assert sorted({n.attrs["approximate"] for n in graph if n.op == "Gelu"}) == ["none", "tanh"]
    assert not {"Erf", "Tanh", "Sqrt", "ReduceMean", "Pow"} & set(ops)
    got = intq.compile(graph, "reference").run({"x": x.numpy()})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=2e-3)


def test_a_near_miss_is_left_alone(tmp_path):
    class NotGelu(nn.Module):
        def forward(self, x):
            return x * 0.5 * (1.0 + torch.erf(x / 2.0))  # not x / sqrt(2)

    graph = _export(NotGelu(), torch.randn(4), tmp_path / "n.onnx")
    pipeline("fuse-transformer")(graph)
    assert "Gelu" not in [n.op for n in graph]


@pytest.fixture(scope="module")
def minilm_int8(minilm_model):
    graph = intq.from_onnx(minilm_model.path)
    return graph, intq.quantize(graph, [minilm_model.inputs])


def test_minilm_is_integer_only_and_close_to_fp32(minilm_int8, minilm_model):
    graph, quantized = minilm_int8
    result = census(quantized)
    assert result.violations == [] and result.divisions == 0
    assert {"QSoftmax", "QGelu", "QLayerNorm", "QBatchMatMul", "QMatMul"} <= set(result.ops)
    # Only the output is float: one Dequantize, nothing after it.
    assert result.ops["Dequantize"] == 1 and result.float_tail == []
    feeds = minilm_model.inputs
    fp32 = intq.compile(graph, "reference").run(feeds)["last_hidden_state"]
    out = intq.compile(quantized, "reference").run(feeds)["last_hidden_state"]
    mask = feeds["attention_mask"].astype(np.float32)
    m = mask[..., None]
    a, b = (fp32 * m).sum(1) / m.sum(1), (out * m).sum(1) / m.sum(1)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() >= 0.99


def test_minilm_onnxruntime_is_bit_exact_and_integer_only(minilm_int8, minilm_model):
    _, quantized = minilm_int8
    exe = intq.compile(quantized, "onnxruntime")
    counts = onnx_census(exe.model)
    assert "Div" not in counts and counts["MatMulInteger"] >= 48
    feeds = dict(minilm_model.inputs)
    want = intq.compile(quantized, "reference").run(feeds)
    np.testing.assert_array_equal(exe.run(feeds)["last_hidden_state"], want["last_hidden_state"])
    # Other token ids and a mask with a fully masked row (nothing kept: all positions).
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 30522, feeds["input_ids"].shape).astype(np.int64),
        "attention_mask": np.stack([np.ones(16), np.zeros(16)]).astype(np.int64),
    }
    want = intq.compile(quantized, "reference").run(feeds)
    np.testing.assert_array_equal(exe.run(feeds)["last_hidden_state"], want["last_hidden_state"])


def test_minilm_tvm_is_bit_exact(minilm_int8, minilm_model):
    if "tvm" not in intq.backends.TARGETS:
        pytest.skip("TVM is not installed")
    _, quantized = minilm_int8
    exe = intq.compile(quantized, "tvm")
    rng = np.random.default_rng(1)
    masked = {
        "input_ids": rng.integers(0, 30522, (2, 16)).astype(np.int64),
        "attention_mask": np.stack([np.ones(16), np.zeros(16)]).astype(np.int64),
    }
    for feeds in (minilm_model.inputs, masked):
        want = intq.compile(quantized, "reference").run(feeds)["last_hidden_state"]
        np.testing.assert_array_equal(exe.run(feeds)["last_hidden_state"], want)


def test_token_ids_outside_the_vocabulary_are_refused(minilm_int8, minilm_model, tmp_path):
    _, quantized = minilm_int8
    feeds = dict(minilm_model.inputs)
    feeds["input_ids"] = feeds["input_ids"].copy()
    feeds["input_ids"][0, 3] = 30522
    executables = [intq.compile(quantized, t) for t in ("reference", "onnxruntime", "tvm")]
    # A saved TVM module has only its manifest to check against: the tables are in it.
    executables.append(intq.load(executables[-1].save(tmp_path / "minilm.so")))
    for exe in executables:
        with pytest.raises(intq.ShapeError, match="30522, outside.*word_embeddings"):
            exe.run(feeds)


def test_dividing_variants_are_listed_by_the_census(minilm_model):
    config = intq.QuantConfig(kernels={"softmax": "shift", "gelu": "shift", "layernorm": "isqrt"})
    quantized = intq.quantize(intq.from_onnx(minilm_model.path), [minilm_model.inputs], config)
    result = census(quantized, allow_division=True)
    assert result.divisions == 6 + 6 + 13
    i_bert = intq.QuantConfig(
        kernels={"softmax": "poly", "gelu": "poly"}
    )  # only its softmax divides
    assert i_bert.divides
    graph = intq.quantize(intq.from_onnx(minilm_model.path), [minilm_model.inputs], i_bert)
    assert census(graph, allow_division=True).divisions == 6
    assert any("QSoftmax" in d for d in result.division_nodes)
    with pytest.raises(intq.NumericsError, match="divides at run time"):
        intq.passes.integer_only.check_integer_only(quantized)
    model = intq.compile(quantized, "onnxruntime").model
    with pytest.raises(intq.NumericsError, match="divides at run time"):
        onnx_census(model)
    assert onnx_census(model, allow_division=True)["Div"] >= 25


def test_unknown_variant_is_refused():
    with pytest.raises(intq.IntqError, match="softmax variant"):
        intq.QuantConfig(kernels={"softmax": "exact"})


# ----- position ids computed from the token ids (RoBERTa, MPNet) ---------------------------------


class _PositionIds(nn.Module):
    """RoBERTa's embeddings: position ids ``cumsum(ids != pad) * (ids != pad) + pad`` from the
    token ids, the buffered token type ids gathered by them, three lookups and a LayerNorm."""

    def __init__(self, table: int = 20) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(32, 8)
        self.positions = nn.Embedding(table, 8)
        self.types = nn.Embedding(1, 8)
        self.register_buffer("token_type_ids", torch.zeros(1, table, dtype=torch.long))
        self.norm = nn.LayerNorm(8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids.ne(1).int()
        positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + 1
        types = torch.gather(self.token_type_ids.expand(ids.shape[0], -1), 1, positions)
        return self.norm(self.words(ids) + self.positions(positions) + self.types(types))


def _token_batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        ids = rng.integers(2, 32, (2, 12)).astype(np.int64)
        ids[0, -3:] = 1  # padding at the end, as a tokenizer batch has
        batches.append({"ids": ids})
    return batches


def _position_ids_graph(path, table: int = 20) -> intq.ir.Graph:
    import onnx

    ids = torch.from_numpy(_token_batches(1, 0)[0]["ids"])
    torch.onnx.export(
        _PositionIds(table), (ids,), str(path), dynamo=False, opset_version=17, input_names=["ids"]
    )
    model = onnx.load(str(path))
    model.ir_version = 8
    return intq.from_onnx(model)


@pytest.mark.parametrize("route", ["onnx", "torch"])
def test_position_ids_from_token_ids_are_exact_integer_arithmetic_on_every_backend(tmp_path, route):
    """``Equal``, ``Not``, ``Cast``, ``CumSum``, ``Mul``, ``Add`` and ``GatherElements`` of raw
    int64 token ids stay the same ops in the integer graph (no scale, exact, proven to fit
    their dtypes); every backend computes the same integers, close to the float model. The
    PyTorch route (``aten.cumsum``, ``type_as``, ``gather``) gives the same ops."""
    if route == "onnx":
        graph = _position_ids_graph(tmp_path / "positions.onnx")
    else:
        ids = torch.from_numpy(_token_batches(1, 0)[0]["ids"])
        graph = intq.from_torch(_PositionIds(), (ids,))
    calibration = _token_batches(8, 1)
    lowered = intq.quantize(graph, calibration)
    ops = {node.op for node in lowered}
    assert {"Equal", "Not", "CumSum", "Mul", "Add", "GatherElements"} <= ops
    assert not census(lowered).violations
    reference = intq.compile(lowered, target="reference")
    test = _token_batches(3, 2)
    for target in ("onnxruntime", "tvm"):
        if target not in intq.backends.TARGETS:
            continue
        compiled = intq.compile(lowered, target=target)
        for feed in test:
            want = reference.run(feed)
            for name, got in compiled.run(feed).items():
                np.testing.assert_array_equal(got, want[name], err_msg=f"{target}: {name}")
    float_model = intq.compile(graph, target="reference")
    for feed in test:
        (want,) = float_model.run(feed).values()
        (got,) = reference.run(feed).values()
        cosine = (want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got)
        assert cosine > 0.999


def test_position_ids_beyond_the_table_are_refused_naming_the_node():
    """Twelve tokens count up to position 12: a 10-entry buffer cannot hold them, and the range
    analysis refuses the GatherElements that could read past it (no backend checks)."""
    from intq.passes.range_analysis import analyze_ranges

    text = """
    graph main(%ids: i64[1,12]) {
      %pad = const i64[] [1]
      %buffer = const i64[1,10] [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
      %e = Equal(%ids, %pad) : bool[1,12]
      %keep = Not(%e) : bool[1,12]
      %m = Cast(%keep) {to="i64"} : i64[1,12]
      %p = CumSum(%m) {axis=1, exclusive=0, reverse=0} : i64[1,12]
      %t = GatherElements(%buffer, %p) {axis=1} : i64[1,12] @"types"
      return %t
    }
    """
    graph = intq.ir.from_text(text)
    with pytest.raises(intq.NumericsError, match=r"reach \[0, 12\], outside the axis of 10") as err:
        analyze_ranges(graph)
    assert "types" in str(err.value)
