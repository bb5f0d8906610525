"""GGUF input: files written by the `gguf` package (the reference for llama.cpp's format) are read by
qconvert, and every block type qconvert reads dequantizes exactly as `gguf.quants.dequantize` does."""
import json
import subprocess

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import QCONVERT, run

Q = gguf.GGMLQuantizationType
READ = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def weights(rng):
    w = (rng.standard_normal((48, 96)) * np.linspace(0.05, 2, 96)).astype(np.float32)
    w[3, :32] = 0  # an all-zero block
    w[5, 32:64] = 0.75  # a constant block
    w[7, 10] = 40.0  # an outlier
    return w


def write_gguf(path, tensors, extra=None):
    """tensors: name -> (float32 array, GGML type)."""
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_name("tiny")
    wr.add_uint32("test.u32", 7)
    wr.add_int64("test.i64", -5)
    wr.add_float32("test.f32", 0.5)
    wr.add_bool("test.bool", True)
    wr.add_array("test.nested", [[1, 2], [3]])
    wr.add_array("test.strings", ["a", "b"])
    for k, v in (extra or {}).items():
        wr.add_string(k, v)
    for name, (x, t) in tensors.items():
        if t in (Q.F32,):
            wr.add_tensor(name, x)
        elif t == Q.F16:
            wr.add_tensor(name, x.astype(np.float16))
        else:
            q = gguf.quants.quantize(x, t)
            wr.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


