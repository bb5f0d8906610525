"""safetensors outputs judged by the safetensors library and an independent numpy reference."""
import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import reference as ref
from conftest import metadata_doc, run


def nasty_matrix(rows=37, cols=133, seed=0):
    """Odd sizes, outliers, an all-zero row, a constant row, and a row of exact .5 ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[3, 7] = 40.0                       # outlier
    x[5] = 0.0                           # all-zero channel
    x[6] = np.float32(-0.75)             # constant channel
    # ties: max 31.75 makes the int8 step exactly 0.25, and k*0.25 + 0.125 divides to k + 0.5
    x[8] = (np.arange(cols) % 200 - 100).astype(np.float32) * np.float32(0.25) + np.float32(0.125)
    x[8, 0] = np.float32(31.75)
    x[9, ::2] = -0.0
    return x


def write_input(tmp, tensors, metadata=None):
    p = tmp / "in.safetensors"
    save_file(tensors, str(p), metadata=metadata or {"format": "pt"})
    return p


def raw_tensor(path, name):
    """A tensor's bytes straight from the file (numpy has no float8 dtype for safetensors to load into)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + n])
    b, e = hdr[name]["data_offsets"]
    return hdr[name], raw[8 + n + b:8 + n + e]


def load_all(out):
    """load_file, with float8 tensors (which numpy cannot hold) read as their raw bytes."""
    with safe_open(str(out), "np") as f:
        names = list(f.keys())
    t = {}
    for k in names:
        info, data = raw_tensor(out, k)
        if info["dtype"].startswith("F8"):
            t[k] = np.frombuffer(data, dtype=np.uint8).reshape(info["shape"])
        else:
            with safe_open(str(out), "np") as f:
                t[k] = f.get_tensor(k)
    return t


def load_quantized(out, name, record):
    t = load_all(out)
    q = t[name]
    if record["dtype"] in ("int4", "uint4"):
        assert q.dtype == np.uint8
        q = ref.unpack4(q, record["source_shape"], record["dtype"] == "int4")
    scale = t[record["scale"]]
    zp = t[record["zero_point"]] if record.get("zero_point") else np.zeros(scale.shape, dtype=np.int64)
    return q, scale, zp, t


