#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets: small valid inputs of every format qconvert reads,
made with the formats' own Python libraries, one folder per target (see FuzzEntries.swift).

usage: make-fuzz-corpus.py OUTDIR"""
import io
import pathlib
import pickle
import shutil
import sys
import zipfile

import numpy as np
import torch
from safetensors.numpy import save as st_save

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "Tests" / "Interop"))
import make_onnx_models  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def arrays():
    r = np.random.default_rng(0)
    return [
        {"w": r.standard_normal((4, 3)).astype(np.float32), "b": np.arange(3, dtype=np.float32)},
        {"h": r.standard_normal((2, 2)).astype(np.float16), "i": np.arange(5, dtype=np.int64)},
        {"s": np.float32(1.5).reshape(()), "e": np.zeros((0, 4), np.float32), "u": np.arange(6, dtype=np.uint8).reshape(2, 3)},
        {"f": np.asfortranarray(r.standard_normal((3, 2))), "big": np.arange(4, dtype=">f4")},
    ]


def main(out):
    out = pathlib.Path(out)
    if out.exists():
        shutil.rmtree(out)
    dirs = {t: out / t for t in ["safetensors", "safetensors-header", "pickle", "zip", "npy", "npz", "pytorch", "onnx", "gguf", "policy", "compressed-tensors"]}
    for d in dirs.values():
        d.mkdir(parents=True)

    for k, a in enumerate(arrays()):
        le = {n: np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")) for n, v in a.items()}
        data = st_save(le, metadata={"format": "pt"} if k % 2 else None)
        (dirs["safetensors"] / f"st{k}.safetensors").write_bytes(data)
        (dirs["safetensors-header"] / f"st{k}.safetensors").write_bytes(data)
        for n, v in a.items():
            b = io.BytesIO()
            np.lib.format.write_array(b, v, version=(1, 0) if k < 2 else (2, 0))
            (dirs["npy"] / f"{k}-{n}.npy").write_bytes(b.getvalue())
        b = io.BytesIO()
        np.savez(b, **a)
        (dirs["npz"] / f"plain{k}.npz").write_bytes(b.getvalue())
        (dirs["zip"] / f"plain{k}.npz").write_bytes(b.getvalue())
        b = io.BytesIO()
        np.savez_compressed(b, **a)
        (dirs["npz"] / f"deflated{k}.npz").write_bytes(b.getvalue())
        (dirs["zip"] / f"deflated{k}.npz").write_bytes(b.getvalue())

        sd = {n: torch.from_numpy(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("="))) for n, v in a.items()}
        b = io.BytesIO()
        torch.save(sd, b)
        (dirs["pytorch"] / f"zip{k}.pt").write_bytes(b.getvalue())
        (dirs["zip"] / f"torch{k}.pt").write_bytes(b.getvalue())
        with zipfile.ZipFile(io.BytesIO(b.getvalue())) as z:
            pkl = [m for m in z.namelist() if m.endswith("data.pkl")][0]
            (dirs["pickle"] / f"torch{k}.pkl").write_bytes(z.read(pkl))
        b = io.BytesIO()
        torch.save(sd, b, _use_new_zipfile_serialization=False)
        (dirs["pytorch"] / f"legacy{k}.pt").write_bytes(b.getvalue())
    # views, tied storages and nesting
    base = torch.arange(12, dtype=torch.float32)
    b = io.BytesIO()
    torch.save({"model": {"a": base[2:8].view(2, 3), "t": base.view(3, 4).t(), "tied": base}, "step": 3}, b)
    (dirs["pytorch"] / "views.pt").write_bytes(b.getvalue())

    for proto in (2, 3, 4, 5):
        obj = {"a": [1, 2.5, "x", None, True], "b": (1, (2, 3)), "c": {"d": b"bytes"}, "e": list(range(20))}
        (dirs["pickle"] / f"plain{proto}.pkl").write_bytes(pickle.dumps(obj, protocol=proto))

    tmp = out / ".onnx-build"
    tmp.mkdir()
    for name in ["mlp", "gemm", "cnn", "constants_opset11", "if_subgraph", "shared", "fp16", "old_ir_inputs", "function_body", "mlp21"]:
        path = tmp / f"{name}.onnx"
        getattr(make_onnx_models, name)(str(path))
        data = path.read_bytes()
        if len(data) < 200_000:
            (dirs["onnx"] / path.name).write_bytes(data)
    shutil.rmtree(tmp)

    import gguf

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(7)
    for name, types in [("float", [Q.F32, Q.F16]), ("blocks", [Q.Q8_0, Q.Q4_0, Q.Q4_1]), ("five", [Q.Q5_0, Q.Q5_1])]:
        path = dirs["gguf"] / f"{name}.gguf"
        wr = gguf.GGUFWriter(str(path), "llama")
        wr.add_uint32("llama.block_count", 1)
        wr.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
        wr.add_array("test.nested", [[1, 2], [3]])
        for k, t in enumerate(types):
            x = rng.standard_normal((2, 64)).astype(np.float32)
            if t == Q.F32:
                wr.add_tensor(f"t{k}", x)
            elif t == Q.F16:
                wr.add_tensor(f"t{k}", x.astype(np.float16))
            else:
                q = gguf.quants.quantize(x, t)
                wr.add_tensor(f"t{k}", q, raw_shape=q.shape, raw_dtype=t)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()

    # K-quants: random blocks with finite float16 factors
    factors = {Q.Q2_K: (80, 82), Q.Q3_K: (108, None), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, None)}
    path = dirs["gguf"] / "kquants.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    for k, (t, offs) in enumerate(factors.items()):
        per, size = gguf.GGML_QUANT_SIZES[t]
        blocks = rng.integers(0, 256, size=(1, size), dtype=np.uint8)
        for off in offs:
            if off is not None:
                blocks[:, off:off + 2] = np.float16(0.01).reshape(1).view(np.uint8)
        wr.add_tensor(f"k{k}", blocks, raw_shape=blocks.shape, raw_dtype=t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()

    # compressed-tensors weights (the fuzz target's config.json: "re:.*a$" int4 affine groups of 32,
    # everything else int8 per channel, naive)
    from safetensors.numpy import save_file

    save_file({
        "a.weight_packed": rng.integers(-2**31, 2**31, size=(4, 8), dtype=np.int64).astype(np.int32),
        "a.weight_scale": np.full((4, 2), 0.01, np.float32),
        "a.weight_zero_point": rng.integers(-2**31, 2**31, size=(1, 2), dtype=np.int64).astype(np.int32),
        "a.weight_shape": np.array([4, 64], np.int64),
        "b.weight": rng.integers(-128, 128, size=(3, 5), dtype=np.int8),
        "b.weight_scale": np.full((3, 1), 0.5, np.float32),
        "c.bias": np.zeros(3, np.float32),
    }, str(dirs["compressed-tensors"] / "model.safetensors"))

    for p in [REPO / "Samples" / "policy.cfg", *sorted((REPO / "Samples" / "policies").glob("*.yaml"))]:
        shutil.copy(p, dirs["policy"] / p.name)
    (dirs["policy"] / "rules.yaml").write_text(
        'defaults:\n  dtype: int4\n  granularity: group\n  group_size: 32\nrules:\n'
        '  - match: "re:.*(q|k)_proj\\\\.weight"\n    dtype: int8\n  - match: "*.bias"\n    dtype: keep\n'
        '  - rank: ">= 3"\n    elements: "< 4096"\n    dtype: fp16\n')
    for t, d in dirs.items():
        print(f"{t}: {len(list(d.iterdir()))} seeds")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".cache/fuzz-corpus")