@pytest.mark.parametrize("qtype", READ, ids=lambda t: t.name)
def test_every_readable_type_dequantizes_as_the_reference(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    w = weights(rng)
    write_gguf(tmp_path / "m.gguf", {"blk.0.w": (w, qtype), "norm": (rng.standard_normal(96).astype(np.float32), Q.F32)})
    if qtype != Q.BF16:
        run(tmp_path / "m.gguf", "-o", tmp_path / "out.safetensors", "--preset", "keep", "-q")
        got = load_file(str(tmp_path / "out.safetensors"))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.0.w")
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(48, 96)
    if qtype == Q.F16:
        assert got["blk.0.w"].dtype == np.float16
    elif qtype == Q.BF16:
        # numpy has no bfloat16: the .npz output keeps its bits as uint16
        run(tmp_path / "m.gguf", "-o", tmp_path / "out.npz", "--preset", "keep", "-q")
        with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
            g = (z["blk.0.w"].view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(g, np.asarray(want, np.float32))
        return
    assert got["blk.0.w"].shape == (48, 96)
    assert np.array_equal(got["blk.0.w"].astype(np.float32), want.astype(np.float32))


def test_metadata_of_every_value_type_is_read(tmp_path):
    write_gguf(tmp_path / "m.gguf", {"w": (np.ones((2, 32), np.float32), Q.F32)})
    doc = json.loads(run("inspect", "--json", tmp_path / "m.gguf").stdout)
    meta = doc["metadata"]
    assert doc["format"] == "gguf"
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["test.u32"] == "7" and meta["test.i64"] == "-5" and meta["test.f32"] == "0.5" and meta["test.bool"] == "true"
    assert meta["test.nested"] == "[[1, 2], [3]]" and meta["test.strings"] == "[a, b]"
    assert doc["tensors"][0]["shape"] == [2, 32]


def patched(path, out, offset, value):
    b = bytearray(path.read_bytes())
    b[offset:offset + len(value)] = value
    out.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "case, words",
    [
        ("magic", "no GGUF magic"),
        ("version", "version 9"),
        ("tensor count", "tensors declared"),
        ("kv count", "metadata keys declared"),
        ("truncated", "runs past the end"),
        ("type", "unknown type"),
    ],
)
def test_malformed_files_are_refused_in_one_line(tmp_path, case, words):
    src = tmp_path / "m.gguf"
    write_gguf(src, {"w": (np.ones((2, 32), np.float32), Q.F32)})
    bad = tmp_path / "bad.gguf"
    data = src.read_bytes()
    if case == "magic":
        patched(src, bad, 0, b"GGUX")
    elif case == "version":
        patched(src, bad, 4, (9).to_bytes(4, "little"))
    elif case == "tensor count":
        patched(src, bad, 8, (1 << 40).to_bytes(8, "little"))
    elif case == "kv count":
        patched(src, bad, 16, (1 << 40).to_bytes(8, "little"))
    elif case == "truncated":
        bad.write_bytes(data[:-64])
    elif case == "type":
        # the tensor info's type field sits right before its 8-byte offset at the end of the infos
        i = data.index(b"w" + (2).to_bytes(4, "little"))
        off = i + 1 + 4 + 16
        patched(src, bad, off, (99).to_bytes(4, "little"))
    r = subprocess.run([QCONVERT, "inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "bad.gguf" in line and words in line, line


def fields(path):
    r = gguf.GGUFReader(str(path))
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = f.contents()
    return r, out


@pytest.mark.parametrize("preset, want_type, file_type", [("keep", Q.F32, 0), ("fp16", Q.F16, 1)])
def test_gguf_to_gguf_carries_every_key_and_writes_the_tensors(tmp_path, preset, want_type, file_type):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    n = rng.standard_normal(64).astype(np.float32)
    write_gguf(tmp_path / "m.gguf", {"blk.0.w": (w, Q.F32), "norm": (n, Q.F32)}, extra={"tokenizer.chat_template": "{{ x }}"})
    run(tmp_path / "m.gguf", "-o", tmp_path / "out.gguf", "--preset", preset, "-q")
    src_reader, src = fields(tmp_path / "m.gguf")
    out_reader, out = fields(tmp_path / "out.gguf")
    for k, v in src.items():
        if k in ("general.file_type", "general.alignment"):
            continue
        assert out[k] == v, k
    assert out["general.file_type"] == file_type
    doc = json.loads(out["qconvert.quantization"])
    assert doc["format"] == "qconvert.quantization/2" and doc["input"]["format"] == "gguf"
    got = {t.name: t for t in out_reader.tensors}
    assert got["blk.0.w"].tensor_type == want_type and list(got["blk.0.w"].shape) == [64, 8]
    assert np.array_equal(np.asarray(got["blk.0.w"].data, np.float32).reshape(8, 64), w.astype(np.float16 if preset == "fp16" else np.float32).astype(np.float32))
    # and qconvert reads its own output back
    run(tmp_path / "out.gguf", "-o", tmp_path / "back.safetensors", "--preset", "keep", "-q")
    back = load_file(str(tmp_path / "back.safetensors"))
    # 1-D tensors stay F32 whatever the cast (llama.cpp aborts on 16-bit norms)
    assert back["norm"].dtype == np.float32 and np.array_equal(back["norm"], n)
    assert got["norm"].tensor_type == Q.F32


def test_safetensors_to_gguf_and_quantized_plans_are_refused_up_front(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(4)
    save_file({"a": rng.standard_normal((64, 64)).astype(np.float32)}, str(tmp_path / "m.safetensors"))
    run(tmp_path / "m.safetensors", "-o", tmp_path / "o.gguf", "--preset", "bf16", "-q")
    r = gguf.GGUFReader(str(tmp_path / "o.gguf"))
    assert r.tensors[0].tensor_type == Q.BF16 and r.fields["general.file_type"].contents() == 32
    res = subprocess.run([QCONVERT, str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "q.gguf")], capture_output=True, text=True)
    assert res.returncode == 64 and "GGUF holds llama.cpp's block types" in res.stderr
    assert not (tmp_path / "q.gguf").exists()


def special_rows():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((16, 128)) * np.linspace(0.01, 3, 128)).astype(np.float32)
    x[0] = 0  # all-zero blocks
    x[1] = 0.3  # constant blocks
    x[2, :32] = np.arange(32, dtype=np.float32) * 0.5 - 8  # exact .5 multiples (ties for Q8_0's rounding)
    x[3, :32] = -x[2, :32]
    x[4, 5] = 1e4  # an outlier
    x[5, :32] = np.float32(127) * np.arange(-16, 16, dtype=np.float32) / 16  # ties at amax/127 steps
    return x


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_blocks_are_byte_identical_to_the_gguf_reference(tmp_path, qtype, minilm):
    from safetensors.numpy import save_file

    tensors = {"special": special_rows()}
    # MiniLM's real weights come from the session fixture (downloaded into the cache on a fresh machine)
    for k, v in load_file(str(minilm)).items():
        if v.ndim == 2 and v.shape[1] % 32 == 0 and v.dtype == np.float32:
            tensors[k] = v
    save_file(tensors, str(tmp_path / "m.safetensors"))
    preset = qtype.name.lower()
    # every 2-D tensor at this type (the q4 presets put output projections at Q8_0; MiniLM has none)
    run(tmp_path / "m.safetensors", "-o", tmp_path / "o.gguf", "--preset", preset, "-q")
    reader = gguf.GGUFReader(str(tmp_path / "o.gguf"))
    got = {t.name: t for t in reader.tensors}
    checked = 0
    for name, x in tensors.items():
        t = got[name]
        assert t.tensor_type == qtype, name
        want = gguf.quants.quantize(x, qtype)
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)), name
        checked += 1
    assert checked >= 2
    assert reader.fields["general.file_type"].contents() == {Q.Q8_0: 7, Q.Q4_0: 2, Q.Q4_1: 3}[qtype]
    # qconvert reads its output back to the reference's dequantized values
    run(tmp_path / "o.gguf", "-o", tmp_path / "back.safetensors", "--preset", "keep", "-q")
    back = load_file(str(tmp_path / "back.safetensors"))
    x = tensors["special"]
    assert np.array_equal(back["special"], gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape))


