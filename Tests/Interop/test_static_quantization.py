"""Static quantization of ONNX activations: `qconvert calibrate` runs the float model in onnxruntime's
C library over sample inputs, `--calibration` writes QuantizeLinear/DequantizeLinear pairs on the
activations. onnxruntime runs every output against the float model on held-out inputs (MiniLM-L3
sentence embeddings, a small CNN), compared with onnxruntime's own quantize_static on the same data."""
import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import QCONVERT, REPO, run

CALIBRATION = [f"Sentence {w} is about {t} and what people think of it." for w in range(4) for t in ["cats", "rivers", "music", "bread", "code", "trains", "weather", "money"]]
HELD_OUT = [
    "The cat sits on the mat.", "A quantized model should answer like the float one.",
    "Paris is the capital of France.", "I like programming in Swift and in Python.",
    "The weather today is sunny with a light breeze from the west.", "Quarterly revenue rose by twelve percent.",
]


def tokens(folder, texts, length=64):
    from transformers import AutoTokenizer

    b = AutoTokenizer.from_pretrained(str(folder))(texts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return {"input_ids": b["input_ids"].astype(np.int64), "attention_mask": b["attention_mask"].astype(np.int64)}


def session(path, threads=1):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), o)


def embeddings(path, feeds):
    e = session(path).run(None, feeds)[3]
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def minilm(minilm_l3_onnx, minilm_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("static")
    np.savez(d / "calib.npz", **tokens(minilm_folder, CALIBRATION))
    stats = d / "stats.json"
    run("calibrate", minilm_l3_onnx, "--data", d / "calib.npz", "-o", stats, "-q")
    return {"model": minilm_l3_onnx, "dir": d, "stats": stats, "held": tokens(minilm_folder, HELD_OUT)}


def ort_static(model, data, out, method, activation_type):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            z = np.load(data)
            self.it = iter([{k: z[k][i:i + 1] for k in z.files} for i in range(z[z.files[0]].shape[0])])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
                    calibrate_method={"max": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[method])


def test_statistics_follow_the_schema(minilm):
    import jsonschema

    stats = json.loads(minilm["stats"].read_text())
    jsonschema.validate(stats, json.loads((REPO / "Schemas" / "calibration.schema.json").read_text()))
    assert stats["samples"] == len(CALIBRATION) and len(stats["tensors"]) == 24
    # the statistics are the values onnxruntime computes: one tensor checked with numpy
    name = sorted(stats["tensors"])[0]
    m = onnx.load(str(minilm["model"]))
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString())
    z = np.load(minilm["dir"] / "calib.npz")
    values = np.concatenate([s.run([name], {k: z[k][i:i + 1] for k in z.files})[0].ravel() for i in range(len(CALIBRATION))])
    t = stats["tensors"][name]
    assert t["count"] == values.size and t["min"] == pytest.approx(float(values.min()), rel=1e-6) and t["max"] == pytest.approx(float(values.max()), rel=1e-6)
    nonzero = values[values != 0]
    assert t["zeros"] == values.size - nonzero.size
    want, _ = np.histogram(np.minimum(np.abs(nonzero), t["histogram_max"]), bins=stats["bins"], range=(0, t["histogram_max"]))
    assert sum(t["histogram"]) == nonzero.size
    assert np.abs(np.asarray(t["histogram"]) - want).sum() <= 0.001 * values.size  # bin edges in float32


