"""``intq.from_torch``: real packaged PyTorch modules give graphs computing what PyTorch does."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import intq
from examples import zoo
from intq.frontends.torch_import import TorchExportFallbackWarning

# Float32 graphs computed op by op in numpy against PyTorch's fused kernels: the largest
# difference measured was 5e-7 of the output range (ResNet-18-shaped).
TOLERANCE = 1e-5


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.ptp(want))


def _check(module: nn.Module, inputs: dict[str, np.ndarray], **kwargs) -> intq.ir.Graph:
    graph = intq.from_torch(module, tuple(torch.from_numpy(a) for a in inputs.values()), **kwargs)
    with torch.no_grad():
        want = module(*(torch.from_numpy(a) for a in inputs.values())).numpy()
    feeds = {v.name: a for v, a in zip(graph.inputs, inputs.values())}
    got = intq.compile(graph).run(feeds)[graph.outputs[0].name]
    assert got.shape == want.shape
    assert _relative_error(got, want) <= TOLERANCE
    return graph


def test_digits_cnn_matches_pytorch_and_names_nodes_by_module_path(digits_model):
    start = time.perf_counter()
    module = zoo.digits_cnn_module()
    graph = _check(module, digits_model.inputs, output_names=["logits"])
    assert [v.name for v in graph.inputs] == ["x"] and graph.outputs[0].name == "logits"
    labels = {node.label() for node in graph}
    assert {"features.0", "features.1", "classifier.1", "classifier.3"} <= labels
    assert "features.0.weight" in {v.name for v in graph.constants}
    # Integer-only conversion works on it unchanged, and keeps the module paths.
    calibration = [{"x": zoo._digits_split()[0][i : i + 8]} for i in range(0, 64, 8)]
    int_graph = intq.quantize(graph, calibration)
    assert "features.0" in {node.label() for node in int_graph}
    assert time.perf_counter() - start < 60


def test_resnet18_like_matches_pytorch(resnet18_model):
    graph = _check(zoo.resnet18_like_module(), resnet18_model.inputs)
    labels = {node.label() for node in graph}
    assert "layer3.1.conv2" in labels and "layer2.0.downsample.0" in labels
    by_label = {node.label(): node.op for node in graph}
    assert by_label["layer1.0"] == "Add"  # the block's own op: the residual add
    assert by_label["layer1.0.relu/relu_1"] == "Relu"  # a module run twice names each call


def test_efficientnet_lite0_matches_pytorch(efficientnet_model):
    graph = _check(zoo.efficientnet_lite0_module(), efficientnet_model.inputs)
    census = {node.op for node in graph}
    assert {"Conv", "Clip", "Pad", "GlobalAveragePool", "Gemm"} <= census


def test_minilm_bert_matches_pytorch(minilm_model):
    module = zoo.minilm_module()
    graph = _check(module, minilm_model.inputs)
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask"]
    ops = {node.op for node in graph}
    assert {"Gather", "LayerNormalization", "Softmax", "Gelu", "MatMul"} <= ops
    assert "bert.encoder.layer.5.attention.self.query" in {node.label() for node in graph}
    # The integer transformer lowering takes it unchanged: integer-only MiniLM from PyTorch
    # (bit-equal to the ONNX route's, measured), mean-pooled cosine to PyTorch >= 0.99.
    int_graph = intq.quantize(graph, [minilm_model.inputs], intq.QuantConfig(progress=False))
    assert {"QSoftmax", "QGelu", "QLayerNorm", "QBatchMatMul"} <= {n.op for n in int_graph}
    hidden = intq.compile(int_graph).run(minilm_model.inputs)["output"]
    with torch.no_grad():
        args = (torch.from_numpy(a) for a in minilm_model.inputs.values())
        want = module(*args).numpy()
    mask = minilm_model.inputs["attention_mask"][..., None]
    a, b = (hidden * mask).sum(1) / mask.sum(1), (want * mask).sum(1) / mask.sum(1)
    assert (
        np.min(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)) >= 0.99
    )


class _Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, (1,))


class _WithUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.block = nn.Sequential(nn.ReLU(), _Flip())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.conv(x))


def test_unsupported_aten_op_names_the_module_path():
    with pytest.raises(intq.UnsupportedOpError) as info:
        intq.from_torch(_WithUnsupported(), torch.zeros(1, 1, 6, 6))
    assert info.value.node == "block.1"
    assert "aten.flip" in str(info.value) and "_Flip" in str(info.value)
    assert "intq.from_onnx" in info.value.hint


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export refuses, the tracer follows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return torch.relu(self.fc(x))
        return self.fc(x)


def test_falls_back_to_onnx_with_a_warning():
    module = _DataDependent().eval()
    x = torch.ones(2, 4)
    with pytest.warns(TorchExportFallbackWarning, match="torch.export cannot capture"):
        graph = intq.from_torch(module, x)
    got = intq.compile(graph).run({"x": x.numpy()})
    with torch.no_grad():
        want = module(x).numpy()
    assert np.allclose(next(iter(got.values())), want, atol=1e-6)
    with warnings.catch_warnings(), pytest.raises(intq.ModelImportError, match="torch.export"):
        warnings.simplefilter("ignore")
        intq.from_torch(module, x, fallback=False)


def test_training_mode_is_restored_and_bad_inputs_are_refused():
    module = zoo.DigitsCNN().train()
    intq.from_torch(module, torch.zeros(2, 1, 8, 8))
    assert module.training and module.features[1].training
    with pytest.raises(intq.ShapeError, match="not a tensor"):
        intq.from_torch(module, ["not a tensor"])
    with pytest.raises(intq.ModelImportError, match=r"torch\.nn\.Module"):
        intq.from_torch("model.onnx", torch.zeros(1))


def test_readme_lists_every_supported_aten_op():
    from pathlib import Path

    from intq.frontends.torch_import import supported_aten_ops

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    flat = " ".join(readme.split())
    missing = [op for op in supported_aten_ops() if op.removeprefix("aten.") not in flat]
    assert not missing, f"README's ATen op list is stale: {missing}"
