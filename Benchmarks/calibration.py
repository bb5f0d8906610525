#!/usr/bin/env python3
"""Benchmark: the four calibration methods against each other, in one run.

Generates 32 float32 [1024, 1024] weights (128 MB) with heavy-tailed rows (Student-t with 3 degrees
of freedom, a different spread per row; fixed seed) under Benchmarks/work/, then converts the file with
`--set calibration=METHOD` for max, percentile, entropy and mse, alternately, for each configuration
(int8 per channel, int8 groups of 128, int4 per channel, int4 groups of 128), and prints median wall
time, peak RSS and each method's time as a multiple of max's, against the goals: percentile <= 3x,
entropy <= 10x, mse <= 10x.

    .venv/bin/python Benchmarks/calibration.py [--rounds 3] [--tensors 32] [--only int8-channel]
"""
import argparse
import os
import pathlib
import subprocess
import sys

from common import alternate, report

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"

METHODS = ["max", "percentile", "entropy", "mse"]
GOALS = {"percentile": 3.0, "entropy": 10.0, "mse": 10.0}
CONFIGS = {
    "int8-channel": ["--set", "dtype=int8", "--set", "granularity=channel"],
    "int8-group128": ["--set", "dtype=int8", "--set", "granularity=group", "--set", "group_size=128"],
    "int4-channel": ["--set", "dtype=int4", "--set", "granularity=channel"],
    "int4-group128": ["--set", "dtype=int4", "--set", "granularity=group", "--set", "group_size=128"],
}


def generate(path, tensors, seed=0):
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    out = {}
    for i in range(tensors):
        spread = rng.uniform(0.01, 0.1, size=(1024, 1)).astype(np.float32)
        out[f"layers.{i}.weight"] = (rng.standard_t(3, size=(1024, 1024)).astype(np.float32) * spread)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path) + ".part")
    os.rename(str(path) + ".part", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--qconvert", default=str(REPO / ".build/release/qconvert"))
    ap.add_argument("--generate")
    args = ap.parse_args()
    if args.generate:
        generate(pathlib.Path(args.generate), args.tensors)
        return
    src = WORK / f"calibration-{args.tensors}x1024x1024.safetensors"
    if not src.exists():
        # In a child process so that this one stays small.
        subprocess.run([sys.executable, __file__, "--generate", str(src), "--tensors", str(args.tensors)], check=True)
    out = WORK / "calibration-out.safetensors"
    failed = []
    for config in args.only or list(CONFIGS):
        cmds = {m: [args.qconvert, str(src), "-o", str(out), "--quiet", "--set", f"calibration={m}", *CONFIGS[config]]
                for m in METHODS}
        med = report(f"{config}: {src.name} ({src.stat().st_size / 1e6:.0f} MB), {args.rounds} rounds",
                     alternate(cmds, args.rounds))
        base = med["max"][0]
        for m in METHODS[1:]:
            ratio = med[m][0] / base
            goal = GOALS[m]
            ok = ratio <= goal
            if not ok:
                failed.append(f"{config} {m}")
            print(f"  {m:12s} {ratio:6.2f}x max   (goal <= {goal:g}x) {'ok' if ok else 'MISSED'}")
    out.unlink(missing_ok=True)
    if failed:
        print("missed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
