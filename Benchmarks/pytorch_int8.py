#!/usr/bin/env python3
"""Benchmark: PyTorch archives. A ~400 MB state dict saved with torch.save (fixed seed), then, in the
same run and alternating:

  1. qconvert (default int8) to .pt  vs  a Python peer doing the same (torch.load, per-row symmetric
     int8 in torch, torch.save);
  2. qconvert pytorch_model.bin -> model.safetensors (--preset keep)  vs
     safetensors.torch.save_file(torch.load(...)).

Prints median wall time, peak RSS and the ratios against the goals (>= 3x faster, lower peak RSS).

    .venv/bin/python Benchmarks/pytorch_int8.py [--rounds 3] [--size-mb 400]
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


def generate(path, size_mb):
    import torch
    g = torch.Generator().manual_seed(0)
    hidden, mlp = 1024, 4096
    sd = {"model.embed_tokens.weight": torch.randn(8192, hidden, generator=g) * 0.02}
    total, i = sd["model.embed_tokens.weight"].numel() * 4, 0
    while total < size_mb * 1e6:
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = torch.randn(hidden, hidden, generator=g) * 0.05
        sd[p + "mlp.up_proj.weight"] = torch.randn(mlp, hidden, generator=g) * 0.05
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, mlp, generator=g) * 0.05
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        total = sum(t.numel() * 4 for t in sd.values())
        i += 1
    torch.save(sd, str(path) + ".part")
    os.rename(str(path) + ".part", path)


def peer_int8(src, dst):
    import torch
    sd = torch.load(src, weights_only=True)
    out = {}
    for k, x in sd.items():
        if x.is_floating_point() and x.dim() >= 2 and x.numel() >= 1024:
            scale = x.abs().amax(dim=1, keepdim=True) / 127
            scale[scale == 0] = 1
            out[k] = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
            out[k + "_scale"] = scale
        else:
            out[k] = x
    torch.save(out, dst)


def peer_safetensors(src, dst):
    import torch
    from safetensors.torch import save_file
    save_file(torch.load(src, weights_only=True), dst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=400)
    ap.add_argument("--qconvert", default=str(REPO / ".build/release/qconvert"))
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    ap.add_argument("--peer", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate:
        generate(pathlib.Path(a.generate), a.size_mb)
        return
    if a.peer:
        {"int8": peer_int8, "safetensors": peer_safetensors}[a.peer[0]](a.peer[1], a.peer[2])
        return
    WORK.mkdir(parents=True, exist_ok=True)
    src = WORK / f"pytorch_model-{a.size_mb}mb.bin"
    if not src.exists():
        subprocess.run([sys.executable, __file__, "--generate", str(src), "--size-mb", str(a.size_mb)], check=True)
    q_pt, p_pt, q_st, p_st = (WORK / n for n in ("q.pt", "p.pt", "q.safetensors", "p.safetensors"))
    runs = {
        "int8 .pt": {"qconvert": [a.qconvert, str(src), "-o", str(q_pt), "-q"],
                     "python peer": [sys.executable, __file__, "--peer", "int8", str(src), str(p_pt)]},
        "bin -> safetensors": {"qconvert": [a.qconvert, str(src), "-o", str(q_st), "--preset", "keep", "-q"],
                               "python peer": [sys.executable, __file__, "--peer", "safetensors", str(src), str(p_st)]},
    }
    for title, cmds in runs.items():
        results = alternate(cmds, a.rounds)
        med = report(f"{title}: input {src.stat().st_size / 1e6:.0f} MB, {a.rounds} rounds, medians", results)
        q, p = med["qconvert"], med["python peer"]
        print(f"  speed vs peer: {p[0] / q[0]:.1f}x faster (goal >= 3x); peak RSS {100 * q[1] / p[1]:.1f} % of the peer's (goal < 100 %)")
    for p in (q_pt, p_pt, q_st, p_st):
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
