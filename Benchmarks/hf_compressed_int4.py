#!/usr/bin/env python3
"""Benchmark: a Hugging Face folder to compressed-tensors int4 with groups of 128, data-free. qconvert
(`--preset w4g128`) against llm-compressor's one-shot `QuantizationModifier(scheme="W4A16")` without
calibration data, then `save_pretrained(save_compressed=True)`: the Python way of doing the same
conversion. Same model, same run. Prints median wall time, peak RSS and the issue's goal: at least 10x
faster at no more than 25 % of its peak RSS.

The model is a Llama-architecture folder with random weights (hidden 768, 12 layers, 400 MB float32;
every in_features a multiple of 128), made once into Benchmarks/work by transformers. llm-compressor
pins other versions of transformers and compressed-tensors than the tests, so it lives in its own
virtual environment, made once in .cache/bench-llmcompressor.

    .venv/bin/python Benchmarks/hf_compressed_int4.py [--rounds 3] [--streaming]

--streaming also compares qconvert's peak RSS on a 2.2 GB sharded folder (the same layers, 84 of them, in
500 MB shards) with the 400 MB folder's (goal: within 10 %).
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys

from common import alternate, report

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
LLMC_VENV = REPO / ".cache" / "bench-llmcompressor"
LLMC_REQUIREMENTS = ["torch==2.13.0+cpu", "llmcompressor==0.14.0.1"]


def model_folder(name="llama-400mb-hf", hidden=768, layers=12, intermediate=2048, shard="5GB"):
    folder = WORK / name
    if not (folder / "config.json").exists():
        # made in a child: a parent grown by torch would show its size as the measured commands' peak RSS
        # (Linux keeps the maximum across exec)
        subprocess.run([sys.executable, __file__, "--make", name, str(hidden), str(layers), str(intermediate), shard], check=True)
    return folder


def make_model(name, hidden, layers, intermediate, shard):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=4, vocab_size=32000,
                      tie_word_embeddings=True)
    part = WORK / (name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(part, max_shard_size=shard)
    part.rename(WORK / name)


def streaming(qconvert, rounds):
    """Peak RSS of qconvert on a sharded folder of more than 2 GB against the 400 MB folder."""
    small = model_folder()
    # the same layers, seven times as many of them: memory must not grow with the model's size
    big = model_folder("llama-2.2gb-hf", hidden=768, layers=84, intermediate=2048, shard="500MB")
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    cmds = {
        "400 MB": [qconvert, str(small), "-o", str(WORK / "stream-small"), "--preset", "w4g128", "-q"],
        "2.2 GB": [qconvert, str(big), "-o", str(WORK / "stream-big"), "--preset", "w4g128", "-q"],
    }
    med = report(f"streaming: qconvert --preset w4g128, {size / 1e9:.2f} GB in {len(list(big.glob('*.safetensors')))} shards against 400 MB in one file", alternate(cmds, rounds))
    print(f"  peak RSS of the sharded folder: {100 * med['2.2 GB'][1] / med['400 MB'][1] - 100:+.0f} % against the 400 MB folder's (goal within 10 %)")
    shutil.rmtree(WORK / "stream-small", ignore_errors=True)
    shutil.rmtree(WORK / "stream-big", ignore_errors=True)


def llmc_python():
    py = LLMC_VENV / "bin" / "python"
    if not py.exists() or subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode != 0:
        print("making the llm-compressor environment once in", LLMC_VENV)
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *LLMC_REQUIREMENTS], check=True)
    return str(py)


def llmc_child(src, dst):
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    model.save_pretrained(dst, save_compressed=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qconvert", default=str(REPO / ".build/release/qconvert"))
    ap.add_argument("--streaming", action="store_true", help="also: peak RSS on a 2.2 GB sharded folder")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:
        make_model(a.make[0], int(a.make[1]), int(a.make[2]), int(a.make[3]), a.make[4])
        return
    if a.child:
        llmc_child(*a.child)
        return
    if a.streaming:
        streaming(a.qconvert, a.rounds)
    src = model_folder()
    py = llmc_python()
    ours, theirs = WORK / "llama-qconvert-w4g128", WORK / "llama-llmc-w4a16"

    cmds = {
        "qconvert": [a.qconvert, str(src), "-o", str(ours), "--preset", "w4g128", "-q"],
        "llm-compressor": [py, __file__, "--child", str(src), str(theirs)],
    }
    results = alternate(cmds, a.rounds)  # each replaces its own output folder
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    med = report(f"{src.name} ({size / 1e6:.0f} MB float32) → compressed-tensors int4 group 128, {a.rounds} rounds, medians", results)
    q, l = med["qconvert"], med["llm-compressor"]
    print(f"  speed vs llm-compressor: {l[0] / q[0]:.1f}x (goal >= 10x); peak RSS {100 * q[1] / l[1]:.0f} % of its (goal <= 25 %)")
    for name, folder in (("qconvert", ours), ("llm-compressor", theirs)):
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        w = next(iter(qc["config_groups"].values()))["weights"]
        mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
        print(f"  {name}: {mb:.1f} MB of weights, {w['num_bits']}-bit {w['strategy']} {w['group_size']}, symmetric {w['symmetric']}")


if __name__ == "__main__":
    main()
