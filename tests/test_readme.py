"""The README's code blocks run as written.

Every ``python`` block of README.md runs, in order, in one namespace, and every ``intq``
command of its ``sh`` blocks runs through :func:`intq.cli.main`, in a directory holding the
files the README names: ``model.onnx`` (a small ResNet-shaped CNN whose layer names are the
ones the README quotes), ``calib.npz``, ``in.npz``, ``cfg.toml`` (the README's own TOML
block) and ``model_qdq.onnx`` (ONNX Runtime's ``quantize_static`` of ``model.onnx``). The
names a block uses without defining (``calibration_data``, ``x``, ``batches``, ``model``,
``dataloader``, ``array``) are defined before the first block, as a reader would have them.
Shell lines that are not ``intq`` commands (``make``, ``pip``) are not run here.
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import intq
from intq.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

# The one README command that needs what a test machine does not have: a TVM RPC tracker
# and a device registered with it. Run anyway, it must fail cleanly, naming the tracker.
_NEEDS_A_DEVICE = "--rpc-tracker"


def blocks(language: str) -> list[tuple[int, str]]:
    """``(line, source)`` of every fenced README block in ``language``."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M):
        found.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return found


def commands() -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every ``intq`` command in the README's ``sh`` blocks."""
    found = []
    for start, source in blocks("sh"):
        joined = source.replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "intq":
                found.append((start + offset, argv[1:]))
    return found


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class _SmallResNet(nn.Module):
    """ResNet-shaped, small enough for seconds per backend; ``layer4.1.conv2`` exists."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, stride=8, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer4 = nn.Sequential(_Block(8), _Block(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layer4(x).mean((2, 3)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with every file the README's examples name."""
    work = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    module = _SmallResNet().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    samples = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(samples[:1]),),
            str(work / "model.onnx"),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
        )
    np.savez(work / "calib.npz", input=samples)
    np.savez(work / "in.npz", input=samples[:1])
    (work / "cfg.toml").write_text(blocks("toml")[0][1], encoding="utf-8")
    _quantize_with_onnxruntime(work, samples)
    torch.save(module, work / "module.pt")
    return work


def _quantize_with_onnxruntime(work: Path, samples: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": samples[i : i + 1]} for i in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(work / "model.onnx"),
        str(work / "model_qdq.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        extra_options={"ActivationSymmetric": True},
    )
    onnx.checker.check_model(str(work / "model_qdq.onnx"))


def test_the_readme_has_python_and_cli_examples() -> None:
    assert len(blocks("python")) >= 5
    assert len(commands()) >= 15


def test_every_python_block_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    samples = np.load("calib.npz")["input"]
    labels = torch.zeros(len(samples), dtype=torch.long)
    namespace = {
        "intq": intq,
        "torch": torch,
        "np": np,
        "model": torch.load("module.pt", weights_only=False),
        "calibration_data": samples,
        "array": samples,
        "x": samples[:1],
        "batches": [samples[i : i + 1] for i in range(4)],
        "dataloader": torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.from_numpy(samples), labels), batch_size=8
        ),
    }
    for line, source in blocks("python"):
        try:
            exec(compile(source, f"README.md:{line}", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"README.md line {line}: {type(err).__name__}: {err}")
    # The quickstart's run of the small CNN: its logits, one sample.
    assert np.shape(namespace["outputs"]["logits"]) == (1, 10)


def test_every_cli_command_runs(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(workdir)
    failures = []
    for line, argv in commands():  # in order: later commands read what earlier ones wrote
        code = main(argv)
        err = capsys.readouterr().err
        if _NEEDS_A_DEVICE in argv:
            if code != 1 or "10.0.0.5:9190" not in err:
                failures.append(f"line {line}: expected a clean refusal naming the tracker: {err}")
        elif code != 0:
            failures.append(f"line {line}: intq {shlex.join(argv)} exited {code}: {err}")
    assert not failures, "\n".join(failures)


def test_the_coverage_summary_matches_the_recorded_table() -> None:
    """The README's count of converting corpus models is the recorded table's count."""
    table = (README.parent / "benchmarks" / "README.md").read_text(encoding="utf-8")
    section = table[table.index("## `coverage.py`") :]
    section = section[: section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    converting = sum(line.split(" | ")[8] == "ok" for line in rows)  # the `exact` column
    claimed = re.search(r"(\d+) of the (\d+) \((\d+)%\) convert", README.read_text("utf-8"))
    assert claimed is not None
    assert (int(claimed[1]), int(claimed[2])) == (converting, len(rows))
    assert f"**{converting} of {len(rows)} models" in section
