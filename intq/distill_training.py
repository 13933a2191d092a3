"""The training loop of quantized distillation (:mod:`intq.distillation`), in plain PyTorch.

The student is a :class:`Student` module: its parameters are the float weights and biases of
the quantizable layers, each weight's per-channel step and each quantized activation's
threshold (as ``log`` multipliers of their post-training values, so that step 0 reproduces
the post-training integer graph exactly), or, with ``train=("rounding", ...)``, one rounding
variable per weight.

One step:

1. lower the current parameters with the integer lowering itself (:class:`Lowering`) and
   run the integer graph in the reference interpreter, keeping every integer value that
   stands for a float value of the source graph (the lowering's ``ints``) and every
   dequantized one (``floats``);
2. run the float graph with torch (the rules of :mod:`intq.semantics.torch_eval`), with
   fake-quantized weights and, at every value the lowering quantized, the LSQ fake quantizer
   of its learned threshold; then replace the value by the integer graph's, exactly
   (:class:`_Exact`: the forward takes the integer value times its scale, the backward
   passes the gradient to the fake-quantized value, the straight-through estimator);
3. the distillation loss to the teacher's outputs, backward, Adam.

So the forward pass computes the integer model bit for bit (its outputs are the reference
interpreter's), while the gradient is the fake-quant model's, taken at the integer model's
own activations. Under ``torchrun`` (a ``torch.distributed`` process group) the student is
wrapped in ``DistributedDataParallel`` and each process takes its share of every step's
batches; the held-out evaluation is split the same way and summed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from intq.distillation import DistillConfig, DistillHistory, Parameters, learned_lowering
from intq.errors import ArtifactError, IntqError
from intq.ir.graph import Graph, Node, Value
from intq.ir.types import QuantParams
from intq.passes.calibration import CalibrationStats
from intq.passes.integer_lowering import Lowering, bias_reader
from intq.passes.integer_rules import LOWERINGS
from intq.passes.integerize import Integerize
from intq.passes.model_quantization import ModelQuantization
from intq.passes.precision import quantizable_layers
from intq.progress import show_progress
from intq.semantics.numpy_eval import run_graph
from intq.semantics.torch_eval import TORCH

Tensor = torch.Tensor
Batch = Mapping[str, np.ndarray]


# ----- what the lowering quantizes ---------------------------------------------------------


class _Recorded:
    """Calibration statistics that remember the threshold the lowering took from them."""

    def __init__(self, stats: Any, name: str, out: dict[str, float]):
        self.stats, self.name, self.out = stats, name, out

    @property
    def min(self) -> float:
        return float(self.stats.min)

    def top(self, signed: bool) -> float:
        return float(self.stats.top(signed))

    def clip(self, method: str, bits: int, signed: bool, percentile: float = 99.99) -> float:
        threshold = float(self.stats.clip(method, bits, signed, percentile))
        self.out[self.name] = threshold
        return threshold


@dataclass(frozen=True)
class Activation:
    """A quantized activation with a learned threshold: its float value's name, its integer
    range and the divisor that turns the threshold into the scale."""

    name: str
    qmin: int
    qmax: int


@dataclass(frozen=True)
class Layer:
    """A quantizable layer's weight: its name, channel axis, width and bias's name."""

    weight: str
    axis: int
    bits: int
    bias: str | None


@dataclass(frozen=True)
class Plan:
    """What the student learns, found by lowering the float graph once."""

    layers: tuple[Layer, ...]
    activations: tuple[Activation, ...]
    thresholds: Mapping[str, float]  # the post-training ones, of every calibrated value
    minimums: Mapping[str, float]
    steps: Mapping[str, tuple[float, ...]]  # the post-training weight steps
    outputs: tuple[str, ...]  # the float values the loss compares (a Softmax's logits)
    start: Mapping[str, np.ndarray] = field(default_factory=dict)  # float weights, biases


def _quant(value: Value | None) -> QuantParams | None:
    return None if value is None else value.type.quant


def plan(
    prepared: Graph,
    lowering: Integerize,
    stats: Mapping[Value, Any],
    choices: Mapping[Value, Any] | None,
    start: Graph | None,
) -> Plan:
    """Lower ``prepared`` once with its calibration to learn which values are quantized and
    their post-training thresholds and steps (``start``'s, where it has them)."""
    recorded: dict[str, float] = {}
    proxies = {v: _Recorded(s, v.name, recorded) for v, s in stats.items()}
    options = replace_bias_correction(lowering)
    low = Lowering(prepared, proxies, options, None, choices)
    int_graph = low.run(LOWERINGS)
    minimums = {v.name: float(s.min) for v, s in stats.items() if v.name in recorded}
    thresholds = dict(recorded)
    activations = []
    for value, int_value in low.ints.items():
        q = _quant(int_value)
        if value.name not in recorded or q is None or q.axis is not None:
            continue
        if start is not None:
            given = _quant(start.find(int_value.name))
            if given is not None and (given.bits, given.signed, given.axis) == (
                q.bits,
                q.signed,
                None,
            ):
                thresholds[value.name] = threshold_of(given.scale[0], q.qmax)
        activations.append(Activation(value.name, q.qmin, q.qmax))
    layers, steps, labels = [], {}, {}
    for layer in quantizable_layers(prepared):
        node = prepared.find(layer.weight)
        assert node is not None
        reader = next(u.node for u in node.uses() if u.node.label() == layer.name)
        w_int = int_graph.find(layer.weight)
        q = _quant(w_int)
        if w_int is None or not w_int.is_const or q is None:
            continue  # not lowered as a layer (a weight the lowering treated otherwise)
        channels = node.type.shape[layer.axis]
        scales = tuple(q.scale) if len(q.scale) == channels else (q.scale[0],) * channels
        if start is not None:
            given = _quant(start.find(layer.weight))
            if given is not None and given.bits == q.bits and len(given.scale) in (1, channels):
                scales = tuple(given.scale) * (channels // len(given.scale))
        steps[layer.weight] = scales
        layers.append(Layer(layer.weight, layer.axis, q.bits, _bias_of(reader)))
        labels[layer.weight] = reader.label()
    outputs = []
    for value in prepared.outputs:
        producer = value.producer
        if producer is not None and producer.op == "Softmax":
            value = producer.inputs[0]  # type: ignore[assignment]
        outputs.append(value.name)
    found = Plan(tuple(layers), tuple(activations), thresholds, minimums, steps, tuple(outputs))
    if start is None:
        return found
    return replace(found, start=start_weights(prepared, found, labels, lowering, start))


def threshold_of(scale: float, qmax: int) -> float:
    """The threshold whose scale (``threshold / qmax``, as the lowering divides) is ``scale``
    to the bit: ``scale * qmax`` is, but for a rounding, one representable number off."""
    threshold = scale * qmax
    for _ in range(8):
        got = threshold / qmax
        if got == scale:
            break
        threshold = float(np.nextafter(threshold, np.inf if got < scale else -np.inf))
    return threshold


def start_weights(
    prepared: Graph, found: Plan, labels: Mapping[str, str], lowering: Integerize, start: Graph
) -> dict[str, np.ndarray]:
    """The float weights and biases from which the lowering, with the plan's thresholds and
    steps, makes ``start``'s integers, where the float model's own do not: a weight whose
    integer ``start`` rounded otherwise (learned rounding, or any other) starts at the centre
    of its integer's step, ``q * step``; a bias ``start`` changed (bias correction) at its
    integer times its scale. Everything else keeps the float model's value, and with it the
    position within the step that training moves from. So step 0 is ``start`` bit for bit."""
    steps = {
        layer.weight: (found.steps[layer.weight], layer.axis, layer.bits) for layer in found.layers
    }
    params = Parameters({}, found.thresholds, found.minimums, steps)
    graph = params.apply(prepared)
    stats, model = graph.analysis(CalibrationStats), graph.analysis(ModelQuantization)
    assert stats is not None and model is not None
    first = Lowering(graph, stats, learned_lowering(lowering), model).run(LOWERINGS)
    out: dict[str, np.ndarray] = {}
    for layer in found.layers:
        float_w = prepared.find(layer.weight)
        mine, given = first.find(layer.weight), start.find(layer.weight)
        assert float_w is not None and float_w.const is not None
        if _differs(mine, given):
            assert mine is not None and given is not None
            shape = [1] * float_w.const.ndim
            shape[layer.axis] = -1
            step = np.asarray(found.steps[layer.weight], np.float64).reshape(shape)
            centre = np.asarray(given.const, np.float64) * step
            keep = np.asarray(mine.const) == np.asarray(given.const)
            out[layer.weight] = np.where(keep, float_w.const, centre).astype(float_w.const.dtype)
        if layer.bias is None:
            continue
        name = f"{labels[layer.weight]}.bias"  # the lowering's name for the int32 bias
        float_b = prepared.find(layer.bias)
        mine, given = first.find(name), start.find(name)
        assert float_b is not None and float_b.const is not None
        same_size = given is not None and np.size(float_b.const) == np.size(given.const)  # type: ignore[arg-type]
        if _differs(mine, given) and same_size:
            assert mine is not None and given is not None and given.type.quant is not None
            q = np.asarray(given.const, np.float64).reshape(-1)
            scale = np.broadcast_to(np.asarray(given.type.quant.scale, np.float64), q.shape)
            keep = np.asarray(mine.const).reshape(-1) == q
            b = np.where(keep, np.asarray(float_b.const).reshape(-1), q * scale)
            out[layer.bias] = b.reshape(float_b.const.shape).astype(float_b.const.dtype)
    return out


def _differs(mine: Value | None, given: Value | None) -> bool:
    """Whether ``start`` has other integers, of the same shape, for a constant."""
    if mine is None or given is None or mine.const is None or given.const is None:
        return False
    a, b = np.asarray(mine.const), np.asarray(given.const)
    return a.shape == b.shape and not np.array_equal(a, b)


def replace_bias_correction(lowering: Integerize) -> Integerize:
    """The post-training lowering without bias correction: distillation trains the biases."""
    return replace(lowering, bias_correction=False)


def _bias_of(node: Node) -> str | None:
    if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
        bias = node.inputs[2]
        return bias.name if bias is not None and bias.const is not None else None
    found = bias_reader(node)
    if found is None:
        return None
    add = found[0]
    other = next(v for v in add.inputs if v is not None and v is not node.output)
    return other.name


# ----- the student -------------------------------------------------------------------------


class _Exact(torch.autograd.Function):
    """Forward: the integer model's value; backward: the gradient goes to the fake-quantized
    value it replaces (the straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, surrogate: Tensor, exact: Tensor) -> Tensor:
        return exact.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """LSQ's fake quantizer: ``scale * clamp(round(x / scale), qmin, qmax)``, rounding by the
    straight-through estimator, the gradient reaching ``scale`` (the step size)."""
    return _round_ste(torch.clamp(x / scale, qmin, qmax)) * scale


class Student(torch.nn.Module):
    """The integer model's trainable parameters and its torch forward pass."""

    def __init__(self, prepared: Graph, plan: Plan, train: Sequence[str]):
        super().__init__()
        self.graph, self.plan = prepared, plan
        self.rounding = "rounding" in train
        weights = "weights" in train
        scales = "scales" in train
        self.constants = {
            v.name: torch.from_numpy(np.array(v.const))
            for v in prepared.constants
            if v.const is not None
        }
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        self.steps = torch.nn.ParameterList()
        self.offsets = torch.nn.ParameterList()
        for name, array in plan.start.items():  # where start has other integers (start_weights)
            self.constants[name] = torch.from_numpy(np.array(array))
        for layer in plan.layers:
            w = self.constants[layer.weight].to(torch.float32)
            self.weights.append(torch.nn.Parameter(w.clone(), requires_grad=weights))
            if layer.bias is not None:
                b = self.constants[layer.bias].to(torch.float32)
                self.biases.append(torch.nn.Parameter(b.clone(), requires_grad=weights))
            self.steps.append(
                torch.nn.Parameter(torch.zeros(w.shape[layer.axis], dtype=torch.float64), scales)
            )
            if self.rounding:
                # AdaRound's start: the variable whose sigmoid is the weight's remainder, so
                # that the hard rounding starts at round-to-nearest.
                scaled = w.double() / self._step0(layer)
                rest = scaled - torch.floor(scaled)
                rest = rest.clamp(1e-4, 1 - 1e-4)
                self.offsets.append(torch.nn.Parameter(torch.log(rest / (1 - rest))))
        self.thresholds = torch.nn.Parameter(
            torch.zeros(len(plan.activations), dtype=torch.float64), requires_grad=scales
        )
        self.bias_index: dict[str, int] = {}
        for layer in plan.layers:
            if layer.bias is not None:
                self.bias_index[layer.bias] = len(self.bias_index)
        self.activation_index = {a.name: i for i, a in enumerate(plan.activations)}

    def _step0(self, layer: Layer) -> Tensor:
        shape = [1] * self.constants[layer.weight].ndim
        shape[layer.axis] = -1
        return torch.tensor(self.plan.steps[layer.weight], dtype=torch.float64).reshape(shape)

    def _step(self, i: int, layer: Layer) -> Tensor:
        step0 = self._step0(layer)
        return step0 * torch.exp(self.steps[i]).reshape(step0.shape)

    def _integer_weight(self, i: int, layer: Layer) -> tuple[Tensor, Tensor]:
        """The weight's integers in float (STE) and its steps, from the current parameters."""
        qmax = (1 << (layer.bits - 1)) - 1
        step = self._step(i, layer)
        w = self.weights[i].double()
        if self.rounding:
            h = torch.sigmoid(self.offsets[i])
            hard = (h >= 0.5).double()
            q = torch.floor(w / step).detach() + h + (hard - h).detach()
            return torch.clamp(q, -qmax, qmax), step
        return _round_ste(torch.clamp(w / step, -qmax, qmax)), step

    def threshold(self, activation: Activation) -> Tensor:
        base = self.plan.thresholds[activation.name]
        return base * torch.exp(self.thresholds[self.activation_index[activation.name]])

    def parameters_now(self) -> Parameters:
        """The current parameters as the lowering reads them."""
        weights: dict[str, np.ndarray] = {}
        steps = {}
        with torch.no_grad():
            for i, layer in enumerate(self.plan.layers):
                step = self._step(i, layer)
                if self.rounding:
                    q, _ = self._integer_weight(i, layer)
                    weights[layer.weight] = (q * step).to(torch.float32).numpy()
                else:  # trained or not: start's weights may not be the float model's
                    weights[layer.weight] = self.weights[i].detach().numpy().copy()
                if layer.bias is not None:
                    bias = self.biases[self.bias_index[layer.bias]].detach().numpy()
                    weights[layer.bias] = bias.astype(self.constants[layer.bias].numpy().dtype)
                steps[layer.weight] = (
                    tuple(float(s) for s in step.reshape(-1)),
                    layer.axis,
                    layer.bits,
                )
            thresholds = dict(self.plan.thresholds)
            for activation in self.plan.activations:
                thresholds[activation.name] = float(self.threshold(activation))
        return Parameters(weights, thresholds, self.plan.minimums, steps)

    def forward(self, feeds: Mapping[str, Tensor], exact: Mapping[str, Tensor]) -> list[Tensor]:
        """The outputs the loss compares (``plan.outputs``), whose values are the integer
        model's: ``exact`` holds, by float value name, the integer graph's values."""
        env: dict[str, Tensor] = dict(self.constants)
        env.update(feeds)
        for i, layer in enumerate(self.plan.layers):
            q, step = self._integer_weight(i, layer)
            env[layer.weight] = (q * step).to(torch.float32)
            if layer.bias is not None:
                env[layer.bias] = self.biases[self.bias_index[layer.bias]]
        activations = {a.name: a for a in self.plan.activations}
        for node in self.graph.nodes:
            args: list[Tensor | None] = [None if v is None else env[v.name] for v in node.inputs]
            while args and args[-1] is None:
                args.pop()
            out = TORCH.rule_for(node, "torch rule")(node, *args)
            name = node.output.name
            activation = activations.get(name)
            if activation is not None:
                scale = self.threshold(activation) / activation.qmax
                out = fake_quant(out, scale.to(out.dtype), activation.qmin, activation.qmax)
            if name in exact:
                out = _Exact.apply(out, exact[name])
            env[name] = out
        return [env[name] for name in self.plan.outputs]


# ----- one lowering of the current parameters -----------------------------------------------


class Lowered:
    """The integer graph of the student's current parameters, and how to read, from a run of
    it, the value of each float value it computes."""

    def __init__(self, prepared: Graph, params: Parameters, lowering: Integerize):
        graph = params.apply(prepared)
        stats = graph.analysis(CalibrationStats)
        model = graph.analysis(ModelQuantization)
        assert stats is not None and model is not None
        low = Lowering(graph, stats, learned_lowering(lowering), model)
        self.graph = low.run(LOWERINGS)
        self.capture: dict[str, tuple[str, float | None]] = {}
        for value, int_value in low.ints.items():
            q = _quant(int_value)
            if q is not None and q.axis is None and value.type.dtype.is_float:
                self.capture[int_value.name] = (value.name, q.scale[0])
        for value, float_value in low.floats.items():
            self.capture[float_value.name] = (value.name, None)

    def run(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, np.ndarray]]:
        """The float-named values (as torch float32) and the outputs of one run."""
        values: dict[str, Tensor] = {}

        def keep(node: Node, outputs: Sequence[np.ndarray]) -> None:
            for value, array in zip(node.outputs, outputs):
                found = self.capture.get(value.name)
                if found is None:
                    continue
                name, scale = found
                real = array if scale is None else array.astype(np.float64) * scale
                values[name] = torch.from_numpy(np.asarray(real, np.float32))

        outputs = run_graph(self.graph, batch, on_node=keep)
        return values, outputs


# ----- losses and agreement ----------------------------------------------------------------


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)


