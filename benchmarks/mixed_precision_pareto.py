"""Mixed precision: accuracy (digits CNN), top-1 agreement with FP32 (EfficientNet-Lite0) and
pooled-embedding cosine to FP32 (MiniLM) against weight size, for budgets between all-INT4
and all-INT8 weights.

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.mixed_precision_pareto              # all three models
    .venv/bin/python -m benchmarks.mixed_precision_pareto --models minilm
    .venv/bin/python -m benchmarks.mixed_precision_pareto --quick      # digits only, small
    .venv/bin/python -m benchmarks.mixed_precision_pareto --json out/pareto.json
    .venv/bin/python -m benchmarks.mixed_precision_pareto --quick --activations

In one run, per model, every point integer-only and run by ONNX Runtime (bit-exact with the
reference interpreter, see tests/test_mixed_precision.py):

* uniform INT8 and uniform INT4 weights (8-bit activations throughout);
* for each size budget (fractions of the way from the smallest feasible size, first and last
  layer pinned at 8 bits, to all-INT8): the ILP's choice with Hessian-trace sensitivity
  (HAWQ-V3, :mod:`intq.passes.sensitivity`), the ILP's choice with direct sensitivity (one
  layer quantized at a time), and random assignments of the same budget (``--seeds`` of them):
  layers in a random order switched to 4 bits while the model still exceeds the budget (the
  same pins; ties are not imposed on the random ones, which only widens their choice), then
  layers switched back to 8 bits in another random order wherever the model still fits.

``--activations`` adds, per model, BOPs budgets (``macs * w * a`` per layer) from the fewest
BOPs (W4A8 but the pinned ends) to every layer at W8A16: the ILP over weight widths alone
(activations 8-bit) against the ILP that also picks each layer's input activation among 8
and 16 bits (:class:`intq.MixedPrecision` ``activation_bits=(8, 16)``; activation Ω measured
by quantizing that tensor alone with its min/max scale, twice the KL increase beside the
Hessian weight Ω), plus uniform W8A8 and W8A16.

Sensitivity is measured once per model and method; the calibration statistics once per model;
each point is then the ILP, the integer lowering and an evaluation. Digits: accuracy on the
448 held-out digits of its real split (calibrated on 256 training digits). EfficientNet-Lite0:
top-1 agreement with the FP32 model on random crops of the bundled photos (calibration crops
and evaluation crops are different draws). Both also by the mean KL divergence from the FP32
softmax. MiniLM (sensitivity loss MSE): mean cosine of the mean-pooled embeddings to FP32
on 24 evaluation sentences, calibrated on 16 others (those of ``minilm_variants.py``), and
the mean squared error of the pooled embeddings as its divergence. Torch runs on one thread
(the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import intq
from benchmarks.machine import cpu_description, load_average
from examples import zoo
from intq.backends.onnxruntime import compile_onnxruntime
from intq.ir.graph import Graph
from intq.mixed_precision import (
    ActivationChoice,
    MixedPrecision,
    activation_choice,
    derive_ties,
    place_activations,
)
from intq.passes import PREPARE, pipeline
from intq.passes.bias_correction import InputMeans
from intq.passes.bit_allocation import (
    BITS_PER_MB,
    Budget,
    LayerCosts,
    allocate_bits,
)
from intq.passes.calibration import Calibrate, CalibrationStats, ClipRule
from intq.passes.integer_lowering import Lowering
from intq.passes.integer_only import check_integer_only
from intq.passes.integer_rules import LOWERINGS
from intq.passes.integerize import Integerize
from intq.passes.learned_rounding import LearnedRounding, RoundedWeights
from intq.passes.precision import ActivationSite, LayerBits, QuantLayer, quantizable_layers
from intq.passes.range_analysis import analyze_ranges
from intq.passes.sensitivity import (
    direct_perturbations,
    hessian_perturbations,
    hessian_traces,
)

Batch = dict[str, np.ndarray]


@dataclass
class Point:
    """One evaluated configuration."""

    model: str
    method: str
    budget_mb: float | None
    size_mb: float
    metric: float
    divergence: float
    seed: int | None = None
    bops: float | None = None


@dataclass
class Task:
    """A model, its prepared float graph, calibration batches and its metric."""

    name: str
    graph: Graph
    calibration: list[Batch]
    evaluate: Callable[[Graph], tuple[float, float]]
    metric: str
    loss: str = "kl"


def fp32_session(path: Path) -> ort.InferenceSession:
    """The FP32 ONNX model in ONNX Runtime: the reference the integer models are compared to."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def digits_task(zoo_dir: Path) -> Task:
    model = zoo.digits_cnn(zoo_dir)
    graph = intq.from_onnx(model.path)
    pipeline(PREPARE)(graph)
    x_tr, x_te, _, y_te = zoo._digits_split()
    calibration = [{"input": x_tr[i : i + 8]} for i in range(0, 256, 8)]
    count = len(x_te) // 8 * 8

    fp32 = fp32_session(model.path)
    reference = np.concatenate(
        [fp32.run(["logits"], {"input": x_te[i : i + 8]})[0] for i in range(0, count, 8)]
    )

    def evaluate(int_graph: Graph) -> tuple[float, float]:
        exe = compile_onnxruntime(int_graph)
        logits = np.concatenate(
            [exe.run({"input": x_te[i : i + 8]})["logits"] for i in range(0, count, 8)]
        )
        return float((logits.argmax(-1) == y_te[:count]).mean()), kl(reference, logits)

    return Task("digits_cnn", graph, calibration, evaluate, "accuracy")


