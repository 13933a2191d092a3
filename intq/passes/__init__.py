"""Graph passes and the pass manager.

Every pass is a frozen dataclass; those a pipeline string can spell are registered in
:data:`PASSES` under their names: ``intq.passes.pipeline("fold-batchnorm,dce")``.
``calibrate`` and ``smooth-layernorm`` (which take data) and ``integerize`` (whose per-layer
and per-kernel options are mappings) are built in Python; :func:`lowering_pipeline` lines up
the core steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from intq.passes.auto_clip import AutoClip, reservoir
from intq.passes.calibration import Calibrate
from intq.passes.constant_folding import ConstantFolding
from intq.passes.dce import DeadCodeElimination
from intq.passes.fold_batchnorm import FoldBatchNorm
from intq.passes.fold_pad import FoldPad
from intq.passes.fuse_transformer import FuseTransformer
from intq.passes.integer_only import CheckIntegerOnly
from intq.passes.integerize import Integerize
from intq.passes.learned_rounding import LearnedRounding
from intq.passes.manager import DumpHook, Pass, PassManager, PassResult, parse_pipeline
from intq.passes.range_analysis import RangeAnalysis
from intq.passes.smooth_layernorm import SmoothLayerNorm
from intq.passes.verify import Verify

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        CheckIntegerOnly,
        ConstantFolding,
        DeadCodeElimination,
        FoldBatchNorm,
        FoldPad,
        FuseTransformer,
        RangeAnalysis,
        Verify,
    )
}
"""Pass name -> pass class. A new pass adds its class here."""

PREPARE = "fold-batchnorm,fold-pad,fold-constants,fuse-transformer,dce"
"""The float clean-up pipeline run before calibration."""


def pipeline(text: str, *, verify_each: bool = False, dump: DumpHook | None = None) -> PassManager:
    """A :class:`PassManager` for a pipeline string such as ``"fold-batchnorm,dce"``."""
    return PassManager(parse_pipeline(text, PASSES), verify_each=verify_each, dump=dump)


def lowering_pipeline(
    calibration_data: Iterable[Mapping[str, np.ndarray]] | None,
    lowering: Integerize,
    *,
    progress: bool | None = None,
    verify_each: bool = False,
    dump: DumpHook | None = None,
) -> PassManager:
    """The core steps after the float clean-up, as one pipeline: ``calibrate`` (on the data),
    ``auto-clip`` when ``lowering`` calibrates ``auto`` (on a reservoir of the same data, read
    once), ``learned-rounding`` when ``lowering`` learns some layer's rounding (on the input
    Gram matrices ``calibrate`` gathers for it), ``integerize`` (with ``lowering``'s
    options), ``range-analysis`` (the overflow proof, kept on the graph for the backends),
    ``check-integer-only`` and ``verify``;
    ``verify_each`` and ``dump`` as for :func:`pipeline`. Without ``calibration_data`` there
    is no ``calibrate`` step: a pre-quantized model's graph carries its own ranges
    (``ModelQuantization``)."""
    calibrate: list[Pass] = []
    if calibration_data is not None:
        learns = lowering.learns if lowering.rounding != "nearest" else None
        corrects = lowering.corrects if lowering.bias_correction else None
        kept: list[Mapping[str, np.ndarray]] = []
        if lowering.calibration == "auto":
            calibration_data, kept = reservoir(calibration_data)
        calibrate.append(Calibrate(calibration_data, progress, corrects, learns))
        if lowering.calibration == "auto":
            calibrate.append(AutoClip(kept, lowering, progress))
        if learns is not None:
            calibrate.append(LearnedRounding(lowering, progress))
    return PassManager(
        [
            *calibrate,
            lowering,
            RangeAnalysis(),
            CheckIntegerOnly(allow_division=lowering.divides),
            Verify(),
        ],
        verify_each=verify_each,
        dump=dump,
    )


__all__ = [
    "PASSES",
    "PREPARE",
    "AutoClip",
    "Calibrate",
    "CheckIntegerOnly",
    "ConstantFolding",
    "DeadCodeElimination",
    "DumpHook",
    "FoldBatchNorm",
    "FoldPad",
    "FuseTransformer",
    "Integerize",
    "LearnedRounding",
    "Pass",
    "PassManager",
    "PassResult",
    "RangeAnalysis",
    "SmoothLayerNorm",
    "Verify",
    "lowering_pipeline",
    "parse_pipeline",
    "pipeline",
]