CASES = [
    dict(dtype="int8", mapping="scale", granularity="channel"),
    dict(dtype="int8", mapping="scale", granularity="tensor"),
    dict(dtype="uint8", mapping="affine", granularity="channel"),
    dict(dtype="int8", mapping="affine", granularity="channel"),
    dict(dtype="uint8", mapping="scale", granularity="channel"),
    dict(dtype="int4", mapping="scale", granularity="group", group_size=32),
    dict(dtype="uint4", mapping="affine", granularity="group", group_size=16),
    dict(dtype="int8", mapping="scale", granularity="group", group_size=64),
    dict(dtype="int8", mapping="scale", granularity="element"),
    dict(dtype="int8", mapping="scale", granularity="channel", axis=1),
    dict(dtype="fp8_e4m3", mapping="scale", granularity="channel"),
    dict(dtype="fp8_e5m2", mapping="scale", granularity="tensor"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_integers_and_scales_match_numpy_reference(tmp, case):
    x = nasty_matrix()
    inp = write_input(tmp, {"w": x, "ids": np.arange(5, dtype=np.int64)})
    sets = [f"--set=dtype={case['dtype']}", f"--set=mapping={case['mapping']}", f"--set=granularity={case['granularity']}"]
    if "group_size" in case:
        sets.append(f"--set=group_size={case['group_size']}")
    axis = case.get("axis", 0)
    if "axis" in case:
        sets.append(f"--set=axis={axis}")
    out = tmp / "out.safetensors"
    run(inp, "-o", out, *sets, "-q")
    doc, meta = metadata_doc(out)
    assert meta["format"] == "pt"
    rec = doc["tensors"]["w"]
    assert rec["dtype"] == case["dtype"] and rec["granularity"] == case["granularity"]
    assert "ids" not in doc["tensors"]
    q, scale, zp, t = load_quantized(out, "w", rec)
    assert t["ids"].tolist() == [0, 1, 2, 3, 4]
    assert scale.dtype == np.float32 and scale.ndim == x.ndim
    want_q, want_s, want_z = ref.quantize(x, case["dtype"], case["mapping"], case["granularity"], axis, case.get("group_size", 128))
    np.testing.assert_array_equal(scale, want_s)
    if case["dtype"].startswith("fp8"):
        info, _ = raw_tensor(out, "w")
        assert info["dtype"] == {"fp8_e4m3": "F8_E4M3", "fp8_e5m2": "F8_E5M2"}[case["dtype"]]
        np.testing.assert_array_equal(t["w"], want_q)
        return
    np.testing.assert_array_equal(zp.astype(np.int64), want_z.astype(np.int64))
    np.testing.assert_array_equal(q.astype(np.int64), want_q)
    # the documented broadcast recovers the values within half a step
    deq = ref.dequantize(q, scale, zp, x.shape, case["granularity"], axis, case.get("group_size", 128))
    _, _, expand = ref.groups_view(x, case["granularity"], axis, case.get("group_size", 128))
    assert np.all(np.abs(deq - x) <= expand(scale) / 2 * 1.0001 + 1e-30)
    # metrics in the metadata agree with numpy
    err = (x.astype(np.float64) - deq)
    assert rec["metrics"]["max_abs_err"] == pytest.approx(np.abs(err).max(), rel=1e-5, abs=1e-9)
    if (err ** 2).sum() > 0:
        sqnr = 10 * np.log10((x.astype(np.float64) ** 2).sum() / (err ** 2).sum())
        assert rec["metrics"]["sqnr_db"] == pytest.approx(sqnr, abs=1e-3)


def test_symmetric_per_channel_broadcasts_in_numpy(tmp):
    """The layout promise: (q - zero_point) * scale broadcasts as stored, [out, 1] for [out, in]."""
    x = nasty_matrix(16, 64, seed=3)
    inp = write_input(tmp, {"layer.weight": x})
    out = tmp / "o.safetensors"
    run(inp, "-o", out, "--preset", "uint8", "-q")
    t = load_file(str(out))
    assert t["layer.weight_scale"].shape == (16, 1)
    assert t["layer.weight_zero_point"].shape == (16, 1) and t["layer.weight_zero_point"].dtype == np.uint8
    deq = (t["layer.weight"].astype(np.float32) - t["layer.weight_zero_point"]) * t["layer.weight_scale"]
    assert np.abs(deq - x).max() <= t["layer.weight_scale"].max() / 2 * 1.0001


def test_groups_scale_shape_and_int4_packing(tmp):
    x = nasty_matrix(20, 70, seed=4)      # 70 = 2 groups of 32 + a tail of 6
    inp = write_input(tmp, {"mlp.weight": x})
    out = tmp / "o.safetensors"
    run(inp, "-o", out, "--preset", "w4g128", "--set", "group_size=32", "-q")
    t = load_file(str(out))
    assert t["mlp.weight"].shape == (20, 35) and t["mlp.weight"].dtype == np.uint8
    assert t["mlp.weight_scale"].shape == (20, 3)
    q = ref.unpack4(t["mlp.weight"], x.shape, signed=True)
    want_q, want_s, _ = ref.quantize(x, "int4", "scale-full", "group", 0, 32)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(t["mlp.weight_scale"], want_s)
    doc, _ = metadata_doc(out)
    assert doc["tensors"]["mlp.weight"]["packing"]["order"] == "low_nibble_first"


def test_casts_match_numpy(tmp):
    x = nasty_matrix(40, 64, seed=5)
    x[0, :4] = [1e-8, 6.1e-5, 65504, -3.3333333]
    inp = write_input(tmp, {"a": x})
    out = tmp / "f16.safetensors"
    run(inp, "-o", out, "--preset", "fp16", "-q")
    t = load_file(str(out))
    np.testing.assert_array_equal(t["a"].view(np.uint16), x.astype(np.float16).view(np.uint16))
    out2 = tmp / "bf16.safetensors"
    run(inp, "-o", out2, "--preset", "bf16", "-q")
    with safe_open(str(out2), "np") as f:
        header_dtype = json.loads(open(out2, "rb").read()[8:8 + int.from_bytes(open(out2, "rb").read(8), "little")])["a"]["dtype"]
    assert header_dtype == "BF16"
    raw = open(out2, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + n])
    b, e = hdr["a"]["data_offsets"]
    got = np.frombuffer(raw[8 + n + b:8 + n + e], dtype=np.uint16)
    np.testing.assert_array_equal(got, ref.bf16_bits(x).reshape(-1))


def test_fp16_overflow_is_an_error_unless_saturating(tmp):
    x = np.full((32, 64), 70000, dtype=np.float32)
    inp = write_input(tmp, {"big": x})
    p = run(inp, "-o", tmp / "o.safetensors", "--preset", "fp16", check=False)
    assert p.returncode == 3 and "overflow float16" in p.stderr and "big" in p.stderr
    assert not (tmp / "o.safetensors").exists()
    run(inp, "-o", tmp / "o.safetensors", "--preset", "fp16", "--set", "saturate=true", "-q")
    assert (load_file(str(tmp / "o.safetensors"))["big"] == np.float16(65504)).all()


def test_percentile_calibration_matches_numpy(tmp):
    rng = np.random.default_rng(11)
    x = rng.standard_t(3, size=(24, 301)).astype(np.float32)
    inp = write_input(tmp, {"w": x})
    out = tmp / "o.safetensors"
    run(inp, "-o", out, "--set", "calibration=percentile", "--set", "percentile=99.5", "-q")
    s = load_file(str(out))["w_scale"].reshape(-1)
    want = np.array([np.float32(np.percentile(np.abs(row).astype(np.float64), 99.5)) / np.float32(127) for row in x])
    np.testing.assert_array_equal(s, want.astype(np.float32))
    # affine: the (100-p)/2 and 100-(100-p)/2 percentiles
    run(inp, "-o", out, "--preset", "uint8", "--set", "calibration=percentile", "--set", "percentile=99", "-q")
    t = load_file(str(out))
    _, want_s, want_z = ref.quantize(x, "uint8", "affine", "channel", 0, calibration="percentile", percentile=99)
    np.testing.assert_array_equal(t["w_scale"], want_s)
    np.testing.assert_array_equal(t["w_zero_point"].astype(np.int64), want_z)


@pytest.mark.parametrize("method,bins,levels", [("entropy", 2048, None), ("entropy", 512, 64), ("mse", 1024, None)])
def test_entropy_and_mse_match_independent_numpy(tmp, method, bins, levels):
    rng = np.random.default_rng(21)
    x = rng.laplace(size=(64, 128)).astype(np.float32)
    x[0, 0] = 25.0
    inp = write_input(tmp, {"w": x})
    out = tmp / "o.safetensors"
    args = ["--set", "granularity=tensor", "--set", f"calibration={method}", "--set", f"bins={bins}"]
    if levels:
        args += ["--set", f"levels={levels}"]
    run(inp, "-o", out, *args, "-q")
    t = load_file(str(out))
    b, a = ref.calibrate(x.reshape(-1), "scale", method, "int8", bins=bins, levels=levels)
    want = a / np.float32(127)
    assert t["w_scale"].reshape(-1)[0] == want
    assert a < 25.0                      # the outlier is clipped
    doc, _ = metadata_doc(out)
    assert doc["tensors"]["w"]["calibration"]["method"] == method
    assert doc["tensors"]["w"]["metrics"]["clipped"] > 0


def test_metadata_document_shape(tmp):
    x = nasty_matrix(32, 64)
    inp = write_input(tmp, {"w": x, "b": x[0].copy()}, metadata={"format": "pt", "note": "kept"})
    out = tmp / "o.safetensors"
    run(inp, "-o", out, "-q")
    doc, meta = metadata_doc(out)
    assert meta["note"] == "kept"
    assert doc["format"] == "qconvert.quantization/2"
    assert doc["tool"]["name"] == "qconvert"
    import hashlib
    import xxhash
    data = open(inp, "rb").read()
    assert doc["input"]["hash"] == "xxh64:" + xxhash.xxh64(data).hexdigest()
    assert len(doc["policy"]["sha256"]) == 64
    run(inp, "-o", out, "-q", "--input-hash", "sha256")
    doc2, _ = metadata_doc(out)
    assert doc2["input"]["hash"] == "sha256:" + hashlib.sha256(data).hexdigest()
    rec = doc["tensors"]["w"]
    for key in ("source_dtype", "source_shape", "dtype", "mapping", "granularity", "axis", "calibration", "scale", "metrics"):
        assert key in rec
    assert rec["scale"] == "w_scale" and "zero_point" not in rec
    assert doc["kept_tensors"] == 1
    # version 2: keys sorted at every level; the raw sums the figures come from
    text = safe_open(str(out), "np").metadata()["qconvert.quantization"]
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    m = rec["metrics"]
    assert m["sums"]["count"] == x.size
    assert m["sqnr_db"] == pytest.approx(10 * np.log10(m["sums"]["x2"] / m["sums"]["e2"]), rel=1e-12)
    assert m["cosine"] == pytest.approx(m["sums"]["xq"] / np.sqrt(m["sums"]["x2"] * m["sums"]["q2"]), rel=1e-12)


def test_version_1_metadata_is_still_read(tmp):
    """Outputs of earlier qconvert versions carry version 1 documents (nulls for absent names and axes,
    no sums): dequantize still restores them, to the same values as the version 2 document."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 40)).astype(np.float32)
    inp = write_input(tmp, {"w": x, "v": x[:, :24].copy()})
    pol = tmp / "p.yaml"
    pol.write_text("defaults: {dtype: int8, granularity: channel}\nrules:\n  - {match: v, dtype: int4, granularity: group, group_size: 8, mapping: affine}\n")
    out = tmp / "o.safetensors"
    run(inp, "-o", out, "-q", "--policy", pol)
    with safe_open(str(out), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    doc = json.loads(meta["qconvert.quantization"])
    old = dict(doc, format="qconvert.quantization/1")
    for rec in old["tensors"].values():
        rec.setdefault("axis", None)
        rec.setdefault("zero_point", None)
        rec["metrics"].pop("sums")
        if "packing" in rec:
            rec["packing"]["note"] = "v1"
    v1 = tmp / "v1.safetensors"
    save_file(tensors, str(v1), metadata=dict(meta, **{"qconvert.quantization": json.dumps(old)}))
    run("dequantize", out, "-o", tmp / "a.safetensors")
    run("dequantize", v1, "-o", tmp / "b.safetensors")
    a, b = load_file(str(tmp / "a.safetensors")), load_file(str(tmp / "b.safetensors"))
    assert set(a) == set(b) == {"w", "v"}
    for k in a:
        assert np.array_equal(a[k], b[k])


def test_reference_library_reads_sharded_output(tmp):
    d = tmp / "shards"
    d.mkdir()
    rng = np.random.default_rng(2)
    save_file({"a.weight": rng.standard_normal((64, 64)).astype(np.float32)}, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"b.weight": rng.standard_normal((64, 64)).astype(np.float32)}, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    json.dump({"metadata": {"total_size": 32768}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}},
              open(d / "model.safetensors.index.json", "w"))
    run(d, "-o", tmp / "out", "-q")
    idx = json.load(open(tmp / "out" / "model.safetensors.index.json"))
    total = 0
    for name, shard in idx["weight_map"].items():
        t = load_file(str(tmp / "out" / shard))
        assert name in t
        total += t[name].nbytes
    assert idx["metadata"]["total_size"] == total
