"""Shared pytest configuration: offline HF settings, hypothesis profile, model-zoo fixtures.

Zoo models are built once per test session into a ``tmp_path_factory`` directory. Set
``INTQ_ZOO_DIR`` to a persistent directory to reuse the exported files across sessions
(the builders are cache-aware and version-stamp their file names).
"""

from __future__ import annotations

import os
from pathlib import Path

# Before anything can import transformers / huggingface_hub: tests must never hit the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from hypothesis import settings

from examples import zoo
from examples.zoo import ZooModel

# Compiling/simulating networks is slow and jittery on 2-core CI, so no per-example deadline.
# The examples are derived from each test, not drawn afresh: `make test` gives the same verdict
# on every run, and the search for new failures is `make fuzz`'s job (random, many more).
settings.register_profile("ci", deadline=None, max_examples=50, derandomize=True)
# `make fuzz`: the fuzz tests (tests/test_fuzz.py) with many more cases.
settings.register_profile("fuzz", deadline=None, max_examples=3000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ALL_MODEL_FIXTURES: list[str] = [
    "minilm_model",
    "efficientnet_model",
    "resnet18_model",
    "digits_model",
]
"""Fixture names of every zoo model, for ``request.getfixturevalue(name)`` parametrisation."""


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory the zoo models are exported into (``INTQ_ZOO_DIR`` or a session temp dir)."""
    persistent = os.environ.get("INTQ_ZOO_DIR")
    if persistent:
        path = Path(persistent)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def minilm_model(zoo_dir: Path) -> ZooModel:
    """all-MiniLM-L6-v2 BertModel, inputs input_ids/attention_mask int64 [2, 16]."""
    return zoo.minilm(zoo_dir)


@pytest.fixture(scope="session")
def efficientnet_model(zoo_dir: Path) -> ZooModel:
    """EfficientNet-Lite0 with ImageNet weights, input float32 [1, 3, 224, 224]."""
    return zoo.efficientnet_lite0(zoo_dir)


@pytest.fixture(scope="session")
def resnet18_model(zoo_dir: Path) -> ZooModel:
    """ResNet-18-shaped CNN with seeded random weights, input float32 [1, 3, 112, 112]."""
    return zoo.resnet18_like(zoo_dir)


@pytest.fixture(scope="session")
def digits_model(zoo_dir: Path) -> ZooModel:
    """Small CNN trained on sklearn digits, input float32 [8, 1, 8, 8]."""
    return zoo.digits_cnn(zoo_dir)