def test_block_types_need_a_gguf_output_and_whole_blocks(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    save_file({"w": rng.standard_normal((64, 96)).astype(np.float32), "odd": rng.standard_normal((64, 40)).astype(np.float32)},
              str(tmp_path / "m.safetensors"))
    r = subprocess.run([QCONVERT, str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "o.safetensors"), "--preset", "q8_0"],
                       capture_output=True, text=True)
    assert r.returncode == 64 and "only a .gguf output holds" in r.stderr
    plan = run("plan", tmp_path / "m.safetensors", "--preset", "q4_0").stdout
    assert "not whole q4_0 blocks of 32" in plan


def test_diff_and_dequantize_read_block_outputs(tmp_path):
    from safetensors.numpy import save_file

    x = special_rows()
    save_file({"w": x}, str(tmp_path / "m.safetensors"))
    run(tmp_path / "m.safetensors", "-o", tmp_path / "o.gguf", "--preset", "q8_0", "-q")
    d = json.loads(run("diff", tmp_path / "m.safetensors", tmp_path / "o.gguf", "--json").stdout)
    want = gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0).reshape(x.shape).astype(np.float64)
    e2 = ((x.astype(np.float64) - want) ** 2).sum()
    assert d["model"]["sqnr_db"] == pytest.approx(10 * np.log10((x.astype(np.float64) ** 2).sum() / e2), rel=1e-9)
    run("dequantize", tmp_path / "o.gguf", "-o", tmp_path / "back.safetensors")
    assert np.array_equal(load_file(str(tmp_path / "back.safetensors"))["w"], want.astype(np.float32))


def test_dequantize_to_gguf_writes_no_metadata_document(tmp_path):
    """A GGUF written without a conversion (dequantize) carried a placeholder metadata document that
    qconvert itself then refused to read."""
    from safetensors.numpy import save_file

    x = special_rows()
    save_file({"w": x}, str(tmp_path / "m.safetensors"))
    run(tmp_path / "m.safetensors", "-o", tmp_path / "q.gguf", "--preset", "q8_0", "-q")
    run("dequantize", tmp_path / "q.gguf", "-o", tmp_path / "back.gguf")
    r = gguf.GGUFReader(str(tmp_path / "back.gguf"))
    assert "qconvert.quantization" not in r.fields
    assert r.tensors[0].tensor_type == Q.F32
    run("inspect", tmp_path / "back.gguf")
    run("diff", tmp_path / "q.gguf", tmp_path / "back.gguf")


KQUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# where a K-quant block keeps its float16 factors: (offset of d, offset of dmin or None)
FACTORS = {Q.Q2_K: (80, 82), Q.Q3_K: (108, None), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, None)}


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_k_quants_dequantize_as_the_reference(tmp_path, qtype):
    """Every bit pattern of the quants and scales (random blocks, finite float16 factors) reads as
    gguf.quants.dequantize gives it."""
    rng = np.random.default_rng(int(qtype) + 100)
    per, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 6, 512
    blocks = rng.integers(0, 256, size=(rows * cols // per, size), dtype=np.uint8)
    d_off, m_off = FACTORS[qtype]
    for off in (d_off, m_off):
        if off is not None:
            f = (rng.standard_normal(blocks.shape[0]) * 0.01).astype(np.float16)
            blocks[:, off:off + 2] = f.view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(rows, cols // per * size)
    wr = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    wr.add_tensor("blk.0.w", raw, raw_shape=raw.shape, raw_dtype=qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    run(tmp_path / "k.gguf", "-o", tmp_path / "k.safetensors", "--preset", "keep", "-q")
    got = load_file(str(tmp_path / "k.safetensors"))["blk.0.w"]
    t = gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors[0]
    want = gguf.quants.dequantize(t.data, qtype).reshape(rows, cols).astype(np.float32)
    assert got.shape == (rows, cols)
    np.testing.assert_array_equal(got, want)
