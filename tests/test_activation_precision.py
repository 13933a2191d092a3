"""Activation widths in the mixed-precision ILP: the program with (weight, activation) pairs,
where a width is set in the graph, the measured activation sensitivity, the plan through
``intq.quantize`` on both backends, and the config file and CLI spellings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import intq
from intq.backends.onnxruntime import compile_onnxruntime, onnx_census
from intq.backends.tvm import compile_tvm
from intq.cli import main
from intq.config import load_config
from intq.inspection import layer_table
from intq.ir import to_text
from intq.mixed_precision import LatencyTable, MixedPrecision, activation_choice, plan_bits
from intq.passes import PREPARE, pipeline
from intq.passes.bit_allocation import (
    ActivationCosts,
    Budget,
    InfeasibleBudgetError,
    LayerCosts,
    allocate_bits,
)
from intq.passes.calibration import ClipRule
from intq.passes.precision import activation_sites, quantizable_layers
from intq.semantics.numpy_eval import run_graph

PAIRS = [(4, 8), (4, 16), (8, 8), (8, 16)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- the program ------------------------------------------------------------------------------


def _layer(name: str, omega4: float, omega8: float, pairs=PAIRS) -> LayerCosts:
    return LayerCosts.from_counts(name, {4: omega4, 8: omega8}, params=100, macs=1000, pairs=pairs)


def test_budget_buys_the_activation_width_where_it_pays_most() -> None:
    layers = [_layer("a", 1.0, 0.1), _layer("b", 0.5, 0.05)]
    acts = [
        ActivationCosts("xa", {8: 5.0, 16: 0.0}, ("a",)),
        ActivationCosts("xb", {8: 0.2, 16: 0.0}, ("b",)),
    ]
    # No budget: every decision at its least perturbation.
    free = allocate_bits(layers, Budget(), activations=acts)
    assert free.bits == {"a": 8, "b": 8} and free.input_bits == {"a": 16, "b": 16}
    assert free.bops == 2 * 1000 * 8 * 16
    # Room for one 8x16 and one 8x8 layer: the 16 bits go to the sensitive input.
    one = allocate_bits(layers, Budget(bops=1000 * 8 * 16 + 1000 * 8 * 8), activations=acts)
    assert one.input_bits == {"a": 16, "b": 8} and one.bits == {"a": 8, "b": 8}
    assert one.perturbation == pytest.approx(0.1 + 0.05 + 0.0 + 0.2)
    # Only 8x8 BOPs everywhere: trading a's weights to 4 bits buys its 16-bit input.
    tight = allocate_bits(layers, Budget(bops=2 * 1000 * 8 * 8), activations=acts)
    assert tight.input_bits == {"a": 16, "b": 8} and tight.bits == {"a": 4, "b": 8}
    assert tight.bops == 2 * 1000 * 8 * 8
    # Below every pair's BOPs: the fewest are 4-bit weights and 8-bit inputs everywhere.
    with pytest.raises(InfeasibleBudgetError, match="fewest BOPs") as info:
        allocate_bits(layers, Budget(bops=1000), activations=acts)
    assert info.value.smallest["bops"] == 2 * 1000 * 4 * 8
    assert "activations (read by):" in one.table() and "in bits" in one.table()


def test_readers_share_a_width_and_disallowed_pairs_are_never_chosen() -> None:
    # b may not take 16-bit inputs with 8-bit weights (an accumulator that could overflow).
    layers = [_layer("a", 1.0, 0.0), _layer("b", 1.0, 0.0, pairs=[(4, 8), (4, 16), (8, 8)])]
    shared = [ActivationCosts("x", {8: 1.0, 16: 0.0}, ("a", "b"))]
    free = allocate_bits(layers, Budget(), activations=shared)
    # 16-bit x (Ω 1 saved) forces b to 4-bit weights (Ω 1 paid): 8 bits everywhere ties at
    # Ω 1 with a at (8, 16) and b at (4, 16); either way the readers agree and b avoids (8, 16).
    assert free.input_bits["a"] == free.input_bits["b"]
    assert (free.bits["b"], free.input_bits["b"]) != (8, 16)
    assert free.perturbation == pytest.approx(1.0)
    pinned = allocate_bits(layers, Budget(), pins={"b": 8}, activations=shared)
    assert pinned.input_bits == {"a": 8, "b": 8}


def test_one_activation_width_gives_the_weights_only_answer() -> None:
    layers = [_layer("a", 1.0, 0.1), _layer("b", 0.5, 0.05), _layer("c", 0.3, 0.0)]
    acts = [ActivationCosts(n, {8: 0.0}, (n,)) for n in "abc"]
    for budget in (Budget(size_mb=220 * 8 / 8 / 2**20), Budget(bops=1000 * 8 * 20)):
        plain = allocate_bits(layers, budget)
        paired = allocate_bits(layers, budget, activations=acts)
        assert paired.bits == plain.bits
        assert paired.perturbation == plain.perturbation and paired.bops == plain.bops


# ----- where a width is set ---------------------------------------------------------------------


class _Branches(nn.Module):
    """conv1 -> relu -> pool -> conv2, and conv3 on the pooled tensor too, added."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool(self.relu(self.conv1(x)))
        return self.conv2(p) + self.conv3(p)


