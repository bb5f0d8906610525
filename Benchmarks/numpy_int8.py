"""The Python peer of the safetensors benchmark: what a user would write with numpy and the
safetensors library to do qconvert's default (per-row symmetric int8 for float tensors of rank >= 2
with >= 1024 elements, scales beside the integers)."""
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def main(src, dst):
    with safe_open(src, "np") as f:
        metadata = f.metadata() or {}
    tensors = load_file(src)
    out = {}
    for name, x in tensors.items():
        if x.dtype.kind == "f" and x.ndim >= 2 and x.size >= 1024:
            x32 = x.astype(np.float32, copy=False)
            scale = np.abs(x32).max(axis=1, keepdims=True) / np.float32(127)
            scale[scale == 0] = 1
            out[name] = np.clip(np.round(x32 / scale), -127, 127).astype(np.int8)
            out[name + "_scale"] = scale.astype(np.float32)
        else:
            out[name] = x
    save_file(out, dst, metadata=metadata)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