def efficientnet_task(zoo_dir: Path, calibration_crops: int, eval_crops: int) -> Task:
    model = zoo.efficientnet_lite0(zoo_dir)
    graph = intq.from_onnx(model.path)
    pipeline(PREPARE)(graph)
    calib = zoo.photo_crops(model, calibration_crops, seed=1)
    crops = zoo.photo_crops(model, eval_crops, seed=2)
    fp32 = fp32_session(model.path)
    reference = np.concatenate([fp32.run(["logits"], {"input": c[None]})[0] for c in crops])

    def evaluate(int_graph: Graph) -> tuple[float, float]:
        exe = compile_onnxruntime(int_graph)
        logits = np.concatenate([exe.run({"input": c[None]})["logits"] for c in crops])
        agreement = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        return agreement, kl(reference, logits)

    return Task(
        "efficientnet_lite0", graph, [{"input": c[None]} for c in calib], evaluate, "agreement"
    )


def minilm_task(zoo_dir: Path) -> Task:
    from benchmarks.minilm_variants import CALIBRATION, EVALUATION, batches, pooled

    model = zoo.minilm(zoo_dir)
    graph = intq.from_onnx(model.path)
    pipeline(PREPARE)(graph)
    calibration = batches(model, CALIBRATION)
    evaluation = batches(model, EVALUATION)
    fp32 = fp32_session(model.path)
    reference = [
        pooled(fp32.run(["last_hidden_state"], f)[0], f["attention_mask"]) for f in evaluation
    ]

    def evaluate(int_graph: Graph) -> tuple[float, float]:
        exe = compile_onnxruntime(int_graph)
        cosines, errors = [], []
        for want, feed in zip(reference, evaluation):
            got = pooled(exe.run(feed)["last_hidden_state"], feed["attention_mask"])
            norms = np.linalg.norm(want, axis=-1) * np.linalg.norm(got, axis=-1)
            cosines.extend((want * got).sum(-1) / norms)
            errors.append(float(((want - got) ** 2).mean()))
        return float(np.mean(cosines)), float(np.mean(errors))

    return Task("minilm", graph, calibration, evaluate, "cosine", loss="mse")


def kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL divergence of softmax(logits) from the FP32 softmax(reference), per sample."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    logp, logq = log_softmax(reference), log_softmax(logits)
    return float((np.exp(logp) * (logp - logq)).sum(-1).mean())


@dataclass(frozen=True)
class Calibrated:
    """What the lowering of every point reads, gathered once: the statistics and, for learned
    rounding, each layer's learned 4-bit integers and mean inputs (bias correction)."""

    stats: CalibrationStats
    rounded: RoundedWeights | None
    means: InputMeans | None

    @property
    def rounding(self) -> str:
        return "nearest" if self.rounded is None else "auto"


