"""Graph passes and the pass manager.

Every pass is a frozen dataclass registered in :data:`PASSES` under the name
pipelines use: ``intq.passes.pipeline("fold-batchnorm,dce")``.
"""

from __future__ import annotations

from intq.passes.constant_folding import ConstantFolding
from intq.passes.dce import DeadCodeElimination
from intq.passes.fold_batchnorm import FoldBatchNorm
from intq.passes.fold_pad import FoldPad
from intq.passes.fuse_transformer import FuseTransformer
from intq.passes.manager import DumpHook, Pass, PassManager, PassResult, parse_pipeline

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (ConstantFolding, DeadCodeElimination, FoldBatchNorm, FoldPad, FuseTransformer)
}
"""Pass name -> pass class. A new pass adds its class here."""


def pipeline(text: str, *, verify_each: bool = False, dump: DumpHook | None = None) -> PassManager:
    """A :class:`PassManager` for a pipeline string such as ``"fold-batchnorm,dce"``."""
    return PassManager(parse_pipeline(text, PASSES), verify_each=verify_each, dump=dump)


__all__ = [
    "PASSES",
    "ConstantFolding",
    "DeadCodeElimination",
    "DumpHook",
    "FoldBatchNorm",
    "FoldPad",
    "FuseTransformer",
    "Pass",
    "PassManager",
    "PassResult",
    "parse_pipeline",
    "pipeline",
]
