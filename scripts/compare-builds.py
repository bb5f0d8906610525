#!/usr/bin/env python3
"""Before/after check for refactors that must not change outputs: converts every sample with every
sample policy and preset into every output format with two qconvert binaries, and compares the tensor
bytes each output holds, read by the format's own library (safetensors, numpy, torch, onnx).

    .venv/bin/python scripts/compare-builds.py OLD_QCONVERT NEW_QCONVERT

Prints one line per conversion and exits 1 when any tensor differs. Metadata documents are not
compared (their shape may change with a version bump)."""
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "Tests", "Interop"))


def tensors(path):
    if path.endswith(".safetensors"):
        import json
        import struct

        data = open(path, "rb").read()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        base = 8 + n
        # dtype and shape ride along as a prefix, so that they are compared with the bytes
        return {
            k: np.frombuffer(json.dumps([v["dtype"], v["shape"]]).encode() + data[base + v["data_offsets"][0] : base + v["data_offsets"][1]], np.uint8)
            for k, v in header.items()
        }
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if not k.startswith("qconvert.")}
    if path.endswith(".pt"):
        import torch

        d = torch.load(path, weights_only=True)
        return {k: v.view(torch.uint8).numpy() if v.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) else v.numpy() for k, v in d.items()}
    if path.endswith(".onnx"):
        import onnx
        from onnx import numpy_helper

        m = onnx.load(path)
        out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        out["(graph)"] = np.frombuffer(m.graph.SerializeToString(deterministic=True), np.uint8)
        return out
    raise ValueError(path)


def main(old, new):
    import make_onnx_models

    work = tempfile.mkdtemp(prefix="qconvert-compare-")
    inputs = [os.path.join(ROOT, "Samples", "tiny-transformer.safetensors")]
    for name in ("mlp", "gemm", "cnn", "shared", "fp16"):
        inputs.append(os.path.join(work, name + ".onnx"))
        getattr(make_onnx_models, name)(inputs[-1])
    policies = [["--policy", os.path.join(ROOT, "Samples", "policy.cfg")]]
    policies += [["--policy", os.path.join(ROOT, "Samples", "policies", p)] for p in sorted(os.listdir(os.path.join(ROOT, "Samples", "policies")))]
    policies += [["--preset", p] for p in ("int8", "w4g128", "fp8", "fp16")]
    policies += [["--preset", p, "--onnx-form", f] for p in ("int8", "w4g128") for f in ("qdq", "dynamic", "matmulnbits")]
    bad = 0
    for src in inputs:
        exts = [".safetensors", ".npz", ".pt"] + ([".onnx"] if src.endswith(".onnx") else [])
        for pol in policies:
            for ext in exts:
                if "--onnx-form" in pol and ext != ".onnx":
                    continue
                label = f"{os.path.basename(src)} {' '.join(os.path.basename(x) for x in pol)} → {ext}"
                outs = []
                for tag, binary in (("old", old), ("new", new)):
                    o = os.path.join(work, f"{tag}{ext}")
                    r = subprocess.run([binary, src, "-o", o, "-q", *pol], capture_output=True, text=True)
                    outs.append((r.returncode, o, r.stderr.strip()))
                if outs[0][0] != outs[1][0]:
                    print(f"DIFFERENT exit codes {outs[0][0]} / {outs[1][0]}: {label}\n  {outs[0][2]}\n  {outs[1][2]}")
                    bad += 1
                    continue
                if outs[0][0] != 0:
                    print(f"same refusal ({outs[0][0]}): {label}")
                    continue
                a, b = tensors(outs[0][1]), tensors(outs[1][1])
                diff = [k for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
                if diff:
                    bad += 1
                    print(f"DIFFERENT tensors {diff[:5]}: {label}")
                else:
                    print(f"identical ({len(a)} tensors): {label}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