def distill_loss(student: Tensor, teacher: Tensor, config: DistillConfig) -> Tensor:
    """The distillation loss of one output, averaged over its rows (the last axis is the
    class or feature axis)."""
    s, t = _rows(student.double()), _rows(teacher.double())
    if config.loss == "kl":
        tau = config.temperature
        target = torch.log_softmax(t / tau, dim=-1)
        log_p = torch.log_softmax(s / tau, dim=-1)
        kl = (target.exp() * (target - log_p)).sum(-1)
        return kl.mean() * tau * tau
    if config.loss == "mse":
        return ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)
    return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()


def agreement(student: np.ndarray, teacher: np.ndarray, loss: str) -> tuple[float, int]:
    """The sum over rows of top-1 agreement (``kl``) or cosine similarity, and the row count."""
    s = np.asarray(student, np.float64).reshape(-1, student.shape[-1])
    t = np.asarray(teacher, np.float64).reshape(-1, teacher.shape[-1])
    if loss == "kl":
        return float((s.argmax(-1) == t.argmax(-1)).sum()), len(s)
    norms = np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1)
    cosine = (s * t).sum(-1) / np.maximum(norms, 1e-30)
    return float(cosine.sum()), len(s)


def _logits(outputs: Mapping[str, np.ndarray], prepared: Graph, name: str) -> np.ndarray:
    """The output ``name`` compares: a graph output, or the logits a final Softmax reads
    (whose log-probabilities serve the same: softmax of them is the same distribution)."""
    if name in outputs:
        return outputs[name]
    for value in prepared.outputs:
        producer = value.producer
        if producer is not None and producer.op == "Softmax" and producer.inputs[0].name == name:  # type: ignore[union-attr]
            return np.log(np.maximum(outputs[value.name], 1e-30))
    raise IntqError(f"no output for %{name}")


