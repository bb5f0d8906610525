#!/usr/bin/env python3
"""Writes Samples/tiny-transformer.safetensors: a small, deterministic transformer-shaped
checkpoint (float32 weights, layer norms, biases, an fp16 embedding copy and int64 position ids)
used by the README's demo command. Standard library only, so it runs anywhere."""
import json
import random
import struct
import sys

HIDDEN, MLP, VOCAB, LAYERS, POSITIONS = 64, 256, 256, 2, 64


def tensors():
    rng = random.Random(1234)

    def normal(shape, std):
        n = 1
        for d in shape:
            n *= d
        return [rng.gauss(0.0, std) for _ in range(n)]

    out = [("embed_tokens.weight", "F32", [VOCAB, HIDDEN], normal([VOCAB, HIDDEN], 0.02))]
    for i in range(LAYERS):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((p + "self_attn." + name + ".weight", "F32", [HIDDEN, HIDDEN], normal([HIDDEN, HIDDEN], 0.05)))
        out.append((p + "mlp.up_proj.weight", "F32", [MLP, HIDDEN], normal([MLP, HIDDEN], 0.05)))
        out.append((p + "mlp.up_proj.bias", "F32", [MLP], normal([MLP], 0.01)))
        out.append((p + "mlp.down_proj.weight", "F32", [HIDDEN, MLP], normal([HIDDEN, MLP], 0.05)))
        out.append((p + "mlp.down_proj.bias", "F32", [HIDDEN], normal([HIDDEN], 0.01)))
        out.append((p + "input_layernorm.weight", "F32", [HIDDEN], [1.0 + v for v in normal([HIDDEN], 0.1)]))
    out.append(("norm.weight", "F32", [HIDDEN], [1.0] * HIDDEN))
    out.append(("lm_head.weight", "F16", [VOCAB, HIDDEN], normal([VOCAB, HIDDEN], 0.02)))
    out.append(("position_ids", "I64", [1, POSITIONS], list(range(POSITIONS))))
    return out


def encode(dtype, values):
    fmt = {"F32": "<%df", "F16": "<%de", "I64": "<%dq"}[dtype]
    return struct.pack(fmt % len(values), *values)


def main(path):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, dtype, shape, values in tensors():
        data = encode(dtype, values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-transformer.safetensors")
