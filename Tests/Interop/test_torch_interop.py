"""PyTorch torch.save archives in and out, judged by torch.load(weights_only=True) (and mmap=True)."""
import io
import json
import os
import pickle
import random
import subprocess
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the PyTorch interop tests are skipped")

import reference as ref  # noqa: E402
from conftest import QCONVERT, run  # noqa: E402


def load(path, **kw):
    return torch.load(str(path), weights_only=True, **kw)


@pytest.fixture
def tv(tmp_path):
    """FORMATS.md's vector: views (a row, a transpose) of one storage, fp16 and fp8."""
    w = torch.arange(6.0).reshape(2, 3)
    sd = {"w": w, "h": torch.tensor([1.5], dtype=torch.float16), "v": w[1], "t": w.t(),
          "f8": torch.tensor([1.0, -2.0]).to(torch.float8_e4m3fn)}
    p = tmp_path / "tv.pt"
    torch.save(sd, p)
    return p, sd


def training_checkpoint(tmp_path, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 96), torch.nn.LayerNorm(96))
    sd = m.state_dict()
    sd["tied.weight"] = sd["0.weight"]
    sd["position_ids"] = torch.arange(12)
    sd["half.weight"] = torch.randn(48, 40, dtype=torch.float16)
    sd["bf.weight"] = torch.randn(40, 48, dtype=torch.bfloat16)
    ck = {"model": sd, "epoch": 3, "config": {"lr": 1e-3, "name": "tiny", "dims": [64, 128], "flags": (True, None)}}
    p = tmp_path / "ckpt.pt"
    torch.save(ck, p)
    return p, ck


def test_reference_vector_keep_round_trip(tmp_path, tv):
    p, sd = tv
    out = tmp_path / "out.pt"
    run(p, "-o", out, "--preset", "keep", "-q")
    for kw in ({}, {"mmap": True}):
        d = load(out, **kw)
        for k, v in sd.items():
            assert d[k].dtype == v.dtype and d[k].shape == v.shape, k
            assert torch.equal(d[k].view(torch.uint8), v.contiguous().view(torch.uint8)), k
    assert subprocess.run(["unzip", "-tq", str(out)], capture_output=True).returncode == 0
    # 64-byte aligned, stored members
    with zipfile.ZipFile(out) as z:
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if "/data/" in info.filename:
                raw = open(out, "rb").read()
                off = info.header_offset + 30 + len(info.filename.encode()) + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
                assert off % 64 == 0, info.filename


def test_training_checkpoint_structure_survives_quantization(tmp_path):
    p, ck = training_checkpoint(tmp_path)
    out = tmp_path / "q.pt"
    run(p, "-o", out, "-q")
    d = load(out)
    assert d["epoch"] == 3 and d["config"] == ck["config"]
    m = d["model"]
    src = ck["model"]
    for name in ("0.weight", "2.weight", "half.weight", "bf.weight"):
        q, s = m[name], m[name + "_scale"]
        assert q.dtype == torch.int8 and s.shape == (q.shape[0], 1)
        want_q, want_s, _ = ref.quantize(src[name].float().numpy(), "int8")
        np.testing.assert_array_equal(q.numpy().astype(np.int64), want_q)
        np.testing.assert_array_equal(s.numpy(), want_s)
    # tied weights stay tied: one storage, quantized once
    assert m["tied.weight"].data_ptr() == m["0.weight"].data_ptr()
    assert "tied.weight_scale" not in m
    for name in ("0.bias", "2.bias", "3.weight", "3.bias", "position_ids"):
        assert torch.equal(m[name], src[name]), name
    assert list(m.keys())[:3] == ["0.weight", "0.weight_scale", "0.bias"]
    doc = json.loads(zipfile.ZipFile(out).read("q/qconvert.quantization.json"))
    assert set(doc["tensors"]) >= {"model.0.weight", "model.2.weight"}
    load(out, mmap=True)


def test_parameters_and_state_dict_metadata(tmp_path):
    lin = torch.nn.Linear(64, 32)
    torch.save({"param": lin.weight, "sd": lin.state_dict()}, tmp_path / "p.pt")
    run(tmp_path / "p.pt", "-o", tmp_path / "k.pt", "--preset", "keep", "-q")
    d = load(tmp_path / "k.pt")
    assert isinstance(d["param"], torch.nn.Parameter) and d["param"].requires_grad
    assert torch.equal(d["param"], lin.weight)
    assert getattr(d["sd"], "_metadata", None) == getattr(lin.state_dict(), "_metadata", None)


