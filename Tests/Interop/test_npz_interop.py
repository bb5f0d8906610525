"""NumPy .npz in and out, judged by numpy.load(allow_pickle=False) and the numpy reference."""
import json
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import reference as ref
from conftest import run


def weights(seed=0):
    r = np.random.default_rng(seed)
    return {"enc.weight": r.standard_normal((64, 96)).astype(np.float32),
            "enc.bias": r.standard_normal(64).astype(np.float32),
            "half": r.standard_normal((48, 40)).astype(np.float16),
            "ids": np.arange(7, dtype=np.int64),
            "mask": np.array([True, False, True])}


def test_reference_vectors_and_compressed_input(tmp_path):
    np.savez(tmp_path / "tv.npz", w=np.arange(6, dtype="<f4").reshape(2, 3), b=np.array([1, -2], dtype=np.int8))
    np.savez_compressed(tmp_path / "tvc.npz", w=np.arange(6, dtype="<f4").reshape(2, 3))
    for name in ("tv", "tvc"):
        run(tmp_path / f"{name}.npz", "-o", tmp_path / f"{name}.out.npz", "--preset", "keep", "-q")
        d = np.load(tmp_path / f"{name}.out.npz", allow_pickle=False)
        src = np.load(tmp_path / f"{name}.npz")
        for k in src.files:
            np.testing.assert_array_equal(d[k], src[k])
            assert d[k].dtype == src[k].dtype


def test_quantized_npz_loads_without_pickle_and_matches_numpy(tmp_path):
    w = weights()
    np.savez(tmp_path / "in.npz", **w)
    out = tmp_path / "out.npz"
    run(tmp_path / "in.npz", "-o", out, "-q")
    d = np.load(out, allow_pickle=False)
    doc = json.loads(str(d["qconvert.quantization"]))
    assert set(doc["tensors"]) == {"enc.weight", "half"}
    for name in ("enc.weight", "half"):
        q, s = d[name], d[name + "_scale"]
        want_q, want_s, _ = ref.quantize(w[name].astype(np.float32), "int8")
        np.testing.assert_array_equal(q.astype(np.int64), want_q)
        np.testing.assert_array_equal(s, want_s)
    for k in ("enc.bias", "ids", "mask"):
        np.testing.assert_array_equal(d[k], w[k])
    assert zipfile.ZipFile(out).testzip() is None
    # deterministic bytes
    run(tmp_path / "in.npz", "-o", tmp_path / "again.npz", "-q", "--jobs", "1")
    assert open(out, "rb").read() == open(tmp_path / "again.npz", "rb").read()


def test_big_endian_and_fortran_inputs(tmp_path):
    r = np.random.default_rng(3)
    a = r.standard_normal((40, 50)).astype(">f4")
    f = np.asfortranarray(r.standard_normal((33, 70)).astype(np.float32))
    np.savez(tmp_path / "in.npz", a=a, f=f)
    run(tmp_path / "in.npz", "-o", tmp_path / "k.safetensors", "--preset", "keep", "-q")
    t = load_file(str(tmp_path / "k.safetensors"))
    np.testing.assert_array_equal(t["a"], a.astype("<f4"))
    np.testing.assert_array_equal(t["f"], f)


def test_types_numpy_lacks_are_raw_integers_described_by_metadata(tmp_path):
    w = weights(1)
    np.savez(tmp_path / "in.npz", **w)
    out = tmp_path / "o.npz"
    run(tmp_path / "in.npz", "-o", out, "--preset", "w4g128", "--set", "group_size=32", "-q")
    d = np.load(out, allow_pickle=False)
    types = json.loads(str(d["qconvert.dtypes"]))
    assert types["enc.weight"] == "int4" and d["enc.weight"].dtype == np.uint8 and d["enc.weight"].shape == (64, 48)
    q = ref.unpack4(d["enc.weight"], (64, 96), signed=True)
    want_q, want_s, _ = ref.quantize(w["enc.weight"], "int4", "scale-full", "group", 0, 32)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(d["enc.weight_scale"], want_s)
    # and back through qconvert: dequantize restores floats
    run("dequantize", out, "-o", tmp_path / "back.npz", "-q")
    b = np.load(tmp_path / "back.npz")
    assert b["enc.weight"].dtype == np.float32 and np.abs(b["enc.weight"] - w["enc.weight"]).max() < 0.5