def test_activation_sites_reach_through_relu_and_pools_and_join_shared_readers() -> None:
    x = torch.zeros(1, 2, 6, 6)
    graph = intq.from_torch(_Branches().eval(), (x,), input_names=["x"])
    pipeline(PREPARE)(graph)
    layers = quantizable_layers(graph)
    sites = activation_sites(graph, layers)
    names = [layer.name for layer in layers]
    assert [s.readers for s in sites] == [(names[0],), (names[1], names[2])]
    assert sites[0].keys == ("x",)
    # Whichever of pool/relu/conv1 the lowering materializes, its width is the site's.
    assert len(sites[1].keys) == 3 and sites[1].keys[-1] == names[0]
    chain = {node.name: node.op for node in graph if node.name in sites[1].keys}
    assert sorted(chain.values()) == ["Conv", "MaxPool", "Relu"]


def test_no_16_bit_input_where_the_accumulator_could_overflow() -> None:
    # 4096 full-scale weights per output: |acc| could reach 4096 * 127 * 2^16 > 2^31 (8-bit
    # weights) and 4096 * 7 * 2^16 > 2^30 (4-bit): only 8-bit inputs are offered.
    net = nn.Sequential(nn.Linear(4096, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        net[0].weight.copy_(torch.sign(torch.randn(4, 4096)))
    batches = [{"x": np.random.default_rng(0).standard_normal((2, 4096)).astype(np.float32)}]
    graph = intq.from_torch(net, (torch.from_numpy(batches[0]["x"]),), input_names=["x"])
    pipeline(PREPARE)(graph)
    layers = quantizable_layers(graph)
    mp = MixedPrecision(activation_bits=(8, 16), sensitivity="direct")
    choice = activation_choice(graph, batches, layers, mp, (8, 16), ClipRule("minmax"))
    assert choice.pairs[layers[0].name] == [(4, 8), (8, 8)]
    assert choice.pairs[layers[1].name] == [(4, 8), (4, 16), (8, 8), (8, 16)]


def test_latency_table_pairs_round_trip(tmp_path) -> None:
    table = LatencyTable({"fc": {4: 1.0, 8: 1.5}}, pairs={"fc": {(4, 16): 2.0, (8, 16): 2.5}})
    loaded = LatencyTable.load(table.save(tmp_path / "t.json"))
    assert loaded.pairs == table.pairs
    got = loaded.for_pairs("fc", [(4, 8), (8, 16)])
    assert got == {(4, 8): 1.0, (8, 16): 2.5}
    with pytest.raises(intq.IntqError, match="no entry for 8-bit weights with 12-bit") as info:
        loaded.for_pairs("fc", [(8, 12)])
    assert info.value.node == "fc"
    text = (tmp_path / "t.json").read_text().replace('"4x16"', '"4by16"')
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(intq.ArtifactError, match="malformed pairs"):
        LatencyTable.load(tmp_path / "bad.json")


# ----- through intq.quantize --------------------------------------------------------------------


def _outlier_mlp() -> tuple[intq.ir.Graph, list[dict[str, np.ndarray]]]:
    """Four Linear layers; the third reads one channel 1000x the others (and weighs it
    1/1000): min/max 8-bit quantization of that input rounds every other channel to 0."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip
    with torch.no_grad():
        net[2].weight[0] *= 1000
        net[2].bias[0] *= 1000
        net[4].weight[:, 0] /= 1000
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(4)]
    graph = intq.from_torch(net, (torch.from_numpy(batches[0]["x"]),), input_names=["x"])
    return graph, batches


@pytest.fixture(scope="module")
def outlier_mlp() -> tuple[intq.ir.Graph, list[dict[str, np.ndarray]]]:
    return _outlier_mlp()


MACS = 16 * 32 + 32 * 32 + 32 * 32 + 32 * 10
ALL_8X8 = MACS * 8 * 8


def _input_bits(graph: intq.ir.Graph) -> dict[str, str]:
    return {row["layer"]: row["input"].split(" ")[0] for row in layer_table(graph)}


def test_plan_measures_the_outlier_input_as_the_sensitive_one(outlier_mlp) -> None:
    graph, batches = outlier_mlp
    prepared = graph.copy()
    pipeline(PREPARE)(prepared)
    mp = MixedPrecision(candidates=(8,), activation_bits=(8, 16), sensitivity="direct")
    plan = plan_bits(prepared, batches, mp, clip=ClipRule("minmax"))
    omega = plan.activation_perturbation
    sensitive = max(omega, key=lambda n: omega[n][8] - omega[n][16])
    readers = {site.value: site.readers for site in plan.sites}
    assert readers[sensitive] == (quantizable_layers(prepared)[2].name,)
    others = [n for n in omega if n != sensitive]
    assert all(omega[sensitive][8] > 1000 * omega[n][8] for n in others)
    assert omega[sensitive][16] < omega[sensitive][8] / 1000


def test_budget_decides_the_16_bit_input_bit_exactly_on_both_backends(outlier_mlp) -> None:
    graph, batches = outlier_mlp
    layers = [layer.name for layer in quantizable_layers(graph)]
    feeds = {"x": np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)}
    errors = {}
    for extra, want in ((0, "u8"), (32 * 32 * 8 * 8, "u16")):
        mp = MixedPrecision(
            bops=ALL_8X8 + extra, candidates=(8,), activation_bits=(8, 16), sensitivity="direct"
        )
        config = intq.QuantConfig(calibration="minmax", mixed_precision=mp)
        quantized = intq.quantize(graph, batches, config)
        inputs = _input_bits(quantized)
        assert inputs[layers[2]] == want
        assert inputs[layers[1]] == "u8" and inputs[layers[3]] == "u8"
        expected = run_graph(quantized, feeds)
        # TVM for the 16-bit input only: the all-8-bit graph is what every other test runs.
        backends = [compile_onnxruntime(quantized)]
        if want == "u16":
            backends.append(compile_tvm(quantized))
        for exe in backends:
            got = exe.run(feeds)
            for name in expected:
                np.testing.assert_array_equal(got[name], expected[name])
        with torch.no_grad():
            net_out = run_graph(graph, feeds)
        errors[want] = max(float(np.abs(expected[n] - net_out[n]).max()) for n in net_out)
    assert errors["u16"] < errors["u8"] / 3


def test_default_keeps_every_activation_at_activation_bits(outlier_mlp) -> None:
    graph, batches = outlier_mlp
    prepared = graph.copy()
    pipeline(PREPARE)(prepared)
    budget = (16 * 32 * 8 + 32 * 32 * 4 + 32 * 32 * 8 + 32 * 10 * 8) / 8 / 2**20
    plans = [
        plan_bits(prepared, batches, MixedPrecision(size_mb=budget, **extra), clip=None)
        for extra in ({}, {"activation_bits": (8,)})
    ]
    assert plans[0].sites == () and plans[1].sites == ()
    assert plans[0].allocation == plans[1].allocation
    assert plans[0].layer_bits() == plans[1].layer_bits()


@pytest.mark.parametrize(
    "pool, relu",
    [
        (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), False),  # i16, padded, ceil
        (nn.MaxPool2d(2, dilation=2), True),  # u16, dilated
    ],
)
def test_16_bit_maxpool_is_bit_exact_on_both_backends(pool: nn.Module, relu: bool) -> None:
    # ONNX Runtime's MaxPool takes 8-bit integers only: 16-bit inputs take strided slices.
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 4, 3, padding=1), *([nn.ReLU()] if relu else []), pool]
    net = nn.Sequential(*layers, nn.Conv2d(4, 4, 1)).eval()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 2, 9, 9)).astype(np.float32)} for _ in range(3)]
    graph = intq.from_torch(net, (torch.from_numpy(batches[0]["x"]),), input_names=["x"])
    config = intq.QuantConfig(activation_bits=16, calibration="minmax")
    quantized = intq.quantize(graph, batches, config)
    pooled = next(node for node in quantized if node.op == "MaxPool")
    assert pooled.output.type.dtype.name == ("U16" if relu else "I16")
    expected = run_graph(quantized, batches[1])
    ort = compile_onnxruntime(quantized)
    assert "MaxPool" not in onnx_census(ort.model)
    for exe in (ort, compile_tvm(quantized)):
        got = exe.run(batches[1])
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


class _Attention(nn.Module):
    """One self-attention head of width 64 over 16 tokens: ``Q K^T`` and ``P V`` multiply
    two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 8.0
        return torch.softmax(scores, dim=-1) @ self.v(x)


def test_16_bit_activations_narrow_attention_operands_to_what_int32_holds() -> None:
    # 16-bit Q and K over 64 channels could reach 64 * 2^30 = 2^36; at 13 bits the worst
    # case 64 * 2^24 fits int32, and the range analysis proves it. V meets u8 probabilities
    # over 16 tokens (16 * 255 * 2^15 fits): it keeps 16 bits, so P V is a wide product.
    torch.manual_seed(0)
    net = _Attention().eval()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(3)]
    graph = intq.from_torch(net, (torch.from_numpy(batches[0]["x"]),), input_names=["x"])
    config = intq.QuantConfig(activation_bits=16, calibration="minmax", progress=False)
    quantized = intq.quantize(graph, batches, config)
    products = [node for node in quantized if node.op == "QBatchMatMul"]
    widths = [[v.type.quant.bits for v in node.inputs] for node in products]
    assert widths == [[13, 13], [8, 16]]
    expected = run_graph(quantized, batches[1])
    for exe in (compile_onnxruntime(quantized), compile_tvm(quantized)):
        got = exe.run(batches[1])
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


# ----- config file and command line -------------------------------------------------------------


def test_config_file_reads_activation_candidates(tmp_path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text("[mixed_precision]\nbops = 1e6\nactivation_bits = [16, 8]\n")
    assert load_config(path).mixed_precision.activation_bits == (8, 16)
    path.write_text("[mixed_precision]\nbops = 1e6\nactivation_bits = [8, 12]\n")
    with pytest.raises(intq.IntqError, match=r"cfg.toml: \[mixed_precision\]: candidate activa"):
        load_config(path)
    path.write_text('[mixed_precision]\nbops = 1e6\nactivation_bits = "16"\n')
    with pytest.raises(intq.IntqError, match="activation_bits"):
        load_config(path)


def test_cli_activation_candidates(outlier_mlp, tmp_path, capsys) -> None:
    graph, batches = outlier_mlp
    model = tmp_path / "mlp.intq"
    model.write_text(to_text(graph))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([b["x"] for b in batches]))
    args = ["quantize", str(model), "--calib", str(calib), "--calibration", "minmax", "--quiet"]
    out = tmp_path / "mlp_q.intq"
    budget = ["--bops", str(ALL_8X8 + 32 * 32 * 64), "--sensitivity", "direct"]
    flags = ["--activation-candidates", "8,16", "--mp-report", str(tmp_path / "mp")]
    assert main([*args, *budget, *flags, "-o", str(out)]) == 0
    assert "activations (read by):" in (tmp_path / "mp.txt").read_text()
    assert "u16" in out.read_text()
    assert main([*args, "--activation-candidates", "8,16", "-o", str(out)]) == 1
    assert "--activation-candidates" in capsys.readouterr().err