def test_bin_to_safetensors_is_bit_exact_with_keep(tmp_path):
    from safetensors.numpy import load_file
    p, ck = training_checkpoint(tmp_path, seed=1)
    sd = ck["model"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    run(tmp_path / "pytorch_model.bin", "-o", tmp_path / "model.safetensors", "--preset", "keep", "-q")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for k, v in sd.items():
            if k == "tied.weight":
                continue
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.contiguous().view(torch.uint8)), k
    # and every direction: safetensors -> pt -> npz -> pt
    run(tmp_path / "model.safetensors", "-o", tmp_path / "a.pt", "--preset", "keep", "-q")
    run(tmp_path / "a.pt", "-o", tmp_path / "b.npz", "--preset", "keep", "-q")
    run(tmp_path / "b.npz", "-o", tmp_path / "c.pt", "--preset", "keep", "-q")
    c = load(tmp_path / "c.pt")
    for k, v in sd.items():
        if k != "tied.weight":
            assert c[k].dtype == v.dtype and torch.equal(c[k].view(torch.uint8), v.contiguous().view(torch.uint8)), k


def test_fp8_and_int4_outputs_load(tmp_path):
    p, ck = training_checkpoint(tmp_path, seed=2)
    run(p, "-o", tmp_path / "f8.pt", "--set", "dtype=fp8_e4m3", "-q")
    m = load(tmp_path / "f8.pt")["model"]
    assert m["2.weight"].dtype == torch.float8_e4m3fn
    deq = m["2.weight"].float() * m["2.weight_scale"]
    assert torch.nn.functional.cosine_similarity(deq.flatten(), ck["model"]["2.weight"].flatten(), dim=0) > 0.99
    run(p, "-o", tmp_path / "w4.pt", "--preset", "w4g128", "--set", "group_size=32", "-q")
    m = load(tmp_path / "w4.pt", mmap=True)["model"]
    assert m["0.weight"].dtype == torch.uint8 and m["0.weight"].shape == (128, 32)


def test_torchscript_is_refused_clearly(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(4, 4))
    torch.jit.save(scripted, str(tmp_path / "ts.pt"))
    r = run(tmp_path / "ts.pt", "-o", tmp_path / "o.pt", check=False)
    assert r.returncode == 3 and "TorchScript" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


def test_legacy_files_are_read(tmp_path):
    w = torch.arange(12.0).reshape(3, 4)
    sd = {"w": w, "row": w[1], "t": w.t(), "h": torch.randn(40, 40).half(), "big": torch.randn(64, 64), "n": 5}
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    run(tmp_path / "legacy.pt", "-o", tmp_path / "k.pt", "--preset", "keep", "-q")
    d = load(tmp_path / "k.pt")
    assert d["n"] == 5
    for k in ("w", "row", "t", "h", "big"):
        assert torch.equal(d[k], sd[k]), k
    run(tmp_path / "legacy.pt", "-o", tmp_path / "q.pt", "-q")
    q = load(tmp_path / "q.pt")
    assert q["big"].dtype == torch.int8 and torch.allclose(q["big"].float() * q["big_scale"], sd["big"], atol=0.03)


class Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def archive(path, pkl, extra=()):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
        for name, data in extra:
            z.writestr(name, data)


def storage_pickle(numel, size, offset=0, stride=None, key="0"):
    """A hand-written protocol-2 pickle of one float tensor over storage `key`."""
    stride = stride or tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))

    def tup(v):
        return b"(" + b"".join(b"J" + int(x).to_bytes(4, "little", signed=True) for x in v) + b"t"
    body = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" +
            b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX" + len(key).to_bytes(4, "little") + key.encode() +
            b"X\x03\x00\x00\x00cpuJ" + numel.to_bytes(4, "little") + b"tQ" +
            b"J" + offset.to_bytes(4, "little", signed=True) + tup(size) + tup(stride) +
            b"\x89ccollections\nOrderedDict\n)RtR.")
    return body


