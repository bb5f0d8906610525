"""ONNX outputs judged by onnx's checker, onnxruntime and an independent numpy reference."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import make_onnx_models
import reference as ref
from conftest import run


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_onnx_models.build_all(str(tmp_path_factory.mktemp("onnx")))


def feeds_for(model_path, seed=0):
    m = onnx.load(model_path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    r = np.random.default_rng(seed)
    feeds = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else 3 for d in t.shape.dim]
        if t.elem_type == onnx.TensorProto.BOOL:
            feeds[i.name] = np.array(True)
        else:
            feeds[i.name] = r.standard_normal(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(src, out, feeds=None):
    onnx.checker.check_model(out, full_check=True)
    feeds = feeds or feeds_for(src)
    a = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, feeds)
    return [cosine(x, y) for x, y in zip(a, b)]


def quantize(models, name, tmp_path, *args):
    """The DequantizeLinear form these tests are about (the default puts MatMul weights in
    MatMulNBits and keeps the others float: test_onnx_forms.py covers it)."""
    out = str(tmp_path / f"{name}.q.onnx")
    run(models[name], "-o", out, "-q", *(args if "--onnx-form" in args else ("--onnx-form", "qdq") + args))
    return out


def metadata(path):
    m = onnx.load(path, load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    keys = [k for k in props if "quantization" in k]
    assert len(keys) == 1
    return json.loads(props[keys[0]]), props, m


def initializers(path):
    m = onnx.load(path)
    out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


@pytest.mark.parametrize("name,threshold,args", [
    ("mlp", 0.999, []), ("lstm", 0.999, []), ("cnn", 0.99, ["--set", "min_elements=256"]), ("gemm", 0.999, []),
    ("constants11", 0.999, []), ("if", 0.999, []), ("shared", 0.999, []), ("fp16", 0.998, []), ("external", 0.999, []),
    ("oldir", 0.999, []), ("function", 0.999, []),
])
def test_int8_per_channel_runs_close_to_float(models, tmp_path, name, threshold, args):
    out = quantize(models, name, tmp_path, *args)
    cos = compare(models[name], out)
    assert min(cos) >= threshold, cos
    doc, props, m = metadata(out)
    assert doc["tensors"], "nothing was quantized"
    src = onnx.load(models[name], load_external_data=False)
    # opset never raised (MatMulNBits only adds com.microsoft at version 1); graph outputs and the
    # original nodes survive in order, except MatMul/Gemm (and a folded bias Add) that MatMulNBits replaced
    versions = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    assert {d: v for d, v in versions.items() if d != "com.microsoft"} == {o.domain or "ai.onnx": o.version for o in src.opset_import}
    assert versions.get("com.microsoft", 1) == 1
    assert ("com.microsoft" in versions) == any(n.op_type == "MatMulNBits" for n in m.graph.node)
    assert [o.name for o in m.graph.output] == [o.name for o in src.graph.output]
    names = {n.name for n in m.graph.node}
    kept = [n.name for n in m.graph.node if n.name and n.op_type not in ("DequantizeLinear", "Cast", "Mul", "Sub", "Constant", "MatMulNBits")]
    assert kept == [n.name for n in src.graph.node if n.name and n.op_type != "Constant" and n.name in names]
    assert all(n.op_type in ("MatMul", "Gemm", "Add") for n in src.graph.node if n.name and n.op_type != "Constant" and n.name not in names)


def test_stored_integers_and_scales_match_numpy(models, tmp_path):
    out = quantize(models, "mlp", tmp_path, "--onnx-form", "qdq")
    src = initializers(models["mlp"])
    got = initializers(out)
    m = onnx.load(out)
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    assert set(dq) == {"fc0.weight", "fc1.weight"}
    for w in ("fc0.weight", "fc1.weight"):
        node = dq[w]
        q, s = got[node.input[0]], got[node.input[1]]
        assert q.dtype == np.int8 and s.shape == (src[w].shape[1],)
        assert [a.i for a in node.attribute if a.name == "axis"] == [1]       # MatMul B: output channels last
        want_q, want_s, _ = ref.quantize(src[w], "int8", "scale", "channel", axis=1)
        np.testing.assert_array_equal(q.astype(np.int64), want_q)
        np.testing.assert_array_equal(s, want_s.reshape(-1))
    assert "fc0.bias" in got and got["fc0.bias"].dtype == np.float32      # 1-D bias kept


def test_gemm_transb_and_conv_axes(models, tmp_path):
    out = quantize(models, "gemm", tmp_path, "--onnx-form", "qdq")
    m = onnx.load(out)
    axis = [a.i for n in m.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axis == [0]
    out = quantize(models, "cnn", tmp_path, "--set", "min_elements=256")
    m = onnx.load(out)
    axes = {n.output[0]: [a.i for a in n.attribute if a.name == "axis"][0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    assert axes == {"w1": 0, "w2": 1, "w3": 0}


def test_int4_groups_of_32_on_opset21(models, tmp_path):
    out = quantize(models, "mlp21", tmp_path, "--preset", "w4g128", "--set", "group_size=32", "--onnx-form", "qdq")
    cos = compare(models["mlp21"], out)
    assert min(cos) >= 0.98, cos
    m = onnx.load(out)
    assert m.ir_version >= 10
    src = initializers(models["mlp21"])
    got = initializers(out)
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        w = n.output[0]
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        q = got[n.input[0]]
        assert q.dtype == np.int8 or str(q.dtype) == "int4"
        want_q, want_s, _ = ref.quantize(src[w], "int4", "scale-full", "group", axis=1, group_size=32)
        np.testing.assert_array_equal(q.astype(np.int64), want_q)
        np.testing.assert_array_equal(got[n.input[1]], want_s)


def test_opset_too_old_for_groups_is_refused_with_the_option_named(models, tmp_path):
    out = str(tmp_path / "x.onnx")
    # plan shows the refusal before anything is converted
    plan = run("plan", models["mlp"], "--preset", "w4g128", "--onnx-form", "qdq").stdout
    assert "a conversion to ONNX would be refused" in plan and "opset" in plan
    p = run(models["mlp"], "-o", out, "--preset", "w4g128", "--onnx-form", "qdq", check=False)
    assert p.returncode == 64
    assert "opset" in p.stderr and "granularity" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_per_axis_at_opset11_decomposes_or_refuses(models, tmp_path):
    out = quantize(models, "constants11", tmp_path)
    m = onnx.load(out)
    assert m.opset_import[0].version == 11
    assert {"Cast", "Mul"} <= {n.op_type for n in m.graph.node}
    assert "DequantizeLinear" not in {n.op_type for n in m.graph.node}
    policy = tmp_path / "refuse.yaml"
    policy.write_text("defaults:\n  onnx_fallback: refuse\n  onnx_form: qdq\n")
    p = run(models["constants11"], "-o", tmp_path / "r.onnx", "--policy", policy, check=False)
    assert p.returncode == 64 and "onnx_fallback: decompose" in p.stderr


def test_shared_initializer_quantized_once(models, tmp_path):
    out = quantize(models, "shared", tmp_path, "--onnx-form", "qdq")
    m = onnx.load(out)
    assert [n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"] == ["w"]
    assert [n.input[1] for n in m.graph.node if n.op_type == "MatMul"] == ["w", "w"]
    # as MatMulNBits: both uses share one packed weight
    out = quantize(models, "shared", tmp_path, "--onnx-form", "auto")
    m = onnx.load(out)
    uses = [n.input[1] for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(uses) == 2 and len(set(uses)) == 1 and sum(1 for t in m.graph.initializer if t.name == uses[0]) == 1
    assert min(compare(models["shared"], out)) >= 0.999


def test_subgraph_weights_quantized_where_they_live(models, tmp_path):
    out = quantize(models, "if", tmp_path)
    m = onnx.load(out)
    branches = {a.name: a.g for a in m.graph.node[0].attribute}
    for name, g in branches.items():
        assert "DequantizeLinear" in [n.op_type for n in g.node], name
    feeds = feeds_for(models["if"])
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        assert min(compare(models["if"], out, feeds)) >= 0.999


def test_metadata_and_everything_else_survive(models, tmp_path):
    out = quantize(models, "mlp", tmp_path)
    doc, props, m = metadata(out)
    assert props["author"] == "tests"
    assert m.graph.doc_string == "an MLP" and m.producer_name == "qconvert-tests"
    assert doc["tensors"]["fc0.weight"]["axis"] == 1
    names = [n.name for n in m.graph.node] + [t.name for t in m.graph.initializer]
    assert len(names) == len(set(names))


def test_external_data_out_is_aligned(models, tmp_path):
    out = quantize(models, "mlp", tmp_path, "--external-data")
    m = onnx.load(out, load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext
    for t in ext:
        info = {e.key: e.value for e in t.external_data}
        assert int(info["offset"]) % 4096 == 0 and info["location"] == os.path.basename(out) + ".data"
    assert min(compare(models["mlp"], out)) >= 0.999


def test_cross_format(models, tmp_path):
    from safetensors.numpy import load_file
    st = tmp_path / "mlp.safetensors"
    run(models["mlp"], "-o", st, "-q")
    t = load_file(str(st))
    assert t["fc0.weight"].dtype == np.int8 and t["fc0.weight_scale"].shape == (1, 128)
    p = run(st, "-o", tmp_path / "back.onnx", check=False)
    assert p.returncode == 64 and "no graph" in p.stderr


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_malformed_models_fail_cleanly(models, tmp_path):
    good = open(models["mlp"], "rb").read()
    cases = {
        "truncated": good[: len(good) // 2],
        "corrupt": bytes([0xFF]) * 64,
        "empty-garbage": b"\x0a\xff\xff\xff\xff\x0f",
    }
    # nesting deeper than the cap: If nodes inside If nodes, encoded by hand (python's protobuf
    # refuses to build messages this deep)
    def varint(v):
        out = b""
        while True:
            b, v = v & 0x7F, v >> 7
            out += bytes([b | (0x80 if v else 0)])
            if not v:
                return out

    def ld(field, payload):
        return varint(field << 3 | 2) + varint(len(payload)) + payload

    graph = b""
    for _ in range(200):
        attr = ld(1, b"then_branch") + varint(20 << 3) + varint(5) + ld(6, graph)
        graph = ld(1, ld(4, b"If") + ld(5, attr))
    cases["deep"] = varint(1 << 3) + varint(8) + ld(7, graph)
    # dims that disagree with the data
    m = onnx.load(models["mlp"])
    m.graph.initializer[0].dims[0] += 1
    cases["dims"] = m.SerializeToString()
    for name, data in cases.items():
        src = tmp_path / f"{name}.onnx"
        write_bytes(src, data)
        out = tmp_path / f"{name}.out.onnx"
        p = run(src, "-o", out, check=False)
        assert p.returncode == 3, (name, p.returncode, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and str(src) in p.stderr, (name, p.stderr)
        assert not out.exists()


@pytest.mark.parametrize("attack", ["absolute", "dotdot", "symlink", "missing", "short"])
def test_bad_external_data_is_refused(models, tmp_path, attack):
    folder = tmp_path / "m"
    folder.mkdir()
    m = onnx.load(models["external"], load_external_data=False)
    t = m.graph.initializer[0]
    info = {e.key: e for e in t.external_data}
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 100000)
    data = open(os.path.join(os.path.dirname(models["external"]), "external.onnx.data"), "rb").read()
    (folder / "external.onnx.data").write_bytes(data)
    if attack == "absolute":
        info["location"].value = str(outside)
    elif attack == "dotdot":
        info["location"].value = "../secret.bin"
    elif attack == "symlink":
        os.symlink(outside, folder / "link.bin")
        info["location"].value = "link.bin"
    elif attack == "missing":
        info["location"].value = "nope.bin"
    elif attack == "short":
        (folder / "external.onnx.data").write_bytes(data[:100])
    src = folder / "model.onnx"
    write_bytes(src, m.SerializeToString())
    out = tmp_path / "out.onnx"
    p = run(src, "-o", out, check=False)
    assert p.returncode == 3, p.stderr
    assert "external data" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_function_body_weight_quantized_in_place(models, tmp_path):
    out = quantize(models, "function", tmp_path)
    m = onnx.load(out)
    ops = [n.op_type for n in m.functions[0].node]
    assert "DequantizeLinear" in ops and ops.index("DequantizeLinear") < ops.index("MatMul")
    assert [n.op_type for n in m.graph.node] == ["Project"]


@pytest.mark.parametrize("preset", ["fp16", "bf16"])
def test_float_casts_insert_a_cast_back(models, tmp_path, preset):
    out = quantize(models, "mlp", tmp_path, "--preset", preset)
    m = onnx.load(out)
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert {n.output[0] for n in casts} == {"fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"}
    types = {t.name: t.data_type for t in m.graph.initializer}
    want = onnx.TensorProto.FLOAT16 if preset == "fp16" else onnx.TensorProto.BFLOAT16
    assert types["fc0.weight_" + preset] == want
    assert min(compare(models["mlp"], out)) >= 0.999


def test_output_is_deterministic_whatever_jobs(models, tmp_path):
    a = quantize(models, "cnn", tmp_path, "--jobs", "1", "--set", "min_elements=256")
    data = open(a, "rb").read()
    b = str(tmp_path / "b.onnx")
    run(models["cnn"], "-o", b, "-q", "--jobs", "3", "--set", "min_elements=256", "--onnx-form", "qdq")
    assert open(b, "rb").read() == data


@pytest.mark.parametrize("name,args", [("mlp21", []), ("mlp21", ["--preset", "w4g128", "--set", "group_size=32"]),
                                       ("mlp21", ["--preset", "uint8"]), ("constants11", ["--set", "dtype=int4"])])
def test_diff_and_dequantize_read_onnx_outputs(models, tmp_path, name, args):
    out = quantize(models, name, tmp_path, *args)
    doc, _, _ = metadata(out)
    d = json.loads(run("diff", models[name], out, "--json").stdout)
    by = {t["name"]: t for t in d["tensors"]}
    for tensor, rec in doc["tensors"].items():
        assert by[tensor]["sqnr_db"] == pytest.approx(rec["metrics"]["sqnr_db"], abs=0.01), tensor
    back = tmp_path / "back.safetensors"
    run("dequantize", out, "-o", back, "-q")
    from safetensors.numpy import load_file
    t = load_file(str(back))
    src = initializers(models[name])
    for tensor in doc["tensors"]:
        assert t[tensor].shape == src[tensor].shape
        assert cosine(t[tensor], src[tensor]) > 0.99
