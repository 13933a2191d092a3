"""One distillation of the digits CNN, run by ``tests/test_distillation.py`` in-process and
under ``torchrun`` (two CPU processes, gloo), which then compares the two results.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distill_worker.py \
        MODEL.onnx CHECKPOINT.pt
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import intq
from examples import zoo

# Nearest rounding, no bias correction: the post-training graph the tests compare the
# untrained student with.
CONFIG = intq.QuantConfig(
    weight_bits=4,
    activation_bits=4,
    calibration="minmax",
    rounding="nearest",
    bias_correction=False,
)


def distill(model: Path, checkpoint: Path) -> intq.ir.Graph:
    """Three steps of two batches each on the digits CNN; the final state in ``checkpoint``."""
    x_train = zoo._digits_split()[0]
    data = [{"input": x_train[i : i + 8]} for i in range(0, 64, 8)]
    distill = intq.DistillConfig(
        steps=3,
        batch=2,
        lr=1e-3,
        eval_every=3,
        checkpoint=checkpoint,
        checkpoint_every=3,
        threads=1,
        progress=False,
    )
    graph = intq.from_onnx(model)
    return intq.quantize(graph, data, replace(CONFIG, distill=distill))


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        distill(Path(sys.argv[1]), Path(sys.argv[2]))
    finally:
        dist.destroy_process_group()
