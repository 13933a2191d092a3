"""How long intq takes to import, print, parse and verify wide graphs: one Concat of N inputs,
from N distinct values (N nodes) or all from one value (a fan-out of N), at growing N. Each
step must grow linearly; the figures are in docs/security.md.

    python -m benchmarks.graph_size                 # N = 5,000, 20,000, 50,000
    python -m benchmarks.graph_size --sizes 1000,4000
"""

from __future__ import annotations

import argparse
import time

from onnx import TensorProto, helper

import intq
from benchmarks.machine import cpu_description, load_average
from intq.ir import from_text, to_text, verify


def concat_model(n: int, fan_out: bool):
    """y = Concat(x, x, ..., x) (fan-out) or Concat(Relu_1(x), ..., Relu_n(x))."""
    nodes = []
    if fan_out:
        inputs = ["x"] * n
    else:
        nodes = [helper.make_node("Relu", ["x"], [f"r{i}"], name=f"relu{i}") for i in range(n)]
        inputs = [f"r{i}" for i in range(n)]
    nodes.append(helper.make_node("Concat", inputs, ["y"], axis=0, name="cat"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model


def measure(n: int, fan_out: bool) -> dict[str, float]:
    """Seconds of each step for one graph."""
    model = concat_model(n, fan_out)
    times = {}
    start = time.perf_counter()
    graph = intq.from_onnx(model)
    times["import"] = time.perf_counter() - start
    start = time.perf_counter()
    text = to_text(graph)
    times["print"] = time.perf_counter() - start
    start = time.perf_counter()
    parsed = from_text(text)
    times["parse"] = time.perf_counter() - start
    start = time.perf_counter()
    verify(parsed)
    times["verify"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000,50000")
    args = parser.parse_args()
    print(f"{cpu_description()}; load {load_average():.1f}")
    print("| graph | N | import s | print s | parse s | verify s |")
    print("|---|---|---|---|---|---|")
    for fan_out in (False, True):
        for n in (int(s) for s in args.sizes.split(",")):
            t = measure(n, fan_out)
            kind = "Concat of N values" if not fan_out else "N-way fan-out of one value"
            cells = " | ".join(f"{t[k]:.2f}" for k in ("import", "print", "parse", "verify"))
            print(f"| {kind} | {n:,} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