def calibrate(task: Task, rounding: str) -> Calibrated:
    """Calibrate ``task``'s graph once; with ``rounding="auto"`` (intq's default) also learn
    the 4-bit rounding of every layer and keep the mean inputs, as ``intq.quantize`` does
    for the layers under 8 bits (a layer at 8 bits in a point takes neither)."""
    learned = rounding == "auto"
    every = (lambda name: True) if learned else None
    Calibrate(task.calibration, False, corrects=every, learns=every)(task.graph)
    if learned:
        LearnedRounding(Integerize(weight_bits=4, rounding="auto"), False)(task.graph)
    stats = task.graph.analysis(CalibrationStats)
    assert stats is not None
    return Calibrated(stats, task.graph.analysis(RoundedWeights), task.graph.analysis(InputMeans))


def lower(task: Task, calibrated: Calibrated, bits: Mapping[str, int]) -> Graph:
    """The integer-only graph with the given weight bits per layer (8-bit activations),
    from statistics collected once for every choice."""
    return lower_bits(task, calibrated, {n: LayerBits(b, 8) for n, b in bits.items()})


def lower_bits(task: Task, calibrated: Calibrated, layer_bits: Mapping[str, LayerBits]) -> Graph:
    """The integer-only graph with ``layer_bits`` (min/max calibration; learned rounding and
    bias correction of the layers under 8 bits where ``calibrated`` has them), from
    statistics collected once for every choice."""
    rounding = calibrated.rounding
    corrects = "auto" if rounding == "auto" else False
    options = Integerize(layer_bits=dict(layer_bits), rounding=rounding, bias_correction=corrects)
    lowering = Lowering(
        task.graph, calibrated.stats, options, None, None, calibrated.means, calibrated.rounded
    )
    result = lowering.run(LOWERINGS)
    analyze_ranges(result)
    check_integer_only(result)
    return result


def size_mb(layers: Sequence[QuantLayer], bits: Mapping[str, int]) -> float:
    return sum(layer.params * bits[layer.name] for layer in layers) / BITS_PER_MB


def random_bits(
    layers: Sequence[QuantLayer], pins: Mapping[str, int], budget: float, rng: np.random.Generator
) -> dict[str, int]:
    """Free layers in random order to 4 bits until the model fits, then, in another random
    order, back to 8 bits wherever it still fits: a random choice using the budget fully."""
    bits = {layer.name: 8 for layer in layers}
    free = [layer for layer in layers if layer.name not in pins]
    for index in rng.permutation(len(free)):
        if size_mb(layers, bits) <= budget:
            break
        bits[free[index].name] = 4
    for index in rng.permutation(len(free)):
        name = free[index].name
        if bits[name] == 4:
            bits[name] = 8
            if size_mb(layers, bits) > budget:
                bits[name] = 4
    return bits


def run(
    task: Task,
    fractions: Sequence[float],
    seeds: int,
    iterations: int,
    pin: bool = True,
    activations: bool = False,
    sizes: bool = True,
    rounding: str = "auto",
) -> list[Point]:
    layers = quantizable_layers(task.graph)
    pins = {layers[0].name: 8, layers[-1].name: 8} if pin else {}
    ties = derive_ties(task.graph, layers)
    started = time.perf_counter()
    stats = calibrate(task, rounding)
    print(
        f"[{task.name}] calibration statistics (rounding {rounding}):"
        f" {time.perf_counter() - started:.1f} s"
    )
    omegas: dict[str, dict[str, dict[int, float]]] = {}
    started = time.perf_counter()
    estimate = hessian_traces(
        task.graph,
        task.calibration,
        layers,
        loss=task.loss,
        max_iterations=iterations,
        progress=False,
    )
    omegas["ilp-hessian"] = hessian_perturbations(task.graph, layers, estimate.traces, (4, 8))
    print(
        f"[{task.name}] Hessian traces: {estimate.iterations} iterations"
        f" (converged: {estimate.converged}), {time.perf_counter() - started:.1f} s"
    )
    if not sizes:
        return run_activations(task, layers, stats, omegas["ilp-hessian"], ties, pins)
    started = time.perf_counter()
    omegas["ilp-direct"] = direct_perturbations(
        task.graph, task.calibration[:8], layers, (4, 8), loss=task.loss, progress=False
    )
    print(f"[{task.name}] direct sensitivity: {time.perf_counter() - started:.1f} s")

    points = []

    def point(method: str, bits: Mapping[str, int], budget: float | None, seed=None) -> Point:
        metric, divergence = task.evaluate(lower(task, stats, bits))
        p = Point(task.name, method, budget, size_mb(layers, bits), metric, divergence, seed)
        budget_text = "" if budget is None else f"{budget:.4f}"
        print(
            f"{task.name:<20} {method:<12} {budget_text:>9} {p.size_mb:>9.4f}"
            f" {metric:>9.4f} {divergence:>10.3g}" + ("" if seed is None else f"  seed {seed}"),
            flush=True,
        )
        points.append(p)
        return p

    print(
        f"{'model':<20} {'method':<12} {'budget MB':>9} {'size MB':>9} {task.metric:>9}"
        f" {'divergence':>10}"
    )
    point("uniform-8", {layer.name: 8 for layer in layers}, None)
    point("uniform-4", {layer.name: 4 for layer in layers}, None)
    low = size_mb(layers, {layer.name: pins.get(layer.name, 4) for layer in layers})
    high = size_mb(layers, {layer.name: 8 for layer in layers})
    for fraction in fractions:
        budget = low + fraction * (high - low)
        for method, omega in omegas.items():
            costs = [
                LayerCosts.from_counts(n.name, omega[n.name], params=n.params, macs=n.macs)
                for n in layers
            ]
            allocation = allocate_bits(costs, Budget(size_mb=budget), ties=ties, pins=pins)
            point(method, allocation.bits, budget)
        rng = np.random.default_rng(0)
        for seed in range(seeds):
            point("random", random_bits(layers, pins, budget, rng), budget, seed)
    if activations:
        points += run_activations(task, layers, stats, omegas["ilp-hessian"], ties, pins)
    return points


