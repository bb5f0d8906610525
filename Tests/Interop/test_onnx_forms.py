"""The ONNX forms of quantized MatMul/Gemm weights (qdq, matmulnbits, dynamic, auto), judged by the onnx
checker, onnxruntime and a numpy reference of the quantized weights decoded independently here."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

import reference as ref
from conftest import run


def model(path, kind, k=96, n=80, opset=17):
    """2-D MLP (MatMul + Add + Relu), a 3-D one, Gemm (transB 0 and 1, with C), one weight used twice."""
    r = np.random.default_rng(7)
    inits, nodes = [], []
    w1 = (r.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b1 = (r.standard_normal(n) * 0.1).astype(np.float32)
    w2 = (r.standard_normal((n, k)) / np.sqrt(n)).astype(np.float32)
    x_shape = ["B", k] if kind != "mlp3d" else ["B", 5, k]
    if kind in ("mlp2d", "mlp3d"):
        inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"), helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
                 helper.make_node("Relu", ["a1"], ["r1"], name="relu1"), helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    elif kind == "gemm":
        inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2.T.copy(), "w2")]
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="gemm1"), helper.make_node("Relu", ["g1"], ["r1"], name="relu1"),
                 helper.make_node("Gemm", ["r1", "w2"], ["y"], transB=1, name="gemm2")]
    elif kind == "shared":
        sq = (r.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
        inits = [numpy_helper.from_array(sq, "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"), helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
                 helper.make_node("MatMul", ["t", "w"], ["y"], name="mm2")]
    out_dim = k
    y_shape = x_shape[:-1] + [out_dim]
    g = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.save(m, str(path))
    return {t.name: numpy_helper.to_array(t) for t in inits}


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def feeds(kind, k=96):
    shape = (4, 5, k) if kind == "mlp3d" else (4, k)
    return {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def decode_matmulnbits(out_model, weight, record):
    """The weight's integer codes [K, N] (or [N, K]) and per-element scales, decoded from B/scales/zero
    points as onnxruntime documents them (independently of qconvert's code)."""
    inits = {t.name: numpy_helper.to_array(t) for t in out_model.graph.initializer}
    o = record["onnx"]
    k, n, bits, bs, n_axis = o["K"], o["N"], o["bits"], o["block_size"], o["n_axis"]
    b = inits[record["values"]]
    blocks = (k + bs - 1) // bs
    assert b.shape == (n, blocks, bs * bits // 8) and b.dtype == np.uint8
    if bits == 4:
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks * bs)
    else:
        codes = b.reshape(n, blocks * bs)
    codes = codes[:, :k].astype(np.int64)
    scales = inits[record["scale"]].reshape(n, blocks)
    if record.get("zero_point"):
        zp = inits[record["zero_point"]]
        if bits == 4:
            zp = np.stack([zp.reshape(n, -1) & 0x0F, zp.reshape(n, -1) >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        zp = zp.reshape(n, blocks).astype(np.int64)
    else:
        zp = np.full((n, blocks), 1 << (bits - 1), np.int64)
    s_full = np.repeat(scales, bs, axis=1)[:, :k]
    z_full = np.repeat(zp, bs, axis=1)[:, :k]
    values = ((codes - z_full) * s_full).astype(np.float32)       # [N, K]
    return (values.T if n_axis == 1 else values), codes


SCHEMES = {
    "int8": (["--preset", "int8"], dict(dtype="int8", mapping="scale", granularity="channel")),
    "w4g32": (["--preset", "w4g128", "--set", "group_size=32"], dict(dtype="int4", mapping="scale-full", granularity="group", group_size=32)),
    "uint8-affine-g16": (["--set", "dtype=uint8", "--set", "mapping=affine", "--set", "granularity=group", "--set", "group_size=16"],
                         dict(dtype="uint8", mapping="affine", granularity="group", group_size=16)),
}


@pytest.mark.parametrize("kind", ["mlp2d", "mlp3d", "gemm", "shared"])
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_matmulnbits_weights_are_the_numpy_reference_and_run(tmp_path, kind, scheme):
    src = tmp_path / "m.onnx"
    weights = model(src, kind)
    args, params = SCHEMES[scheme]
    out = tmp_path / "q.onnx"
    run(src, "-o", out, "-q", "--set", "min_elements=0", "--onnx-form", "matmulnbits", *args)
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert {o.domain: o.version for o in m.opset_import}.get("com.microsoft") == 1
    ops = [nd.op_type for nd in m.graph.node]
    assert "DequantizeLinear" not in ops and "MatMul" not in ops and "Gemm" not in ops, ops
    doc = json.loads({p.key: p.value for p in m.metadata_props}["qconvert.quantization"])
    for name, w in weights.items():
        if w.ndim != 2:
            continue
        rec = doc["tensors"][name]
        assert rec["onnx"]["form"] == "matmulnbits"
        axis = rec.get("axis", 0)
        q, s, z = ref.quantize(w, params["dtype"], params["mapping"], params["granularity"], axis=axis, group_size=params.get("group_size", 128))
        want = ref.dequantize(q, s, z, w.shape, params["granularity"], axis, params.get("group_size", 128))
        got, codes = decode_matmulnbits(m, name, rec)
        np.testing.assert_array_equal(got, want)          # exact integers and scales
    # onnxruntime against the float model, and exactly the reference weights at accuracy level 0
    f = feeds(kind)
    y_float = session(src).run(None, f)[0]
    y_q = session(out).run(None, f)[0]
    assert cosine(y_float, y_q) >= (0.98 if scheme.startswith("w4") else 0.999)
    exact = tmp_path / "exact.onnx"
    run(src, "-o", exact, "-q", "--set", "min_elements=0", "--set", "accuracy_level=0", "--onnx-form", "matmulnbits", *args)
    deq = tmp_path / "deq.safetensors"
    run("dequantize", exact, "-o", deq)
    ref_model = tmp_path / "ref.onnx"
    mm = onnx.load(str(src))
    restored = load_file(str(deq))
    for t in mm.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(restored[t.name], t.name))
    onnx.save(mm, str(ref_model))
    np.testing.assert_allclose(session(exact).run(None, f)[0], session(ref_model).run(None, f)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mlp2d", "mlp3d", "gemm", "shared"])
def test_every_form_dequantizes_to_the_same_floats_and_runs(tmp_path, kind):
    src = tmp_path / "m.onnx"
    model(src, kind)
    f = feeds(kind)
    y_float = session(src).run(None, f)[0]
    restored = {}
    for form in ("qdq", "matmulnbits", "dynamic", "auto"):
        out = tmp_path / f"{form}.onnx"
        run(src, "-o", out, "-q", "--set", "min_elements=0", "--onnx-form", form)
        m = onnx.load(str(out))
        onnx.checker.check_model(m, full_check=True)
        ops = {nd.op_type for nd in m.graph.node}
        if form == "dynamic" and kind != "gemm":
            assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops
        if form == "dynamic" and kind == "gemm":
            assert "MatMulNBits" in ops        # Gemm transB=1 has no dynamic form here: MatMulNBits instead
        if form == "qdq":
            assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
        y = session(out).run(None, f)[0]
        assert cosine(y_float, y) >= 0.998, form
        run("dequantize", out, "-o", tmp_path / f"{form}.safetensors")
        restored[form] = load_file(str(tmp_path / f"{form}.safetensors"))
    for form, tensors in restored.items():
        for name, v in tensors.items():
            np.testing.assert_array_equal(v, restored["qdq"][name], err_msg=f"{form} {name}")


def test_dynamic_quantizes_each_activation_once(tmp_path):
    """Two weights multiplying the same activation share one DynamicQuantizeLinear."""
    r = np.random.default_rng(3)
    inits = [numpy_helper.from_array((r.standard_normal((64, 32)) / 8).astype(np.float32), n) for n in ("q", "k")]
    nodes = [helper.make_node("MatMul", ["x", "q"], ["yq"]), helper.make_node("MatMul", ["x", "k"], ["yk"]),
             helper.make_node("Add", ["yq", "yk"], ["y"])]
    g = helper.make_graph(nodes, "qk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])], inits)
    src = tmp_path / "qk.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    out = tmp_path / "qk.dyn.onnx"
    run(src, "-o", out, "-q", "--set", "min_elements=0", "--onnx-form", "dynamic")
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert [nd.op_type for nd in m.graph.node].count("DynamicQuantizeLinear") == 1
    x = {"x": r.standard_normal((3, 64)).astype(np.float32)}
    assert cosine(session(src).run(None, x)[0], session(out).run(None, x)[0]) >= 0.995


def test_plan_names_the_form_and_the_fallbacks(tmp_path):
    src = tmp_path / "m.onnx"
    model(src, "gemm")
    p = run("plan", src, "--set", "min_elements=0", "--onnx-form", "dynamic").stdout
    assert "onnx: dynamic" in p and "onnx: matmulnbits" in p and "transposed" in p
    p = run("plan", src, "--set", "min_elements=0", "--onnx-form", "qdq").stdout
    assert "onnx: qdq" in p and "Gemm" in p
    p = run("plan", src, "--set", "min_elements=0", "--set", "granularity=element").stdout
    assert "kept float" in p and "onnx_form: qdq quantizes it" in p        # auto never makes inference slower
    p = run("plan", src, "--set", "min_elements=0", "--set", "granularity=element", "--onnx-form", "qdq").stdout
    assert "onnx: qdq" in p
    p = run("plan", src, "--set", "min_elements=0", "--set", "onnx_form=matmulnbits", "--set", "granularity=group", "--set", "group_size=24").stdout
    assert "group size 24 is not a power of two" in p
    # the fallback then needs blocked DequantizeLinear, which opset 17 lacks: refused in one line, nothing written
    r = run(src, "-o", tmp_path / "x.onnx", "--set", "min_elements=0", "--set", "onnx_form=matmulnbits", "--set", "granularity=group",
            "--set", "group_size=24", check=False)
    assert r.returncode == 64 and "opset" in r.stderr and not (tmp_path / "x.onnx").exists()


def test_auto_keeps_float_what_would_run_slower(tmp_path):
    """Under the default form a Conv weight (which onnxruntime would dequantize at every run) stays
    float with a note; the MatMul weight becomes MatMulNBits; --onnx-form qdq quantizes both."""
    r = np.random.default_rng(5)
    inits = [numpy_helper.from_array((r.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32), "conv"),
             numpy_helper.from_array((r.standard_normal((32, 64)) / 6).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 64])], inits)
    src = tmp_path / "cnn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    out = tmp_path / "auto.onnx"
    summary = run(src, "-o", out, "--set", "min_elements=0").stdout
    assert "conv: kept float: onnxruntime would run its DequantizeLinear at every inference" in summary
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    inits_out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert inits_out["conv"].dtype == np.float32 and "fc" not in inits_out
    assert [nd.op_type for nd in m.graph.node] == ["Conv", "GlobalAveragePool", "Flatten", "MatMulNBits"]
    doc = json.loads({p.key: p.value for p in m.metadata_props}["qconvert.quantization"])
    assert set(doc["tensors"]) == {"fc"}
    out = tmp_path / "qdq.onnx"
    run(src, "-o", out, "-q", "--set", "min_elements=0", "--onnx-form", "qdq")
    ops = [nd.op_type for nd in onnx.load(str(out)).graph.node]
    assert ops.count("DequantizeLinear") == 2
    x = {"x": r.standard_normal((2, 16, 8, 8)).astype(np.float32)}
    assert cosine(session(src).run(None, x)[0], session(out).run(None, x)[0]) >= 0.999


@pytest.mark.parametrize("kind,preset,form", [("mlp2d", "int8", "MatMulNBits"), ("mlp3d", "int8", "MatMulInteger"),
                                              ("mlp3d", "w4g128", "MatMulNBits"), ("gemm", "int8", "MatMulNBits")])
def test_auto_picks_the_fast_form_for_the_activation(tmp_path, kind, preset, form):
    """8-bit weights multiplying sequences (rank-3 activations) take the dynamic form, whose int8 GEMM is
    fastest on large products; batches of vectors and 4-bit weights take MatMulNBits."""
    src = tmp_path / "m.onnx"
    model(src, kind)
    out = tmp_path / "auto.onnx"
    run(src, "-o", out, "-q", "--set", "min_elements=0", "--preset", preset, "--set", "group_size=32")
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    ops = {nd.op_type for nd in m.graph.node}
    assert form in ops and "DequantizeLinear" not in ops, ops
    f = feeds(kind)
    assert cosine(session(src).run(None, f)[0], session(out).run(None, f)[0]) >= (0.98 if preset == "w4g128" else 0.998)


def test_a_weight_used_inside_a_subgraph_stays_valid(tmp_path):
    """A main-graph weight that If branches multiply (an outer-scope reference) cannot become
    MatMulNBits there: the output stays a valid model that runs (the weight keeps DequantizeLinear
    under qdq, stays float under auto)."""
    r = np.random.default_rng(9)
    w = numpy_helper.from_array((r.standard_normal((32, 16)) / 6).astype(np.float32), "w")

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], [name + "_y"])], name, [],
                                 [helper.make_tensor_value_info(name + "_y", TensorProto.FLOAT, ["B", 16])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    g = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 16])], [w])
    src = tmp_path / "if.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    x = {"c": np.array(True), "x": r.standard_normal((2, 32)).astype(np.float32)}
    for form in ("auto", "matmulnbits", "dynamic", "qdq"):
        out = tmp_path / f"{form}.onnx"
        run(src, "-o", out, "-q", "--set", "min_elements=0", "--onnx-form", form)
        onnx.checker.check_model(str(out), full_check=True)
        assert cosine(session(src).run(None, x)[0], session(out).run(None, x)[0]) >= 0.999, form


