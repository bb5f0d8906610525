#!/usr/bin/env python3
"""Benchmark: qconvert (default int8, QDQ) against onnxruntime's
quantize_dynamic(per_channel=True, weight_type=QInt8) on a ~400 MB synthetic MLP
(6 x 4096x4096 MatMul + Add, fixed seed), in the same run. Prints median wall time, peak RSS
and the ratios against the issue's goals: >= 5x faster and <= 60 % of onnxruntime's peak RSS.

    .venv/bin/python Benchmarks/onnx_int8.py [--rounds 2] [--layers 6] [--width 4096]
"""
import argparse
import os
import pathlib
import subprocess
import sys

from common import alternate, report

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"


def generate(path, layers, width):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.float32(64))
        b = rng.standard_normal(width, dtype=np.float32) * np.float32(0.01)
        inits += [numpy_helper.from_array(w, f"layer{i}.weight"), numpy_helper.from_array(b, f"layer{i}.bias")]
        out = "y" if i == layers - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [prev, f"layer{i}.weight"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"layer{i}.bias"], [out])]
        prev = out
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save_model(m, str(path) + ".part")
    os.rename(str(path) + ".part", path)


def ort_quantize(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--qconvert", default=str(REPO / ".build/release/qconvert"))
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    ap.add_argument("--ort", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate:
        generate(pathlib.Path(a.generate), a.layers, a.width)
        return
    if a.ort:
        ort_quantize(*a.ort)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    src = WORK / f"mlp-{a.layers}x{a.width}.onnx"
    if not src.exists():
        subprocess.run([sys.executable, __file__, "--generate", str(src), "--layers", str(a.layers), "--width", str(a.width)], check=True)
    out_q, out_o = WORK / "mlp.qconvert.onnx", WORK / "mlp.ort.onnx"
    cmds = {
        "qconvert": [a.qconvert, str(src), "-o", str(out_q), "-q"],
        "onnxruntime": [sys.executable, __file__, "--ort", str(src), str(out_o)],
    }
    results = alternate(cmds, a.rounds)
    med = report(f"input {src.name}: {src.stat().st_size / 1e6:.0f} MB, {a.rounds} rounds, medians", results)
    q, o = med["qconvert"], med["onnxruntime"]
    print(f"  output sizes: qconvert {out_q.stat().st_size / 1e6:.1f} MB, onnxruntime {out_o.stat().st_size / 1e6:.1f} MB")
    print(f"  speed vs onnxruntime:  {o[0] / q[0]:.1f}x faster (goal >= 5x)")
    print(f"  peak RSS vs onnxruntime: {100 * q[1] / o[1]:.1f} % (goal <= 60 %)")
    for p in (out_q, out_o):
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