def run_activations(
    task: Task,
    layers: Sequence[QuantLayer],
    stats: Calibrated,
    omega: Mapping[str, Mapping[int, float]],
    ties: Sequence[Sequence[str]],
    pins: Mapping[str, int],
    fractions: Sequence[float] = (0.1, 0.25, 0.4, 0.6, 0.8),
) -> list[Point]:
    """BOPs budgets: the weights-only ILP against the ILP with 8/16-bit input activations."""
    mp = MixedPrecision(activation_bits=(8, 16), pin_first_last=bool(pins), loss=task.loss)
    started = time.perf_counter()
    choice = activation_choice(
        task.graph, task.calibration[:8], layers, mp, (8, 16), ClipRule("minmax")
    )
    print(
        f"[{task.name}] activation sensitivity: {len(choice.sites)} activations,"
        f" {time.perf_counter() - started:.1f} s"
    )
    plain = [
        LayerCosts.from_counts(n.name, omega[n.name], params=n.params, macs=n.macs) for n in layers
    ]
    paired = [
        LayerCosts.from_counts(
            n.name, omega[n.name], params=n.params, macs=n.macs, pairs=choice.pairs.get(n.name)
        )
        for n in layers
    ]
    sites = choice.sites
    widest = {a.name: max(a.perturbation) for a in choice.activations}

    def bops(weights: Mapping[str, int], inputs: Mapping[str, int]) -> float:
        return float(sum(n.macs * weights[n.name] * inputs.get(n.name, 8) for n in layers))

    points = []

    def point(
        method: str,
        layer_bits: Mapping[str, LayerBits],
        weights: Mapping[str, int],
        inputs: Mapping[str, int],
        budget: float | None,
    ) -> None:
        metric, divergence = task.evaluate(lower_bits(task, stats, layer_bits))
        total = bops(weights, inputs)
        p = Point(task.name, method, None, size_mb(layers, weights), metric, divergence, None)
        p.bops = total
        budget_text = "" if budget is None else f"{budget:.4g}"
        print(
            f"{task.name:<20} {method:<12} {budget_text:>10} {total:>10.4g} {p.size_mb:>9.4f}"
            f" {metric:>9.4f} {divergence:>10.3g}",
            flush=True,
        )
        points.append(p)

    print(
        f"{'model':<20} {'method':<12} {'BOPs budget':>10} {'BOPs':>10} {'size MB':>9}"
        f" {task.metric:>9} {'divergence':>10}"
    )
    eights = {n.name: 8 for n in layers}
    point("uniform-w8a8", {n: LayerBits(8, 8) for n in eights}, eights, {}, None)
    # Every chosen activation at its widest allowed width (16 bits where the pairs allow).
    wide = {n: LayerBits(8, 8) for n in eights}
    all16 = {}
    for site in sites:
        a = max((a for a in widest_allowed(site, choice) if a <= widest[site.value]), default=8)
        all16.update(dict.fromkeys(site.readers, a))
        wide.update({key: LayerBits(8, a) for key in site.keys})
    point("uniform-w8a16", wide, eights, all16, None)
    least = bops({n.name: pins.get(n.name, 4) for n in layers}, {})
    high = bops(eights, all16)
    for fraction in fractions:
        budget = least + fraction * (high - least)
        weights_only = allocate_bits(plain, Budget(bops=budget), ties=ties, pins=pins)
        point(
            "ilp-w", {n: LayerBits(b, 8) for n, b in weights_only.bits.items()},
            weights_only.bits, {}, budget,
        )  # fmt: skip
        both = allocate_bits(
            paired, Budget(bops=budget), ties=ties, pins=pins, activations=choice.activations
        )
        point("ilp-w+a", place_activations(both, sites), both.bits, both.input_bits, budget)
    return points


