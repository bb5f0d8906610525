"""Model zoos: batch conversion across every format, incremental runs, resume, shards, gates, diff."""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import make_onnx_models
from conftest import QCONVERT, run


@pytest.fixture
def zoo(tmp_path):
    """Every format: safetensors (single and sharded), ONNX with external data, npz, pt (when torch is
    there), a corrupt file, a duplicate and files that are not checkpoints."""
    z = tmp_path / "zoo"
    (z / "vision").mkdir(parents=True)
    (z / "text" / "sharded").mkdir(parents=True)
    r = np.random.default_rng(0)
    save_file({"enc.weight": r.standard_normal((64, 96)).astype(np.float32), "enc.bias": np.zeros(64, np.float32)}, str(z / "text" / "enc.safetensors"))
    shutil.copy(z / "text" / "enc.safetensors", z / "text" / "enc-copy.safetensors")       # a duplicate
    save_file({"a.weight": r.standard_normal((64, 64)).astype(np.float32)}, str(z / "text" / "sharded" / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": r.standard_normal((64, 64)).astype(np.float32)}, str(z / "text" / "sharded" / "model-00002-of-00002.safetensors"))
    json.dump({"metadata": {"total_size": 32768}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                                                  "b.weight": "model-00002-of-00002.safetensors"}},
              open(z / "text" / "sharded" / "model.safetensors.index.json", "w"))
    make_onnx_models.external(str(z / "vision" / "ext.onnx"))
    np.savez(z / "vision" / "arrays.npz", w=r.standard_normal((48, 64)).astype(np.float32))
    try:
        import torch
        torch.save({"w": torch.randn(64, 80)}, z / "vision" / "net.pt")
    except ImportError:
        pass
    (z / "vision" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    (z / "README.md").write_text("not a model")
    return z


def batch(*args, check=False):
    return subprocess.run([QCONVERT, "batch", *map(str, args)], capture_output=True, text=True)


def rows(manifest):
    return [json.loads(line) for line in open(manifest) if line.strip()]


def test_zoo_converts_every_good_model_and_reports_the_corrupt_one(zoo, tmp_path):
    out = tmp_path / "out"
    r = batch(zoo, "-o", out, "--manifest", tmp_path / "m.jsonl")
    assert r.returncode == 6, r.stderr
    m = {x["model"]: x for x in rows(tmp_path / "m.jsonl")}
    assert m["vision/broken.safetensors"]["status"] == "failed" and "broken.safetensors" in m["vision/broken.safetensors"]["error"]
    assert "README.md" not in m
    good = [k for k in m if k != "vision/broken.safetensors"]
    assert len(good) >= 5 and all(m[k]["status"] == "converted" for k in good)
    assert load_file(str(out / "text" / "enc.safetensors"))["enc.weight"].dtype == np.int8
    assert (out / "text" / "sharded" / "model.safetensors.index.json").exists()
    assert (out / "vision" / "ext.onnx").exists() and (out / "vision" / "arrays.npz").exists()
    assert "vision/broken.safetensors" in r.stderr
    # the second run skips everything that was converted
    r2 = batch(zoo, "-o", out, "--manifest", tmp_path / "m2.jsonl")
    m2 = {x["model"]: x["status"] for x in rows(tmp_path / "m2.jsonl")}
    assert all(m2[k] == "skipped" for k in good), m2
    # a policy change re-converts
    batch(zoo, "-o", out, "--set", "granularity=tensor", "--manifest", tmp_path / "m3.jsonl")
    m3 = {x["model"]: x["status"] for x in rows(tmp_path / "m3.jsonl")}
    assert all(m3[k] == "converted" for k in good), m3


def test_variants_from_one_read(zoo, tmp_path):
    out = tmp_path / "out"
    r = batch(zoo, "-o", out, "--variant", "int8=preset:int8", "--variant", "w4=preset:w4g128", "--variant", "u8=preset:uint8",
              "--manifest", tmp_path / "m.csv")
    assert r.returncode == 6, r.stderr          # the corrupt model
    lines = open(tmp_path / "m.csv").read().splitlines()
    assert lines[0].startswith("model,variant,format,status")
    assert load_file(str(out / "int8" / "text" / "enc.safetensors"))["enc.weight"].dtype == np.int8
    assert load_file(str(out / "w4" / "text" / "enc.safetensors"))["enc.weight"].shape == (64, 48)
    # the ONNX model is edited by its writer, so each variant after the first reads it again
    import onnx
    import onnxruntime as ort
    for v in ("int8", "u8", "w4"):  # w4 on an opset-13 model runs as MatMulNBits (no 4-bit DequantizeLinear needed)
        onnx.checker.check_model(str(out / v / "vision" / "ext.onnx"), full_check=True)
        ort.InferenceSession(str(out / v / "vision" / "ext.onnx"), providers=["CPUExecutionProvider"])
    assert any(line.startswith("vision/ext.onnx,w4,onnx,converted") for line in lines)


def test_shards_cover_every_model_exactly_once(zoo, tmp_path):
    seen = []
    for i in range(3):
        batch(zoo, "-o", tmp_path / f"out{i}", "--shard", f"{i}/3", "--manifest", tmp_path / f"s{i}.jsonl", "-q")
        seen += [x["model"] for x in rows(tmp_path / f"s{i}.jsonl")]
    full = [x["model"] for x in (batch(zoo, "-o", tmp_path / "full", "--manifest", tmp_path / "full.jsonl", "-q") and rows(tmp_path / "full.jsonl"))]
    assert sorted(seen) == sorted(full) and len(seen) == len(set(seen))
    merged = subprocess.run([QCONVERT, "batch", "merge", *[str(tmp_path / f"s{i}.jsonl") for i in range(3)], "-o", str(tmp_path / "all.jsonl")],
                            capture_output=True, text=True)
    assert sorted(x["model"] for x in rows(tmp_path / "all.jsonl")) == sorted(full)
    assert merged.returncode == 6      # the corrupt model is in one of the shards


def test_killed_run_resumes(zoo, tmp_path):
    # enough work that the kill lands half-way: it is sent as soon as the first output appears
    r = np.random.default_rng(3)
    for i in range(12):
        save_file({"w": r.standard_normal((1024, 2048)).astype(np.float32)}, str(zoo / f"big{i:02d}.safetensors"))
    out = tmp_path / "out"
    p = subprocess.Popen([QCONVERT, "batch", str(zoo), "-o", str(out), "--jobs", "1", "-q"], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        if out.exists() and any(f.endswith(".safetensors") and not f.startswith(".") for _, _, fs in os.walk(out) for f in fs):
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGTERM)
    p.wait()
    assert p.returncode in (128 + signal.SIGTERM, 6), p.returncode
    leftovers = [f for d, _, fs in os.walk(out) for f in fs if f.startswith(".")]
    assert leftovers == []
    batch(zoo, "-o", out, "--manifest", tmp_path / "m.jsonl", "-q")
    m = rows(tmp_path / "m.jsonl")
    status = [x["status"] for x in m if x["model"] != "vision/broken.safetensors"]
    assert "skipped" in status, status                      # what the killed run finished is kept
    if p.returncode != 6:
        assert "converted" in status, status                # and the rest is done now
    assert all(s in ("converted", "skipped") for s in status)
    for x in m:
        if x["status"] != "failed":
            run("inspect", x["output"])       # every output is complete


def test_gates_fail_exactly_when_they_should(tmp_path):
    r = np.random.default_rng(1)
    x = r.standard_normal((64, 128)).astype(np.float32)
    save_file({"w": x}, str(tmp_path / "in.safetensors"))
    ok = run(tmp_path / "in.safetensors", "-o", tmp_path / "a.safetensors", "--min-sqnr", "30", "--min-cosine", "0.999", "--max-size-ratio", "0.3", "-q", check=False)
    assert ok.returncode == 0, ok.stderr
    bad = run(tmp_path / "in.safetensors", "-o", tmp_path / "b.safetensors", "--preset", "w4g128", "--min-sqnr", "30", "-q", check=False)
    assert bad.returncode == 5 and "w: sqnr_db" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.safetensors").exists()        # a rejected result never creates the output
    # ... nor replaces an existing one; --rejected-output keeps it elsewhere for inspection
    before = open(tmp_path / "a.safetensors", "rb").read()
    rej = run(tmp_path / "in.safetensors", "-o", tmp_path / "a.safetensors", "--preset", "w4g128", "--min-sqnr", "30",
              "--rejected-output", tmp_path / "b.safetensors", "-q", check=False)
    assert rej.returncode == 5 and "rejected result is in" in rej.stderr
    assert open(tmp_path / "a.safetensors", "rb").read() == before
    assert (tmp_path / "b.safetensors").exists()
    none = run(tmp_path / "in.safetensors", "-o", tmp_path / "c.safetensors", "--preset", "w4g128", "--min-sqnr", "30", "--no-output-on-fail", "-q", check=False)
    assert none.returncode == 5 and not (tmp_path / "c.safetensors").exists()
    size = run(tmp_path / "in.safetensors", "-o", tmp_path / "d.safetensors", "--preset", "fp16", "--max-size-ratio", "0.3", "-q", check=False)
    assert size.returncode == 5 and "size_ratio" in size.stderr
    # diff: the worst first, JSON for machines, and the same gates
    d = subprocess.run([QCONVERT, "diff", str(tmp_path / "in.safetensors"), str(tmp_path / "b.safetensors"), "--json"], capture_output=True, text=True)
    doc = json.loads(d.stdout)
    assert doc["tensors"][0]["name"] == "w" and 15 < doc["tensors"][0]["sqnr_db"] < 30
    g = subprocess.run([QCONVERT, "diff", str(tmp_path / "in.safetensors"), str(tmp_path / "a.safetensors"), "--min-sqnr", "30"], capture_output=True, text=True)
    assert g.returncode == 0
    g = subprocess.run([QCONVERT, "diff", str(tmp_path / "in.safetensors"), str(tmp_path / "b.safetensors"), "--min-sqnr", "30"], capture_output=True, text=True)
    assert g.returncode == 5 and "w: sqnr_db" in g.stderr


def test_diff_across_formats(tmp_path):
    r = np.random.default_rng(2)
    x = {"w": r.standard_normal((32, 64)).astype(np.float32), "b": r.standard_normal(32).astype(np.float32)}
    np.savez(tmp_path / "a.npz", **x)
    run(tmp_path / "a.npz", "-o", tmp_path / "q.safetensors", "-q")
    d = json.loads(subprocess.run([QCONVERT, "diff", str(tmp_path / "a.npz"), str(tmp_path / "q.safetensors"), "--json"], capture_output=True, text=True).stdout)
    by = {t["name"]: t for t in d["tensors"]}
    assert by["b"]["sqnr_db"] is None and by["w"]["cosine"] > 0.999


def test_manifest_of_inputs(zoo, tmp_path):
    listing = zoo / "list.txt"
    listing.write_text("# two of the zoo's models\ntext/enc.safetensors\nvision/arrays.npz\n\n")
    r = batch(listing, "-o", tmp_path / "out", "--manifest", tmp_path / "m.jsonl", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(x["model"] for x in rows(tmp_path / "m.jsonl")) == ["text/enc.safetensors", "vision/arrays.npz"]
    assert (tmp_path / "out" / "vision" / "arrays.npz").exists()


def test_a_model_that_crashes_the_process_never_takes_the_others_down(tmp_path):
    """QCONVERT_TEST_CRASH_ON makes the named models crash the worker (SIGSEGV) as a hostile file
    would: each is recorded as failed, every other model is converted, the manifest lists all."""
    import os
    import subprocess

    src = tmp_path / "zoo"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        save_file({"w": rng.standard_normal((64, 64)).astype(np.float32)}, str(src / f"m{i}.safetensors"))
    out = tmp_path / "out"
    manifest = tmp_path / "manifest.jsonl"
    env = dict(os.environ, QCONVERT_TEST_CRASH_ON="m2.safetensors,m3.safetensors,m6.safetensors")
    r = subprocess.run([QCONVERT, "batch", str(src), "-o", str(out), "--jobs", "2", "--manifest", str(manifest), "-q"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 6, r.stderr
    rows = {row["model"]: row for row in map(json.loads, manifest.read_text().splitlines())}
    assert sorted(rows) == [f"m{i}.safetensors" for i in range(8)]
    crashed = sorted(m for m, row in rows.items() if row["status"] == "failed")
    assert crashed == ["m2.safetensors", "m3.safetensors", "m6.safetensors"]
    for m in crashed:
        assert "crashed" in rows[m]["error"] and "signal 11" in rows[m]["error"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"m{i}.safetensors" for i in range(8) if i not in (2, 3, 6))
    assert all(len(line) < 400 for line in r.stderr.splitlines())
    # a second run converts nothing again and blames the same models
    r2 = subprocess.run([QCONVERT, "batch", str(src), "-o", str(out), "--manifest", str(manifest), "-q"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert r2.returncode == 6
    rows = {row["model"]: row["status"] for row in map(json.loads, manifest.read_text().splitlines())}
    assert sorted(m for m, s in rows.items() if s == "skipped") == sorted(f"m{i}.safetensors" for i in range(8) if i not in (2, 3, 6))


def test_killing_the_batch_stops_its_worker(tmp_path):
    import signal
    import subprocess
    import time

    src = tmp_path / "zoo"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        save_file({"w": rng.standard_normal((768, 1024)).astype(np.float32)}, str(src / f"m{i}.safetensors"))
    slow = ["--set", "calibration=entropy", "--set", "search=exhaustive"]
    p = subprocess.Popen([QCONVERT, "batch", str(src), "-o", str(tmp_path / "out"), *slow, "-q"])
    time.sleep(1.0)
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker process"
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split()[2] for w in workers)


def test_merge_refuses_rows_with_an_unknown_status(tmp_path):
    """Manifest statuses were free strings: a row with a status qconvert never writes was merged as
    neither failed nor converted, and the merge exited 0."""
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"model": "a", "variant": "", "format": "safetensors", "output": "x", "status": "exploded",
                             "error": None, "bytes_before": 1, "bytes_after": 1, "worst_sqnr_db": None, "seconds": 0}) + "\n")
    r = subprocess.run([QCONVERT, "batch", "merge", str(m)], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "m.jsonl" in line and "status" in line