@pytest.mark.parametrize("method", ["max", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_static_minilm_is_as_accurate_as_quantize_static_and_runs_integer_kernels(minilm, tmp_path, method, dtype):
    policy = tmp_path / "p.yaml"
    mapping = "affine" if dtype == "uint8" else "scale"
    policy.write_text(f"activations:\n  dtype: {dtype}\n  mapping: {mapping}\n  calibration: {method}\n  percentile: 99.99\n")
    out = tmp_path / "static.onnx"
    run(minilm["model"], "-o", out, "--calibration", minilm["stats"], "--policy", policy, "-q")
    onnx.checker.check_model(str(out))
    ref = embeddings(minilm["model"], minilm["held"])
    ours = (ref * embeddings(out, minilm["held"])).sum(-1).min()
    theirs = None
    if method != "mse":  # quantize_static has no mse calibration
        theirs_path = tmp_path / "ort.onnx"
        ort_static(minilm["model"], minilm["dir"] / "calib.npz", theirs_path, method, dtype)
        theirs = (ref * embeddings(theirs_path, minilm["held"])).sum(-1).min()
    print(f"MiniLM-L3 static {dtype} {method}: sentence cosine {ours:.4f}, quantize_static {theirs}")
    assert ours >= (theirs - 1e-4 if theirs is not None else 0.95), (ours, theirs)
    # the metadata records every activation's range, method and the statistics' hash
    written = onnx.load(str(out))
    doc = json.loads(next(p.value for p in written.metadata_props if p.key == "qconvert.quantization"))
    # every calibrated activation is quantized once: the weights' MatMuls take the static integer form
    # (MatMulIntegerToFloat, bias folded), the attention's activation x activation MatMuls get pairs
    quantized = [n.input[0] for n in written.graph.node if n.op_type == "QuantizeLinear"]
    stats = json.loads(minilm["stats"].read_text())["tensors"]
    assert sorted(quantized) == sorted(doc["activations"]) == sorted(k for k, t in stats.items() if not t["constant"])
    assert doc["calibration_statistics"].startswith("sha256:")
    assert {a["calibration"] for a in doc["activations"].values()} == {method}
    # under int8 the weights' multiplicands are uint8 (onnxruntime's MatMulIntegerToFloat takes a slow
    # path for int8 inputs on x86: 44 ms against 6.5), the attention's products keep int8
    weight_inputs = {n.input[0] for n in written.graph.node if n.op_type == "QuantizeLinear" and any(
        m.op_type == "MatMulIntegerToFloat" and m.input[0] == n.output[0] and m.input[1].startswith("onnx::") for m in written.graph.node)}
    assert len(weight_inputs) == 12
    for k, a in doc["activations"].items():
        want = "uint8" if dtype == "uint8" or k in weight_inputs else "int8"
        assert a["dtype"] == want and ("note" in a) == (dtype == "int8" and k in weight_inputs), (k, a)
    static = [n for n in written.graph.node if n.op_type == "MatMulIntegerToFloat" and n.domain == "com.microsoft"]
    assert len(static) == 18 and all(len(n.input) == 7 for n in static)  # the bias folded in
    forms = [t["onnx"]["form"] for t in doc["tensors"].values() if "onnx" in t]
    assert forms.count("static") == 18 and forms.count("gatherblockquantized") >= 1, forms
    # onnxruntime runs every MatMul as an integer kernel (speed: Benchmarks/static_calibration.py)
    o = ort.SessionOptions()
    o.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), o)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearMatMul") + ops.count("MatMulIntegerToFloat") == 24 and "MatMul" not in ops, set(ops)