def widest_allowed(site: ActivationSite, choice: ActivationChoice) -> list[int]:
    """The input widths every reader of ``site`` allows with 8-bit weights."""
    return [
        a
        for a in (8, 16)
        if all((8, a) in choice.pairs.get(reader, [(8, 8)]) for reader in site.readers)
    ]


def verdict(points: Sequence[Point]) -> list[str]:
    lines = []
    for model in sorted({p.model for p in points}):
        mine = [p for p in points if p.model == model]
        for budget in sorted({p.budget_mb for p in mine if p.budget_mb is not None}):
            at = [p for p in mine if p.budget_mb == budget]
            random = [p for p in at if p.method == "random"]
            best = max(p.metric for p in random)
            least_kl = min(p.divergence for p in random)
            for method in ("ilp-hessian", "ilp-direct"):
                ilp = next(p for p in at if p.method == method)
                outcome = (
                    "beats" if ilp.metric > best else "ties" if ilp.metric == best else "LOSES"
                )
                lines.append(
                    f"{model} {budget:.4f} MB {method}: metric {ilp.metric:.4f} vs random"
                    f" best {best:.4f} -> {outcome};"
                    f" divergence {ilp.divergence:.3g} vs random least {least_kl:.3g} ->"
                    f" {'beats' if ilp.divergence < least_kl else 'does not beat'}"
                )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, 3 budgets, 2 seeds")
    parser.add_argument("--zoo", type=Path, default=Path("out/zoo"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--crops", type=int, default=48, help="EfficientNet evaluation crops")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--models", default="digits,efficientnet,minilm", help="comma-separated subset"
    )
    parser.add_argument(
        "--rounding",
        choices=("auto", "nearest"),
        default="auto",
        help="auto (intq's default): learned rounding and bias correction of the 4-bit layers",
    )
    parser.add_argument(
        "--no-pins", action="store_true", help="let the first and last layer take 4 bits too"
    )
    parser.add_argument(
        "--activations",
        action="store_true",
        help="also BOPs budgets with 8/16-bit input activations chosen by the ILP",
    )
    parser.add_argument(
        "--activations-only", action="store_true", help="--activations without the size budgets"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {cpu_description()}; load {load_average()}")
    fractions = (0.2, 0.5, 0.8) if args.quick else (0.1, 0.3, 0.55, 0.8)
    seeds = 2 if args.quick else args.seeds
    pin = not args.no_pins
    acts = args.activations or args.activations_only
    sizes = not args.activations_only
    models = ["digits"] if args.quick else args.models.split(",")
    points = []
    tasks = {  # each model's task and Hessian-trace iterations, built only when chosen
        "digits": (lambda: digits_task(args.zoo), 64),
        "efficientnet": (
            lambda: efficientnet_task(args.zoo, calibration_crops=16, eval_crops=args.crops),
            32,
        ),
        "minilm": (lambda: minilm_task(args.zoo), 32),
    }
    for key, (make, iterations) in tasks.items():
        if key in models:
            points += run(
                make(),
                fractions,
                seeds,
                iterations=iterations,
                pin=pin,
                activations=acts,
                sizes=sizes,
                rounding=args.rounding,
            )
    print()
    print("\n".join(verdict(points)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(p) for p in points], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
