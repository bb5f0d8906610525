#!/usr/bin/env python3
"""Benchmark: a zoo of 24 small-to-medium safetensors models (fixed seed, 2-40 MB each).

Runs `qconvert batch` with --jobs 2 and --jobs 1 (expect close to 2x on 2 cores), and compares the
per-model overhead of one batch against one qconvert process per model.

    .venv/bin/python Benchmarks/batch_zoo.py [--rounds 2]
"""
import argparse
import pathlib
import shutil
import subprocess
import sys
import time

from common import measure, report

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work" / "zoo"


def generate(folder):
    import numpy as np
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    for i in range(24):
        sub = folder / f"family{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        width = [256, 512, 768, 1024][i % 4]
        layers = 2 + i % 5
        t = {f"layers.{k}.weight": rng.standard_normal((width, width), dtype=np.float32) for k in range(layers)}
        t["embed.weight"] = rng.standard_normal((1000, width), dtype=np.float32)
        save_file(t, str(sub / f"model{i:02d}.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--qconvert", default=str(REPO / ".build/release/qconvert"))
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate:
        generate(pathlib.Path(a.generate))
        return
    if not (WORK / "family0").exists():
        subprocess.run([sys.executable, __file__, "--generate", str(WORK)], check=True)
    models = sorted(WORK.rglob("*.safetensors"))
    total = sum(m.stat().st_size for m in models)
    out = HERE / "work" / "zoo-out"
    results = {"batch --jobs 2": [], "batch --jobs 1": [], "24 processes": []}
    for _ in range(a.rounds):
        for name in results:
            shutil.rmtree(out, ignore_errors=True)
            if name.startswith("batch"):
                results[name].append(measure([a.qconvert, "batch", str(WORK), "-o", str(out), "-q", "--jobs", name[-1]]))
            else:
                out.mkdir(parents=True)
                start = time.perf_counter()
                peak = 0
                for m in models:
                    _, rss = measure([a.qconvert, str(m), "-o", str(out / m.name), "-q", "--jobs", "1"])
                    peak = max(peak, rss)
                results[name].append((time.perf_counter() - start, peak))
    med = report(f"zoo: {len(models)} models, {total / 1e6:.0f} MB, {a.rounds} rounds, medians", results)
    j2, j1, p = med["batch --jobs 2"][0], med["batch --jobs 1"][0], med["24 processes"][0]
    print(f"  --jobs 2 vs --jobs 1: {j1 / j2:.2f}x (2 cores)")
    print(f"  per-model overhead: batch {1000 * j1 / len(models):.1f} ms/model vs separate processes {1000 * p / len(models):.1f} ms/model")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
