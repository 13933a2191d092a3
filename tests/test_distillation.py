"""Quantized distillation (``intq.distill``, ``QuantConfig(distill=...)``) on real zoo models.

The training forward pass is the integer model bit for bit; the distilled graph is an
ordinary integer graph every backend runs bit exact; a resumed run ends with the weights of
an uninterrupted one; two processes under ``torchrun`` agree with one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_worker import CONFIG, distill

import intq
from examples import zoo
from intq.distill_training import Lowered, Student, distill_loss, plan
from intq.distillation import DistillConfig, DistillHistory, reintegerize
from intq.ir import to_text
from intq.passes import PREPARE, Calibrate, PassManager, pipeline
from intq.passes.calibration import CalibrationStats
from intq.semantics.numpy_eval import run_graph

REPO = Path(__file__).resolve().parent.parent


def _digits_data(count: int = 64) -> list[dict[str, np.ndarray]]:
    x_train = zoo._digits_split()[0]
    return [{"input": x_train[i : i + 8]} for i in range(0, count, 8)]


def _small(**options) -> DistillConfig:
    return DistillConfig(
        **{"steps": 4, "batch": 2, "eval_every": 2, "threads": 1, "progress": False, **options}
    )


def _prepared(graph: intq.ir.Graph, data: list) -> tuple[intq.ir.Graph, CalibrationStats]:
    prepared = graph.copy()
    pipeline(PREPARE)(prepared)
    PassManager([Calibrate(data)])(prepared)
    stats = prepared.analysis(CalibrationStats)
    assert stats is not None
    return prepared, stats


@pytest.mark.parametrize(
    ("fixture", "train"),
    [
        ("digits_model", ("weights", "scales")),
        ("digits_model", ("rounding", "scales")),
        ("resnet18_model", ("weights", "scales")),
    ],
)
def test_the_training_forward_is_the_integer_graph_bit_for_bit(request, fixture, train):
    model = request.getfixturevalue(fixture)
    graph = intq.from_onnx(model.path)
    if fixture == "digits_model":
        data = _digits_data(16)
    else:
        crops = zoo.photo_crops(model, 2, seed=3)
        data = [{"input": crops[i : i + 1]} for i in range(2)]
    config = replace(CONFIG, weight_bits=4, activation_bits=8 if "resnet" in fixture else 4)
    lowering = config.lowering()
    prepared, stats = _prepared(graph, data)
    student = Student(prepared, plan(prepared, lowering, stats, None, None), train)
    batch = data[0]
    feeds = {k: torch.from_numpy(v) for k, v in batch.items()}
    name = graph.outputs[0].name

    # Untrained, the student is the post-training integer model (on the small model: the
    # lowerings and reference runs of the ResNet cost seconds each).
    full = fixture == "digits_model"
    if full:
        post = run_graph(intq.quantize(graph, data, config), batch)[name]
        values, _ = Lowered(prepared, student.parameters_now(), lowering).run(batch)
        (out,) = student(feeds, values)
        assert np.array_equal(out.detach().numpy(), post)

    # Moved away from it (what training does), it is still the integer graph it ships as.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        student.thresholds.add_(0.2 * torch.randn(student.thresholds.shape, generator=generator))
        for step in student.steps:
            step.add_(0.1 * torch.randn(step.shape, generator=generator, dtype=step.dtype))
        for w in student.weights:
            w.add_(0.05 * w.std() * torch.randn(w.shape, generator=generator))
        for v in student.offsets:
            v.copy_(torch.randn(v.shape, generator=generator, dtype=v.dtype))
    params = student.parameters_now()
    values, _ = Lowered(prepared, params, lowering).run(batch)
    (out,) = student(feeds, values)
    shipped = reintegerize(prepared, params, lowering)
    want = run_graph(shipped, batch)[name]
    assert np.array_equal(out.detach().numpy(), want)
    if not full:
        return
    assert not np.array_equal(want, post)

    # And the straight-through estimator reaches every kind of parameter trained.
    teacher = torch.from_numpy(run_graph(prepared, batch)[name])
    distill_loss(out, teacher, DistillConfig()).backward()
    trained = [student.thresholds, *student.steps]
    trained += list(student.offsets) if "rounding" in train else [*student.weights]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_distilled_graphs_run_bit_exact_on_every_backend(digits_model):
    graph = intq.from_onnx(digits_model.path)
    data = _digits_data()
    config = replace(CONFIG, distill=_small(lr=1e-3))
    distilled = intq.quantize(graph, data, config)
    history = distilled.analysis(DistillHistory)
    assert history is not None and [s for s, _ in history.losses] == [0, 1, 2, 3]
    assert [s for s, _ in history.evaluations] == [0, 2, 4]
    assert history.best_step in (0, 2, 4) and history.best >= history.baseline
    post = intq.quantize(graph, data, CONFIG)
    if history.best_step:
        assert to_text(distilled) != to_text(post)
    feeds = {"input": zoo._digits_split()[1][:8]}
    want = run_graph(distilled, feeds)
    for target in ("onnxruntime", "tvm"):
        got = intq.compile(distilled, target=target).run(feeds)
        assert all(np.array_equal(got[k], want[k]) for k in want), target
    # The standalone API, from the post-training graph, takes the same path.
    again = intq.distill(digits_model.path, post, data, _small(lr=1e-3), quant=CONFIG)
    assert to_text(again) == to_text(distilled)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(digits_model, tmp_path):
    graph = intq.from_onnx(digits_model.path)
    data = _digits_data()
    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    options = {"lr": 1e-3, "checkpoint_every": 2}
    uninterrupted = intq.quantize(
        graph, data, replace(CONFIG, distill=_small(checkpoint=whole, **options))
    )
    intq.quantize(graph, data, replace(CONFIG, distill=_small(steps=2, checkpoint=part, **options)))
    assert torch.load(part, weights_only=True)["step"] == 2
    resumed = intq.quantize(
        graph, data, replace(CONFIG, distill=_small(checkpoint=part, resume=True, **options))
    )
    a, b = torch.load(whole, weights_only=True), torch.load(part, weights_only=True)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert a["evaluations"] == b["evaluations"]
    assert to_text(resumed) == to_text(uninterrupted)
    # A checkpoint of another distillation is refused, not silently mixed in.
    with pytest.raises(intq.ArtifactError, match="another distillation"):
        intq.quantize(
            graph,
            data,
            replace(CONFIG, distill=_small(checkpoint=part, resume=True, loss="mse", **options)),
        )


def test_two_processes_under_torchrun_agree_with_one(digits_model, tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "distill_worker.py"),
            str(digits_model.path),
            str(two),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    distill(digits_model.path, one)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    start = intq.quantize(intq.from_onnx(digits_model.path), _digits_data(), CONFIG)
    for key, single in a["student"].items():
        both = b["student"][key]
        assert torch.allclose(single, both, rtol=1e-5, atol=1e-7), key
    # Training moved the weights, and both runs moved them the same way.
    first = next(k for k in a["student"] if k.startswith("weights."))
    assert not torch.equal(a["student"][first], b["best_state"][first]) or a["best"][2] == 0
    assert [s for s, _ in a["evaluations"]] == [s for s, _ in b["evaluations"]]
    assert start.outputs[0].name == "logits"


def test_distill_config_errors_say_what_to_do(digits_model, tmp_path):
    with pytest.raises(intq.IntqError, match="unknown distillation loss") as info:
        DistillConfig(loss="ce")
    assert "kl, mse, cosine" in info.value.hint
    with pytest.raises(intq.IntqError, match="both 'weights' and 'rounding'"):
        DistillConfig(train=("weights", "rounding"))
    with pytest.raises(intq.IntqError, match="cannot train") as info:
        DistillConfig(train=("biases",))
    assert "weights, scales, rounding" in info.value.hint
    with pytest.raises(intq.IntqError, match="resume needs the checkpoint"):
        DistillConfig(resume=True)
    with pytest.raises(intq.ArtifactError, match="no checkpoint to resume from"):
        intq.quantize(
            intq.from_onnx(digits_model.path),
            _digits_data(16),
            replace(CONFIG, distill=_small(checkpoint=tmp_path / "none.pt", resume=True)),
        )


def test_the_command_line_distills_and_refuses_resume_without_steps(digits_model, tmp_path):
    import contextlib
    import io

    from intq.cli import main

    def run(*args: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(list(args))
        return code, err.getvalue()

    calib = tmp_path / "calib.npz"
    np.savez(calib, input=zoo._digits_split()[0][:64])
    checkpoint, out = tmp_path / "run.pt", tmp_path / "digits.intq"
    common = ["quantize", str(digits_model.path), "--calib", str(calib), "--quiet"]
    common += ["--weight-bits", "4", "--activation-bits", "4", "--calibration", "minmax"]
    common += ["--rounding", "nearest", "--no-bias-correction"]  # as CONFIG
    flags = ["--distill-steps", "2", "--distill-batch", "2", "--checkpoint", str(checkpoint)]
    code, err = run(*common, *flags, "-o", str(out))
    assert code == 0, err
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    # What the command wrote is the API's distillation of the same batches (up to float
    # rounding: torch's kernels there ran in another thread-pool state).
    data = [{"input": zoo._digits_split()[0][i : i + 8]} for i in range(0, 64, 8)]
    api_checkpoint = tmp_path / "api.pt"
    config = DistillConfig(steps=2, batch=2, progress=False, checkpoint=api_checkpoint)
    intq.quantize(intq.from_onnx(digits_model.path), data, replace(CONFIG, distill=config))
    a = torch.load(checkpoint, weights_only=True)["student"]
    b = torch.load(api_checkpoint, weights_only=True)["student"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9) for k in a)
    assert "QConv" in to_text(intq.load(out).graph)
    code, err = run(*common, "--resume", "-o", str(tmp_path / "other.intq"))
    assert code == 1 and "add --distill-steps N" in err, err
    assert not (tmp_path / "other.intq").exists()


def test_mixed_precision_plans_the_widths_and_distillation_keeps_them(digits_model):
    graph = intq.from_onnx(digits_model.path)
    mp = intq.MixedPrecision(size_mb=0.035, sensitivity="direct", pin_first_last=False)
    config = replace(CONFIG, activation_bits=8, mixed_precision=mp, distill=_small(steps=2))
    distilled = intq.quantize(graph, _digits_data(), config)
    # CONFIG's 4-bit weights everywhere, but for the layers the plan widened.
    weights = [v.type.quant for v in distilled.constants if v.type.quant and v.type.quant.narrow]
    assert {q.bits for q in weights} == {4, 8}
    history = distilled.analysis(DistillHistory)
    assert history is not None and len(history.losses) == 2


def test_a_config_file_distills_with_a_distill_table(tmp_path):
    from intq.config import load_config

    path = tmp_path / "q.toml"
    path.write_text('weight_bits = 4\n[distill]\nsteps = 3\nloss = "cosine"\ntrain = ["scales"]\n')
    config = load_config(path)
    assert config.distill == DistillConfig(steps=3, loss="cosine", train=("scales",))
    path.write_text("[distill]\nepochs = 3\n")
    with pytest.raises(intq.IntqError, match=r"\[distill\]: unknown key 'epochs'") as info:
        load_config(path)
    assert "steps" in info.value.hint
    path.write_text('[distill]\nloss = "hinge"\n')
    with pytest.raises(intq.IntqError, match=r"\[distill\]: unknown distillation loss"):
        load_config(path)


def test_a_learned_step_that_would_overflow_is_refused_naming_the_layer(digits_model):
    graph = intq.from_onnx(digits_model.path)
    data = _digits_data(16)
    lowering = replace(CONFIG, weight_bits=8, activation_bits=16).lowering()
    prepared, stats = _prepared(graph, data)
    the_plan = plan(prepared, lowering, stats, None, None)
    student = Student(prepared, the_plan, ("weights", "scales"))
    reintegerize(prepared, student.parameters_now(), lowering)  # the post-training steps fit
    last = [layer.weight for layer in the_plan.layers].index("classifier.1.weight")
    with torch.no_grad():  # steps 1000 times finer: every weight saturates at +-127
        student.steps[last].fill_(float(np.log(1e-3)))
    with pytest.raises(intq.NumericsError, match="outside int32") as info:
        reintegerize(prepared, student.parameters_now(), lowering)
    assert info.value.node == "/classifier/classifier.1/Gemm"
    assert "the distilled model cannot be proved" in str(info.value)
    assert "smaller scale_lr" in info.value.hint


def test_distillation_starts_from_the_given_integer_graph_bit_for_bit(digits_model):
    # Learned rounding (or any other) gives integers that round-to-nearest of the float
    # weights does not; bias correction moves the biases. Simulate both on a post-training
    # graph: distilled for 0 steps, the result is that graph, whatever made its integers.
    graph = intq.from_onnx(digits_model.path)
    data = _digits_data(32)
    post = intq.quantize(graph, data, CONFIG)
    altered = post.copy()
    rng = np.random.default_rng(0)
    changed = []
    for value in altered.constants:
        quant = value.type.quant
        if quant is None or value.const is None or quant.bits not in (4, 32):
            continue
        q = np.array(value.const)
        flip = rng.random(q.shape) < 0.2
        if quant.bits == 4:  # another rounding: one step up or down, within the range
            q = np.where(flip, np.clip(q + rng.choice([-1, 1], q.shape), -7, 7), q)
        else:  # a corrected bias
            q = np.where(flip, q + rng.integers(-50, 50, q.shape), q).astype(q.dtype)
        value.const = q.astype(value.const.dtype)
        changed.append(value.name)
    assert len(changed) >= 4  # weights and biases of several layers
    feeds = {"input": zoo._digits_split()[1][:8]}
    name = graph.outputs[0].name
    assert not np.array_equal(run_graph(altered, feeds)[name], run_graph(post, feeds)[name])
    for train in (("weights", "scales"), ("rounding", "scales"), ("scales",)):
        distilled = intq.distill(
            digits_model.path, altered, data, _small(steps=0, train=train), quant=CONFIG
        )
        for value_name in changed:
            want, got = altered.find(value_name), distilled.find(value_name)
            assert got is not None and np.array_equal(got.const, want.const), (train, value_name)
        assert np.array_equal(run_graph(distilled, feeds)[name], run_graph(altered, feeds)[name])
        history = distilled.analysis(DistillHistory)
        assert history is not None and history.best_step == 0