HOSTILE = {
    "os.system": lambda: pickle.dumps(Evil(os.system, ("echo pwned",)), protocol=2),
    "posix.system": lambda: b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueq\x85R.",
    "builtins.eval": lambda: b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.",
    "subprocess": lambda: b"\x80\x02csubprocess\ncheck_output\n]\x85R.",
    "reduce-not-callable": lambda: b"\x80\x02X\x01\x00\x00\x00a)R.",
    "setitem-on-list": lambda: b"\x80\x02]X\x01\x00\x00\x00aK\x01s.",
    "frame-trick": lambda: b"\x80\x04\x95\xff\xff\xff\x00\x00\x00\x00\x00N.",
    "protocol-9": lambda: b"\x80\x09N.",
    "truncated": lambda: b"\x80\x02(X\xff\x00\x00\x00ab",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pickles_are_refused_without_running_anything(tmp_path, case):
    marker = tmp_path / "pwned"
    archive(tmp_path / "evil.pt", HOSTILE[case]())
    r = subprocess.run([QCONVERT, str(tmp_path / "evil.pt"), "-o", str(tmp_path / "o.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 3, (case, r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1
    assert "pwned" not in r.stdout and not marker.exists()
    named = {"os.system": "posix.system", "posix.system": "posix.system", "builtins.eval": "builtins.eval",
             "subprocess": "subprocess.check_output"}
    if case in named:
        assert named[case] in r.stderr, r.stderr
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("case", ["storage-too-small", "offset-outside", "stride-outside", "record-size-mismatch",
                                  "dotdot-member", "duplicate-member", "no-data-record"])
def test_bad_storages_and_members_are_refused(tmp_path, case):
    data = np.zeros(16, dtype=np.float32).tobytes()
    extra = [("archive/data/0", data)]
    pkl = storage_pickle(16, (4, 4))
    if case == "storage-too-small":
        pkl = storage_pickle(16, (5, 4))
    elif case == "offset-outside":
        pkl = storage_pickle(16, (4, 4), offset=8)
    elif case == "stride-outside":
        pkl = storage_pickle(16, (4, 4), stride=(8, 1))
    elif case == "record-size-mismatch":
        extra = [("archive/data/0", data[:-4])]
    elif case == "dotdot-member":
        extra.append(("archive/../escape", b"x"))
    elif case == "duplicate-member":
        extra.append(("archive/data/0", data))
    elif case == "no-data-record":
        extra = []
    p = tmp_path / "bad.pt"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive(p, pkl, extra)
    r = run(p, "-o", tmp_path / "o.pt", check=False)
    assert r.returncode == 3, (case, r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and str(p) in r.stderr
    assert not (tmp_path / "o.pt").exists()


def test_mutated_archives_never_crash(tmp_path):
    p, _ = training_checkpoint(tmp_path, seed=3)
    good = bytearray(open(p, "rb").read())
    rng = random.Random(1234)
    outcomes = {}
    for i in range(150):
        b = bytearray(good)
        for _ in range(rng.choice([1, 2, 8])):
            pos = rng.randrange(len(b))
            b[pos] = rng.randrange(256)
        if i % 10 == 0:
            b = b[: rng.randrange(len(b))]
        m = tmp_path / "m.pt"
        m.write_bytes(bytes(b))
        r = subprocess.run([QCONVERT, str(m), "-o", str(tmp_path / "o.pt"), "-q"], capture_output=True, text=True)
        assert r.returncode in (0, 3), (i, r.returncode, r.stderr[-500:])
        outcomes[r.returncode] = outcomes.get(r.returncode, 0) + 1
        if r.returncode == 3:
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert outcomes.get(3, 0) > 0


def test_sharded_bin_index_in(tmp_path):
    from safetensors.numpy import load_file
    torch.manual_seed(5)
    a = {"a.weight": torch.randn(64, 64)}
    b = {"b.weight": torch.randn(32, 64), "b.bias": torch.randn(32)}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {"a.weight": "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin",
          "b.bias": "pytorch_model-00002-of-00002.bin"}
    json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, open(tmp_path / "pytorch_model.bin.index.json", "w"))
    run(tmp_path / "pytorch_model.bin.index.json", "-o", tmp_path / "model.safetensors", "--preset", "keep", "-q")
    t = load_file(str(tmp_path / "model.safetensors"))
    for k, v in {**a, **b}.items():
        np.testing.assert_array_equal(t[k], v.numpy())
    run(tmp_path, "-o", tmp_path / "q.pt", "-q")
    d = load(tmp_path / "q.pt")
    assert d["a.weight"].dtype == torch.int8 and d["b.bias"].dtype == torch.float32


def test_minilm_as_pytorch_model_bin(tmp_path, minilm):
    from safetensors.torch import load_file as load_pt
    sd = load_pt(str(minilm))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    run(tmp_path / "pytorch_model.bin", "-o", tmp_path / "model.safetensors", "--preset", "keep", "-q")
    back = load_pt(str(tmp_path / "model.safetensors"))
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    run(tmp_path / "pytorch_model.bin", "-o", tmp_path / "q.pt", "-q")
    q = load(tmp_path / "q.pt", mmap=True)
    for k, v in sd.items():
        if q[k].dtype == torch.int8:
            deq = q[k].float() * q[k + "_scale"]
            assert torch.nn.functional.cosine_similarity(deq.flatten(), v.flatten(), dim=0) >= 0.999, k
    assert os.path.getsize(tmp_path / "q.pt") <= 0.3 * os.path.getsize(tmp_path / "pytorch_model.bin")


def test_corrupt_storage_crc_is_refused_and_nothing_written(tmp_path):
    p, _ = training_checkpoint(tmp_path, seed=6)
    raw = bytearray(open(p, "rb").read())
    with zipfile.ZipFile(p) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 1000)
    local = info.header_offset
    start = local + 30 + int.from_bytes(raw[local + 26:local + 28], "little") + int.from_bytes(raw[local + 28:local + 30], "little")
    raw[start + 100] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "o.pt"
    out.write_bytes(b"old")
    r = run(bad, "-o", out, check=False)
    assert r.returncode == 3 and "CRC mismatch" in r.stderr, r.stderr
    assert out.read_bytes() == b"old"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def test_pt_output_is_deterministic_whatever_jobs(tmp_path):
    p, _ = training_checkpoint(tmp_path, seed=7)
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    run(p, "-o", tmp_path / "one" / "q.pt", "--jobs", "1", "-q")
    run(p, "-o", tmp_path / "three" / "q.pt", "--jobs", "3", "-q")
    assert open(tmp_path / "one" / "q.pt", "rb").read() == open(tmp_path / "three" / "q.pt", "rb").read()