def cnn(path):
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n) for n, s in
             [("c1", (16, 3, 3, 3)), ("c2", (32, 16, 3, 3)), ("fc", (32, 10))]]
    nodes = [helper.make_node("Conv", ["x", "c1"], ["h1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2"], ["h2"], pads=[1, 1, 1, 1], strides=[2, 2]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_a_small_cnn_runs_as_qlinearconv(tmp_path, dtype):
    cnn(tmp_path / "cnn.onnx")
    (tmp_path / "p.yaml").write_text(f"activations:\n  dtype: {dtype}\n  mapping: {'affine' if dtype == 'uint8' else 'scale'}\n")
    rng = np.random.default_rng(0)
    (tmp_path / "samples").mkdir()
    for i in range(8):
        np.savez(tmp_path / "samples" / f"{i}.npz", x=rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    run("calibrate", tmp_path / "cnn.onnx", "--data", tmp_path / "samples", "-o", tmp_path / "s.json", "-q")
    stats = json.loads((tmp_path / "s.json").read_text())
    assert set(stats["tensors"]) == {"x", "r1", "f"}  # the graph input too
    run(tmp_path / "cnn.onnx", "-o", tmp_path / "q.onnx", "--calibration", tmp_path / "s.json", "--policy", tmp_path / "p.yaml",
        "--set", "min_elements=0", "-q")
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = session(tmp_path / "cnn.onnx").run(None, {"x": x})[0]
    o = ort.SessionOptions()
    o.optimized_model_filepath = str(tmp_path / "opt.onnx")
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), o).run(None, {"x": x})[0]
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.99, cos
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops, ops
    # a Conv's input and a weight's multiplicand are uint8 either way: onnxruntime on x86 runs int8 ones
    # slower than the float model (an int8 pair into Conv stays float); the metadata says why
    written = onnx.load(str(tmp_path / "q.onnx"))
    zp = {i.name: i.data_type for i in written.graph.initializer if i.name.endswith("_zero_point")}
    assert zp["r1_zero_point"] == zp["f_zero_point"] == TensorProto.UINT8
    doc = json.loads(next(p.value for p in written.metadata_props if p.key == "qconvert.quantization"))
    assert all(("note" in a) == (dtype == "int8") and a["dtype"] == "uint8" for a in doc["activations"].values())
    # plan shows the same decisions: the weights' forms and the activations' notes
    plan = run("plan", tmp_path / "cnn.onnx", "--calibration", tmp_path / "s.json", "--policy", tmp_path / "p.yaml",
               "--set", "min_elements=0").stdout
    assert "onnx: static" in plan and "onnx: qdq" in plan
    assert plan.count("uint8 (affine) instead of int8") == (3 if dtype == "int8" else 0), plan


def test_masks_and_constants_are_left_out_where_quantize_static_fails(tmp_path):
    """A MatMul fed x + mask, the mask holding -3.4e38 (as attention masks do): the huge values are
    counted as excluded and the range is that of the data."""
    mask = np.zeros((1, 8), np.float32)
    mask[0, 5:] = np.finfo(np.float32).min
    w = np.eye(8, dtype=np.float32)
    nodes = [helper.make_node("Add", ["x", "mask"], ["xm"]), helper.make_node("MatMul", ["xm", "w"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])],
                          [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(1).uniform(-2, 2, (16, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    run("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "-o", tmp_path / "s.json", "-q")
    t = json.loads((tmp_path / "s.json").read_text())["tensors"]["xm"]
    assert t["excluded"] == 16 * 3 and t["count"] == 16 * 5
    assert t["min"] == pytest.approx(float(x[:, :5].min())) and t["max"] == pytest.approx(float(x[:, :5].max()))


def test_without_onnxruntime_calibrate_fails_in_one_line(tmp_path):
    cnn(tmp_path / "cnn.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 3, 32, 32), np.float32))
    r = subprocess.run([QCONVERT, "calibrate", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "s.json"),
                        "--onnxruntime", str(tmp_path / "missing.so")], capture_output=True, text=True)
    assert r.returncode == 64 and "pip install onnxruntime" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.json").exists()


def test_statistics_from_another_tool_are_taken(tmp_path):
    """A statistics file written by hand to the schema drives the quantization: max calibration gives
    exactly the scale and zero point numpy computes from its min and max."""
    cnn(tmp_path / "cnn.onnx")
    hist = [0] * 16
    hist[3] = 10
    stats = {"format": "qconvert.calibration/1", "bins": 16, "tensors": {
        "r1": {"count": 10, "min": 0.0, "max": 3.0, "histogram_max": 3.0, "histogram": hist},
        "f": {"count": 10, "min": -1.0, "max": 2.0, "histogram_max": 2.0, "histogram": hist}}}
    (tmp_path / "s.json").write_text(json.dumps(stats))
    run(tmp_path / "cnn.onnx", "-o", tmp_path / "q.onnx", "--calibration", tmp_path / "s.json", "--set", "min_elements=0", "-q")
    m = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    doc = json.loads(next(p.value for p in m.metadata_props if p.key == "qconvert.quantization"))
    # r1 feeds a Conv (its pair), f the MatMul (the static integer form's QuantizeLinear)
    assert set(doc["activations"]) == {"r1", "f"}
    for name, lo, hi in [("r1", 0.0, 3.0), ("f", -1.0, 2.0)]:
        a = doc["activations"][name]
        s = (np.float32(hi) - np.float32(lo)) / np.float32(255)  # uint8 affine over [lo, hi]
        z = int(np.clip(0 - np.round(np.float32(lo) / s), 0, 255))
        assert np.float32(a["scale"]) == s and a["zero_point"] == z and a["range"] == [lo, hi]
        assert inits[f"{name}_scale"] == s and int(inits[f"{name}_zero_point"]) == z


def test_calibrate_never_writes_over_its_model_or_samples(tmp_path):
    cnn(tmp_path / "cnn.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 32, 32), np.float32))
    (tmp_path / "samples").mkdir()
    np.savez(tmp_path / "samples" / "0.npz", x=np.zeros((1, 3, 32, 32), np.float32))
    before = {p: p.read_bytes() for p in [tmp_path / "cnn.onnx", tmp_path / "d.npz", tmp_path / "samples" / "0.npz"]}
    for data, out in [("d.npz", "cnn.onnx"), ("d.npz", "d.npz"), ("samples", "samples/0.npz")]:
        r = subprocess.run([QCONVERT, "calibrate", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / data), "-o", str(tmp_path / out)],
                           capture_output=True, text=True)
        assert r.returncode == 64 and len(r.stderr.strip().splitlines()) == 1 and "no file was changed" in r.stderr, r.stderr
    assert all(p.read_bytes() == b for p, b in before.items())


def test_weight_only_minilm_quantizes_every_sequence_product_at_run_time(minilm, minilm_l3_onnx, tmp_path):
    """The attention output projection multiplies a Reshape whose shape is built at run time (Shape →
    Gather → Unsqueeze → Concat): its rank (3) is known from the shape vector's length, so it takes the
    dynamic form like the other sequence products, not MatMulNBits (slower there: 6.9 against 6.4 ms)."""
    out = tmp_path / "w.onnx"
    run(minilm_l3_onnx, "-o", out, "-q")
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulInteger") == 18 and "MatMulNBits" not in ops, sorted(set(ops))
    ref = embeddings(minilm_l3_onnx, minilm["held"])
    assert (ref * embeddings(out, minilm["held"])).sum(-1).min() > 0.99  # onnxruntime runs it as the float one


def test_external_data_models_calibrate_like_inline_ones_and_two_passes_bin_exactly(minilm, tmp_path):
    """A model whose weights are external data gives the same statistics as the same model inline (they
    were refused); --passes 2 gives histograms over exactly [0, max |x|] with the same ranges and counts."""
    m = onnx.load(str(minilm["model"]))
    onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.weights", size_threshold=1024)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    run("calibrate", tmp_path / "ext.onnx", "--data", minilm["dir"] / "calib.npz", "-o", tmp_path / "ext.json", "-q")
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "ext.json"} == before
    ours = json.loads(minilm["stats"].read_text())["tensors"]
    assert json.loads((tmp_path / "ext.json").read_text())["tensors"] == ours
    run("calibrate", minilm["model"], "--data", minilm["dir"] / "calib.npz", "-o", tmp_path / "two.json", "--passes", "2", "-q")
    two = json.loads((tmp_path / "two.json").read_text())["tensors"]
    assert two.keys() == ours.keys()
    for k, t in two.items():
        assert (t["count"], t.get("min"), t.get("max"), t.get("zeros")) == (ours[k]["count"], ours[k].get("min"), ours[k].get("max"), ours[k].get("zeros"))
        if t["count"] and not t["constant"]:
            assert t["histogram_max"] == max(abs(t["min"]), abs(t["max"]))
            assert ours[k]["histogram_max"] >= t["histogram_max"] and ours[k]["histogram_max"] < 1.125 * t["histogram_max"]
            assert sum(t["histogram"]) == sum(ours[k]["histogram"])


def test_an_explicit_onnx_form_qdq_keeps_the_portable_qdq_pattern(minilm, tmp_path):
    """`--onnx-form qdq` with --calibration writes standard QuantizeLinear/DequantizeLinear only (no
    com.microsoft kernel), and says that its embedding table is dequantized whole at every run."""
    out = tmp_path / "qdq.onnx"
    r = run(minilm["model"], "-o", out, "--calibration", minilm["stats"], "--onnx-form", "qdq")
    onnx.checker.check_model(str(out))
    written = onnx.load(str(out))
    assert not [n for n in written.graph.node if n.domain == "com.microsoft"]
    matmuls = [n for n in written.graph.node if n.op_type == "MatMul"]
    producers = {o: n.op_type for n in written.graph.node for o in n.output}
    assert len(matmuls) == 24 and all(producers.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)
    assert "dequantizes the whole table at every run" in r.stdout
    ref = embeddings(minilm["model"], minilm["held"])
    assert (ref * embeddings(out, minilm["held"])).sum(-1).min() > 0.99


def test_calibrate_never_writes_over_its_models_external_data(minilm, tmp_path):
    """The external data file of the model is an input too: `-o` naming it is refused before anything runs
    and the file is left as it was."""
    m = onnx.load(str(minilm["model"]))
    onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.weights", size_threshold=1024)
    weights = tmp_path / "ext.onnx.weights"
    before = weights.read_bytes()
    r = run("calibrate", tmp_path / "ext.onnx", "--data", minilm["dir"] / "calib.npz", "-o", weights, "-q", check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ext.onnx.weights" in r.stderr and "no file was changed" in r.stderr
    assert weights.read_bytes() == before