@pytest.mark.parametrize("preset", ["int8", "w4g128", "uint8"])
def test_embeddings_become_gatherblockquantized_and_run(tmp_path, preset):
    """A table used only by Gather (an embedding) is written as GatherBlockQuantized: onnxruntime
    gathers the rows and dequantizes only those; the rows equal the numpy reference's, and
    dequantize gives the same floats as the qdq form."""
    r = np.random.default_rng(4)
    table = (r.standard_normal((300, 64)) * 0.5).astype(np.float32)
    w = (r.standard_normal((64, 32)) / 8).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    g = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 32])],
                          [numpy_helper.from_array(table, "emb"), numpy_helper.from_array(w, "w")])
    src = tmp_path / "emb.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    out = tmp_path / "q.onnx"
    run(src, "-o", out, "-q", "--set", "min_elements=0", "--preset", preset, "--set", "group_size=32")
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert "GatherBlockQuantized" in {nd.op_type for nd in m.graph.node}
    doc = json.loads({p.key: p.value for p in m.metadata_props}["qconvert.quantization"])
    rec = doc["tensors"]["emb"]
    assert rec["onnx"]["form"] == "gatherblockquantized"
    ids = {"ids": r.integers(0, 300, size=(2, 7)).astype(np.int64)}
    # the gathered rows, as onnxruntime computes them, against the reference dequantized table
    probe = onnx.load(str(out))
    probe.graph.output.insert(0, helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
    got = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(["e"], ids)[0]
    mapping = {"int8": "scale", "uint8": "affine", "w4g128": "scale-full"}[preset]
    dtype = {"int8": "int8", "uint8": "uint8", "w4g128": "int8"}[preset]   # w4g128 keeps embedding tables at int8 (full range)
    gran = "channel"
    q, s, z = ref.quantize(table, dtype, mapping, gran, axis=0)
    want = ref.dequantize(q, s, z, table.shape, gran, 0, 128)
    np.testing.assert_allclose(got, want[ids["ids"]], rtol=0, atol=1e-6)
    assert cosine(session(src).run(None, ids)[0], session(out).run(None, ids)[0]) >= (0.98 if preset == "w4g128" else 0.998)
    run("dequantize", out, "-o", tmp_path / "d.safetensors")
    qdq = tmp_path / "qdq.onnx"
    run(src, "-o", qdq, "-q", "--set", "min_elements=0", "--preset", preset, "--set", "group_size=32", "--onnx-form", "qdq",
        "--set", "granularity=channel")
    run("dequantize", qdq, "-o", tmp_path / "d2.safetensors")
    np.testing.assert_array_equal(load_file(str(tmp_path / "d.safetensors"))["emb"], load_file(str(tmp_path / "d2.safetensors"))["emb"])


def test_four_bit_embedding_groups_run(tmp_path):
    """A 4-bit table in groups (a policy that does not keep embeddings at 8 bits) runs too."""
    r = np.random.default_rng(6)
    table = r.standard_normal((100, 64)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["y"])], "emb",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], [numpy_helper.from_array(table, "emb")])
    src = tmp_path / "emb4.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    out = tmp_path / "q4.onnx"
    run(src, "-o", out, "-q", "--set", "min_elements=0", "--set", "dtype=int4", "--set", "symmetric_range=full",
        "--set", "granularity=group", "--set", "group_size=32")
    onnx.checker.check_model(str(out), full_check=True)
    ids = {"ids": np.array([0, 5, 99, 5], np.int64)}
    got = session(out).run(None, ids)[0]
    q, s, z = ref.quantize(table, "int4", "scale-full", "group", axis=0, group_size=32)
    want = ref.dequantize(q, s, z, table.shape, "group", 0, 32)
    np.testing.assert_allclose(got, want[ids["ids"]], rtol=0, atol=1e-6)


def test_dynamic_form_with_uint8_affine_weights_runs(tmp_path):
    src = tmp_path / "m.onnx"
    model(src, "mlp3d")
    out = tmp_path / "u8.onnx"
    run(src, "-o", out, "-q", "--set", "min_elements=0", "--preset", "uint8", "--onnx-form", "dynamic")
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    mi = [nd for nd in m.graph.node if nd.op_type == "MatMulInteger"]
    assert mi and all(len(nd.input) == 4 for nd in mi)       # with the weights' zero points
    f = feeds("mlp3d")
    assert cosine(session(src).run(None, f)[0], session(out).run(None, f)[0]) >= 0.998