# ----- the optimizer -------------------------------------------------------------------------


class Adam:
    """Adam (Kingma and Ba) over parameter groups ``(params, lr)``, in a few lines of torch.

    ``torch.optim`` would do, but its first use imports TorchDynamo, seconds of start-up in
    every process (each ``torchrun`` worker, each test) for a loop that needs none of it.
    """

    def __init__(self, groups: Sequence[tuple[Sequence[Tensor], float]]):
        self.groups = [(list(params), lr) for params, lr in groups]
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.count = 0
        self.moments = [
            [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
            for params, _ in self.groups
        ]

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.count += 1
        fix1 = 1 - self.beta1**self.count
        fix2 = 1 - self.beta2**self.count
        for (params, lr), moments in zip(self.groups, self.moments):
            for p, (m, v) in zip(params, moments):
                if p.grad is None:
                    continue
                m.mul_(self.beta1).add_(p.grad, alpha=1 - self.beta1)
                v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
                p.sub_(lr * (m / fix1) / ((v / fix2).sqrt() + self.eps))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "moments": [[list(mv) for mv in g] for g in self.moments]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        for mine, saved in zip(self.moments, state["moments"]):
            for (m, v), (m_saved, v_saved) in zip(mine, saved):
                m.copy_(m_saved)
                v.copy_(v_saved)


# ----- the loop ------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


class Schedule:
    """Which batches each step trains on: a permutation of the training batches per epoch
    drawn from ``(seed, epoch)``, so step ``k``'s batches do not depend on where a run
    started."""

    def __init__(self, train: Sequence[int], per_step: int, seed: int):
        self.train, self.per_step, self.seed = list(train), per_step, seed
        self._epochs: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            self._epochs[epoch] = rng.permutation(np.asarray(self.train))
        return self._epochs[epoch]

    def step(self, k: int) -> list[int]:
        out = []
        for j in range(k * self.per_step, (k + 1) * self.per_step):
            epoch, position = divmod(j, len(self.train))
            out.append(int(self._epoch(epoch)[position]))
        return out


def split(count: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Training and held-out batch indices: a seeded shuffle, at least one of each."""
    order = np.random.default_rng([seed, 1 << 20]).permutation(count)
    held = min(max(1, round(count * holdout)), count - 1)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def _fingerprint(plan: Plan, config: DistillConfig) -> dict[str, Any]:
    return {
        "layers": [layer.weight for layer in plan.layers],
        "activations": [a.name for a in plan.activations],
        "train": list(config.train),
        "loss": config.loss,
        "batch": config.batch,
        "seed": config.seed,
    }


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def _load(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        raise ArtifactError(
            f"{path}: no checkpoint to resume from",
            hint="run once without resume=True (--resume) to write it",
        )
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ArtifactError(f"{path}: not a distillation checkpoint ({exc})") from None
    if state.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"{path}: the checkpoint is of another distillation (model, train, loss, batch or"
            " seed differ)",
            hint="resume with the settings that wrote it, or start afresh without resuming",
        )
    return state


def train(
    prepared: Graph,
    batches: Sequence[Batch],
    lowering: Integerize,
    config: DistillConfig,
    stats: Mapping[Value, Any],
    choices: Mapping[Value, Any] | None,
    start: Graph | None,
) -> tuple[Parameters, DistillHistory]:
    """Distill; returns the best parameters and what the run measured."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        with _blas_threads(config.threads):
            return _train(prepared, batches, lowering, config, stats, choices, start)
    finally:
        torch.set_num_threads(threads)


def _blas_threads(threads: int | None) -> Any:
    """Numpy's BLAS at ``threads`` threads while training: the reference runs' matrix
    products are small, and OpenBLAS's default of a thread per core ran them several times
    slower on a busy machine."""
    if threads is None:
        return nullcontext()
    return threadpool_limits(threads, user_api="blas")


def _train(
    prepared: Graph,
    batches: Sequence[Batch],
    lowering: Integerize,
    config: DistillConfig,
    stats: Mapping[Value, Any],
    choices: Mapping[Value, Any] | None,
    start: Graph | None,
) -> tuple[Parameters, DistillHistory]:
    began = time.perf_counter()
    rank, world = _world()
    if config.batch % world:
        raise IntqError(
            f"distillation's batch of {config.batch} does not split between {world} processes",
            hint="choose a batch per step (--distill-batch N) that the number of processes divides",
        )
    the_plan = plan(prepared, lowering, stats, choices, start)
    student = Student(prepared, the_plan, config.train)
    model: torch.nn.Module = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True)
    groups = [
        ([*student.weights, *student.biases], config.lr),
        ([*student.steps, student.thresholds], config.scale_lr),
        (list(student.offsets), config.rounding_lr),
    ]
    optimizer = Adam([([p for p in params if p.requires_grad], lr) for params, lr in groups])
    train_ids, held_ids = split(len(batches), config.holdout, config.seed)
    schedule = Schedule(train_ids, config.batch, config.seed)
    mine = held_ids[rank::world]
    teachers: dict[int, list[np.ndarray]] = {}

    def teacher(i: int) -> list[np.ndarray]:
        if i not in teachers:
            outs = run_graph(prepared, batches[i])
            teachers[i] = [_logits(outs, prepared, name) for name in the_plan.outputs]
        return teachers[i]

    history = DistillHistory("top-1 agreement" if config.loss == "kl" else "cosine")
    best: tuple[tuple[float, float], int, dict[str, Tensor]] | None = None
    first = 0
    fingerprint = _fingerprint(the_plan, config)
    path = Path(config.checkpoint) if config.checkpoint is not None else None
    if config.resume and path is not None:
        state = _load(path, fingerprint)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        first = int(state["step"])
        history.losses = [(int(s), float(v)) for s, v in state["losses"]]
        history.evaluations = [(int(s), float(v)) for s, v in state["evaluations"]]
        key = (float(state["best"][0]), float(state["best"][1]))
        best = (key, int(state["best"][2]), state["best_state"])

    def evaluate(lowered: Lowered, step: int) -> None:
        nonlocal best
        total, count, held_loss = 0.0, 0, 0.0
        for i in mine:
            _, outs = lowered.run(batches[i])
            for name, t in zip(the_plan.outputs, teacher(i)):
                got = _logits(outs, prepared, name)
                agreeing, n = agreement(got, t, config.loss)
                total, count = total + agreeing, count + n
                pair = (torch.from_numpy(np.asarray(got)), torch.from_numpy(np.asarray(t)))
                held_loss += float(distill_loss(*pair, config))
        total, counted, held_loss = _sum([total, float(count), held_loss], world)
        metric = total / counted
        history.evaluations.append((step, metric))
        # Ties (a saturated agreement) go to the lower held-out loss.
        rank_key = (metric, -held_loss)
        if best is None or rank_key > best[0]:
            snapshot = {k: v.detach().clone() for k, v in student.state_dict().items()}
            best = (rank_key, step, snapshot)

    def checkpoint(step: int) -> None:
        if path is None or rank != 0:
            return
        assert best is not None
        _save(
            path,
            {
                "fingerprint": fingerprint,
                "step": step,
                "student": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "losses": history.losses,
                "evaluations": history.evaluations,
                "best": [best[0][0], best[0][1], best[1]],
                "best_state": best[2],
            },
        )

    show = show_progress(config.progress) and rank == 0
    with tqdm(
        total=config.steps,
        initial=min(first, config.steps),
        desc="distilling",
        disable=not show,
        file=sys.stderr,
        unit="step",
    ) as bar:
        ahead: Lowered | None = None  # the lowering an evaluation made of the next step's
        for step in range(first, config.steps):
            lowered = ahead or Lowered(prepared, student.parameters_now(), lowering)
            ahead = None
            if step == 0 or step % config.eval_every == 0:
                if not history.evaluations or history.evaluations[-1][0] != step:
                    evaluate(lowered, step)
            optimizer.zero_grad()
            local = schedule.step(step)[rank::world]
            total = 0.0
            for j, i in enumerate(local):
                # DDP sums the gradients on the last of this step's batches only.
                last = world == 1 or j == len(local) - 1
                sync = nullcontext() if last else model.no_sync()  # type: ignore[operator]
                batch = batches[i]
                values, _ = lowered.run(batch)
                feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
                with sync:
                    outs = model(feeds, values)
                    loss = sum(
                        distill_loss(o, torch.from_numpy(np.asarray(t)), config)
                        for o, t in zip(outs, teacher(i))
                    ) / len(local)
                    loss.backward()  # type: ignore[union-attr]
                total += float(loss.detach())  # type: ignore[union-attr]
            optimizer.step()
            (mean,) = _sum([total], world)
            history.losses.append((step, mean / world))
            bar.update(1)
            bar.set_postfix(loss=f"{mean / world:.4g}", best=f"{best[0][0]:.4f}" if best else "-")
            if (step + 1) % config.checkpoint_every == 0:
                if (step + 1) % config.eval_every == 0:
                    ahead = Lowered(prepared, student.parameters_now(), lowering)
                    evaluate(ahead, step + 1)
                checkpoint(step + 1)
    final = max(first, config.steps)
    if not history.evaluations or history.evaluations[-1][0] != final:
        evaluate(Lowered(prepared, student.parameters_now(), lowering), final)
    checkpoint(final)
    assert best is not None
    history.best_step = best[1]
    student.load_state_dict(best[2])
    history.seconds = time.perf_counter() - began
    return student.parameters_now(), history
