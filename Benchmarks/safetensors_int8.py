#!/usr/bin/env python3
"""Benchmark: qconvert (default int8) against a numpy + safetensors script doing the same, and cp.

Generates a float32 transformer-like safetensors file (fixed seed) under Benchmarks/work/, then runs
the three commands alternately, several rounds, and prints median wall time, peak RSS and the ratios
against the issue's goals: >= 3x faster than the numpy script, <= 2x the time of cp, peak RSS <= 25 %
of the numpy script's, and about the same peak RSS for a 4x larger input.

    .venv/bin/python Benchmarks/safetensors_int8.py [--size-mb 400] [--rounds 3] [--large]
"""
import argparse
import os
import pathlib
import subprocess
import sys

from common import alternate, measure, report

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"


def make_model(path, size_mb, seed=0):
    """Layers of hidden 1024 and MLP 4096 (about 48 MB of float32 each) plus embeddings, until size_mb.
    Runs in a child process so that this process stays small (peak RSS of children is measured)."""
    if path.exists():
        return
    subprocess.run([sys.executable, __file__, "--generate", str(path), "--size-mb", str(size_mb)], check=True)


def generate(path, size_mb, seed=0):
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    hidden, mlp, vocab = 1024, 4096, 8192
    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden), dtype=np.float32) * np.float32(0.02)}
    total = tensors["model.embed_tokens.weight"].nbytes
    i = 0
    while total < size_mb * 1e6:
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + "self_attn." + n + ".weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32) * np.float32(0.05)
        tensors[p + "mlp.up_proj.weight"] = rng.standard_normal((mlp, hidden), dtype=np.float32) * np.float32(0.05)
        tensors[p + "mlp.down_proj.weight"] = rng.standard_normal((hidden, mlp), dtype=np.float32) * np.float32(0.05)
        tensors[p + "input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
        tensors[p + "mlp.up_proj.bias"] = np.zeros(mlp, dtype=np.float32)
        total = sum(t.nbytes for t in tensors.values())
        i += 1
    tensors["model.norm.weight"] = np.ones(hidden, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path) + ".part", metadata={"format": "pt"})
    os.rename(str(path) + ".part", path)


def run(size_mb, rounds, qconvert):
    src = WORK / f"model-{size_mb}mb.safetensors"
    make_model(src, size_mb)
    out = WORK / "out.safetensors"
    cmds = {
        "qconvert": [str(qconvert), str(src), "-o", str(out), "-q"],
        "numpy": [sys.executable, str(HERE / "numpy_int8.py"), str(src), str(out)],
        "cp": ["cp", str(src), str(out)],
    }
    measure(cmds["cp"])  # warm the page cache
    results = alternate(cmds, rounds, before_each=lambda: out.unlink(missing_ok=True))
    out.unlink(missing_ok=True)
    size = src.stat().st_size
    med = report(f"input {src.name}: {size / 1e6:.0f} MB, {rounds} rounds, medians", results)
    q, n, c = med["qconvert"], med["numpy"], med["cp"]
    print(f"  speed vs numpy script: {n[0] / q[0]:.2f}x faster (goal >= 3x)")
    print(f"  time vs cp:            {q[0] / c[0]:.2f}x (goal <= 2x)")
    print(f"  peak RSS vs numpy:     {100 * q[1] / n[1]:.1f} % (goal <= 25 %)")
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--large", action="store_true", help="also run a 4x larger input and compare qconvert's peak RSS")
    ap.add_argument("--qconvert", default=str(REPO / ".build/release/qconvert"))
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate:
        generate(pathlib.Path(a.generate), a.size_mb)
        return
    base = run(a.size_mb, a.rounds, a.qconvert)
    if a.large:
        big = run(a.size_mb * 4, max(1, a.rounds - 1), a.qconvert)
        print(f"\nqconvert peak RSS, {a.size_mb * 4} MB input vs {a.size_mb} MB: "
              f"{big['qconvert'][1] / 1e6:.1f} MB vs {base['qconvert'][1] / 1e6:.1f} MB "
              f"({big['qconvert'][1] / base['qconvert'][1]:.2f}x)")


if __name__ == "__main__":
    main()