def test_every_direction_with_safetensors_is_bit_exact_with_keep(tmp_path):
    w = weights(2)
    save_file(w, str(tmp_path / "a.safetensors"))
    run(tmp_path / "a.safetensors", "-o", tmp_path / "b.npz", "--preset", "keep", "-q")
    run(tmp_path / "b.npz", "-o", tmp_path / "c.safetensors", "--preset", "keep", "-q")
    c = load_file(str(tmp_path / "c.safetensors"))
    d = np.load(tmp_path / "b.npz")
    for k, v in w.items():
        np.testing.assert_array_equal(c[k], v)
        np.testing.assert_array_equal(d[k], v)
        assert c[k].dtype == v.dtype


def zip_with(members, path, tamper=None):
    """A stored zip written by hand, so it can be made wrong in precise ways."""
    out, central = b"", b""
    for name, data in members:
        nb = name.encode()
        crc = zlib.crc32(data)
        flags = 0
        if tamper == "crc":
            crc ^= 1
        if tamper == "encrypted":
            flags = 1
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, 0, 0, 0x21, crc, len(data), len(data), len(nb), 0) + nb
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, 0, 0, 0x21, crc, len(data), len(data), len(nb), 0, 0, 0, 0, 0, len(out)) + nb
        out += local + data
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    blob = out + central + eocd
    if tamper == "truncate":
        blob = blob[: len(blob) // 2]
    open(path, "wb").write(blob)


def npy(array):
    import io
    b = io.BytesIO()
    np.save(b, array, allow_pickle=True)
    return b.getvalue()


@pytest.mark.parametrize("case", ["crc", "encrypted", "truncate", "dotdot", "absolute", "duplicate", "object", "bomb", "bad-header", "short-data"])
def test_hostile_archives_are_refused(tmp_path, case):
    good = npy(np.arange(2048, dtype=np.float32).reshape(32, 64))
    p = tmp_path / f"{case}.npz"
    if case in ("crc", "encrypted", "truncate"):
        zip_with([("w.npy", good)], p, tamper=case)
    elif case == "dotdot":
        zip_with([("../w.npy", good)], p)
    elif case == "absolute":
        zip_with([("/tmp/w.npy", good)], p)
    elif case == "duplicate":
        zip_with([("w.npy", good), ("w.npy", good)], p)
    elif case == "object":
        zip_with([("w.npy", npy(np.array([{"a": 1}], dtype=object)))], p)
    elif case == "bad-header":
        zip_with([("w.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n" + b"\0" * 8)], p)
    elif case == "short-data":
        zip_with([("w.npy", good[:-10])], p)
    elif case == "bomb":
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("w.npy", b"\x93NUMPY\x01\x00\x76\x00" + b" " * 118 + b"\0" * (200 << 20))
    out = tmp_path / "out.npz"
    r = run(p, "-o", out, check=False)
    assert r.returncode == 3, (case, r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and str(p) in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_header_versions(tmp_path, version):
    import io
    a = np.random.default_rng(4).standard_normal((40, 64)).astype(np.float32)
    b = io.BytesIO()
    np.lib.format.write_array(b, a, version=version)
    with zipfile.ZipFile(tmp_path / "v.npz", "w") as z:
        z.writestr("w.npy", b.getvalue())
    run(tmp_path / "v.npz", "-o", tmp_path / "k.npz", "--preset", "keep", "-q")
    np.testing.assert_array_equal(np.load(tmp_path / "k.npz")["w"], a)
