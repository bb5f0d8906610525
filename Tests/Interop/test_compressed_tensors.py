"""Hugging Face model folders written in the compressed-tensors layout: transformers (with the
compressed-tensors package) loads them as quantized models and runs them, compressed-tensors' own
decompression gives exactly the values of the numpy reference, and every other file of the folder
travels unchanged."""
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import reference
from conftest import QCONVERT, run

SENTENCES = [
    "The cat sits on the mat.",
    "A quantized model should answer like the float one.",
    "Paris is the capital of France.",
    "I like programming in Swift and in Python.",
    "The weather today is sunny with a light breeze from the west.",
    "Quarterly revenue rose by twelve percent.",
]


def tree_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small random BERT saved by transformers: in_features 64 and 96 (96 is ragged for groups of 64)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=120)
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # wider weights than the default init, outliers included
            p.copy_(torch.randn_like(p) * 0.2)
        model.encoder.layer[0].attention.self.query.weight[3, 5] = 4.0
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("travels with the model\n")
    return folder


def forward(folder, ids, dequantize=False):
    from transformers import AutoModel, CompressedTensorsConfig

    # transformers' default path refuses asymmetric per-channel/group checkpoints (compressed-tensors' own
    # too: checked in test_asymmetric_checkpoints_need_dequantize_in_transformers); dequantize=True loads them
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModel.from_pretrained(str(folder), **extra).eval()
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.float().numpy()


def decompress(tensors, module, group, fmt):
    """compressed-tensors' own decompression of one module."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    state = {k[len(module) + 1:]: torch.from_numpy(v.copy()) if not isinstance(v, torch.Tensor) else v for k, v in tensors.items() if k.startswith(module + ".")}
    out = BaseCompressor.load_from_registry(fmt).decompress(state, scheme)
    return out["weight"].float().numpy()


def torch_tensors(path):
    from safetensors.torch import load_file as load_torch

    return load_torch(str(path))


SCHEMES = [
    # (id, --set options, reference arguments, expected weights fields)
    ("int8-channel", ["dtype=int8"], dict(dtype="int8", mapping="scale", granularity="channel"), dict(num_bits=8, symmetric=True, strategy="channel")),
    ("uint8-affine-channel", ["dtype=uint8", "mapping=affine"], dict(dtype="uint8", mapping="affine", granularity="channel"), dict(num_bits=8, symmetric=False, strategy="channel")),
    ("int8-tensor", ["dtype=int8", "granularity=tensor"], dict(dtype="int8", mapping="scale", granularity="tensor"), dict(num_bits=8, symmetric=True, strategy="tensor")),
    ("int8-affine-tensor", ["dtype=int8", "mapping=affine", "granularity=tensor"], dict(dtype="int8", mapping="affine", granularity="tensor"), dict(num_bits=8, symmetric=False, strategy="tensor")),
    ("int4-full-group32", ["dtype=int4", "symmetric_range=full", "granularity=group", "group_size=32"], dict(dtype="int4", mapping="scale-full", granularity="group", group_size=32), dict(num_bits=4, symmetric=True, strategy="group", group_size=32)),
    ("int4-affine-group32", ["dtype=int4", "mapping=affine", "granularity=group", "group_size=32"], dict(dtype="int4", mapping="affine", granularity="group", group_size=32), dict(num_bits=4, symmetric=False, strategy="group", group_size=32)),
    ("uint4-channel", ["dtype=uint4", "granularity=channel"], dict(dtype="uint4", mapping="scale", granularity="channel"), dict(num_bits=4, symmetric=True, strategy="channel")),
    ("uint4-affine-channel", ["dtype=uint4", "mapping=affine"], dict(dtype="uint4", mapping="affine", granularity="channel"), dict(num_bits=4, symmetric=False, strategy="channel")),
    ("fp8-channel", ["dtype=fp8_e4m3"], dict(dtype="fp8_e4m3", mapping="scale", granularity="channel"), dict(num_bits=8, type="float", strategy="channel")),
]


@pytest.mark.parametrize("sets,ref,fields", [s[1:] for s in SCHEMES], ids=[s[0] for s in SCHEMES])
def test_every_scheme_decompresses_exactly_and_runs_in_transformers(tmp_path, tiny_bert, sets, ref, fields):
    before = tree_hashes(tiny_bert)
    out = tmp_path / "q"
    args = [tiny_bert, "-o", out, "-q", "--set", "min_elements=0"]
    for s in sets:
        args += ["--set", s]
    run(*args)
    assert tree_hashes(tiny_bert) == before  # the input is never changed
    # every other file travels unchanged
    after = tree_hashes(out)
    for name, h in before.items():
        if name not in ("model.safetensors", "config.json"):
            assert after[name] == h, name
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((tiny_bert / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    (name, group), = q["config_groups"].items()
    for k, v in fields.items():
        assert group["weights"][k] == v, (k, group["weights"])
    fmt = "float-quantized" if ref["dtype"].startswith("fp8") else "pack-quantized"
    assert group["format"] == fmt == q["format"]

    floats = load_file(str(tiny_bert / "model.safetensors"))
    tensors = torch_tensors(out / "model.safetensors")
    modules = sorted(k[: -len(".weight")] for k, v in floats.items() if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k)
    assert len(modules) == 13  # 6 per layer and the pooler
    for m in modules:
        assert m + ".weight_packed" in tensors or fmt == "float-quantized", m
        x = floats[m + ".weight"]
        qv, scale, zp = reference.quantize(x, **ref)
        if ref["dtype"].startswith("fp8"):
            want = (reference.fp8_values("fp8_e4m3")[qv].astype(np.float32) * scale.reshape(-1, 1)).astype(np.float32)
        else:
            want = reference.dequantize(qv, scale, zp, x.shape, ref["granularity"], 0, ref.get("group_size", 128))
        got = decompress(tensors, m, group, fmt)
        np.testing.assert_array_equal(got, want, err_msg=m)
    # qconvert reads the folder back as the float model it stands for: the same values
    run(out, "-o", tmp_path / "deq", "--preset", "keep", "-q")
    back = load_file(str(tmp_path / "deq" / "model.safetensors"))
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    for m in modules:
        np.testing.assert_array_equal(back[m + ".weight"], decompress(tensors, m, group, fmt), err_msg=m)
    # embeddings and norms stay float
    assert tensors["embeddings.word_embeddings.weight"].dtype == torch.float32
    # transformers loads the folder as a quantized model and runs it
    ids = torch.tensor([[1, 5, 9, 44, 100, 3, 7]])
    asymmetric = fields.get("symmetric") is False and fields["strategy"] != "tensor"
    ref_out, got_out = forward(tiny_bert, ids), forward(out, ids, dequantize=asymmetric)
    cos = (ref_out * got_out).sum(-1) / np.linalg.norm(ref_out, axis=-1) / np.linalg.norm(got_out, axis=-1)
    assert cos.min() > (0.99 if fields["num_bits"] == 8 else 0.9), cos


def test_ragged_groups_go_to_ignore_with_a_warning_or_fail_with_strict(tmp_path, tiny_bert):
    out = tmp_path / "q"
    p = run(tiny_bert, "-o", out, "--preset", "w4g128", "--set", "group_size=64", "--set", "min_elements=0")
    assert "in_features 96 is not a multiple of the group size 64" in p.stdout
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["ignore"] == ["re:(.*\\.)?encoder\\.layer\\.\\d+\\.output\\.dense$"]
    tensors = torch_tensors(out / "model.safetensors")
    assert tensors["encoder.layer.0.output.dense.weight"].dtype == torch.float32
    assert "encoder.layer.0.intermediate.dense.weight_packed" in tensors
    forward(out, torch.tensor([[1, 2, 3]]))  # runs: the ragged layers are float
    plan = subprocess.run([QCONVERT, "plan", str(tiny_bert), "--preset", "w4g128", "--set", "group_size=64", "--set", "min_elements=0"], capture_output=True, text=True)
    assert plan.returncode == 0 and "not a multiple of the group size 64" in plan.stdout
    strict = subprocess.run([QCONVERT, str(tiny_bert), "-o", str(tmp_path / "s"), "--preset", "w4g128", "--set", "group_size=64", "--set", "min_elements=0", "--strict"], capture_output=True, text=True)
    assert strict.returncode == 64, strict.stderr
    assert "encoder.layer.0.output.dense.weight" in strict.stderr and len(strict.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_scales_take_the_models_bfloat16(tmp_path, tiny_bert):
    from transformers import AutoModel

    bf = tmp_path / "bf16"
    AutoModel.from_pretrained(str(tiny_bert), dtype=torch.bfloat16).save_pretrained(bf)
    out = tmp_path / "q"
    run(bf, "-o", out, "-q", "--set", "min_elements=0")
    tensors = torch_tensors(out / "model.safetensors")
    assert tensors["encoder.layer.0.attention.self.query.weight_scale"].dtype == torch.bfloat16
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    x = torch_tensors(bf / "model.safetensors")["encoder.layer.0.attention.self.query.weight"].float().numpy()
    qv, scale, zp = reference.quantize(x, "int8", scale_dtype="bf16")
    want = reference.dequantize(qv, scale, zp, x.shape, "channel", 0, 128)
    got = decompress(tensors, "encoder.layer.0.attention.self.query", group, "pack-quantized")
    np.testing.assert_array_equal(got, (reference.bf16_bits(want).astype(np.uint32) << 16).view(np.float32))
    forward(out, torch.tensor([[1, 2, 3]]))


def test_layout_choice(tmp_path, tiny_bert):
    # a single file beside config.json keeps qconvert's layout, with the hazard said in the summary
    p = run(tiny_bert / "model.safetensors", "-o", tmp_path / "one.safetensors", "--set", "min_elements=0")
    assert "note: this is qconvert's own layout" in p.stdout
    assert "encoder.layer.0.attention.self.query.weight_scale" in load_file(str(tmp_path / "one.safetensors"))
    # --layout qconvert on a folder: qconvert's names, the same note
    p = run(tiny_bert, "-o", tmp_path / "own", "--layout", "qconvert", "--set", "min_elements=0", "--report", tmp_path / "r.json")
    assert "note: this is qconvert's own layout" in p.stdout
    assert json.loads((tmp_path / "r.json").read_text())["notes"][0].startswith("this is qconvert's own layout")
    assert "quantization_config" not in json.loads((tmp_path / "own" / "config.json").read_text())
    # the policy file says it too
    pol = tmp_path / "p.yaml"
    pol.write_text("layout: compressed-tensors\ndefaults:\n  min_elements: 0\n")
    run(tiny_bert / "model.safetensors", "-o", tmp_path / "ct", "--policy", pol)
    assert "quantization_config" in json.loads((tmp_path / "ct" / "config.json").read_text())
    # refusals, one line each, nothing written
    for args, words in [
        ([tiny_bert, "-o", tmp_path / "x.safetensors", "--layout", "compressed-tensors"], "give a folder as the output"),
        ([tiny_bert, "-o", tmp_path / "x.pt", "--layout", "compressed-tensors"], "is a safetensors layout"),
        ([tmp_path / "one.safetensors", "-o", tmp_path / "x", "--layout", "compressed-tensors"], "needs a Hugging Face model"),
    ]:
        r = subprocess.run([QCONVERT, *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 64 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.pt").exists()


def embeddings(folder, texts):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    e = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(e, dim=-1).numpy()


@pytest.mark.parametrize(
    "args,floor",
    [(["--preset", "int8"], 0.999), (["--preset", "w4g128"], 0.93), (["--set", "dtype=fp8_e4m3"], 0.99)],
    ids=["int8-channel", "w4g128", "fp8"],
)
def test_minilm_sentence_embeddings_in_transformers(tmp_path, minilm_folder, args, floor):
    out = tmp_path / "q"
    run(minilm_folder, "-o", out, "-q", *args)
    ref, got = embeddings(minilm_folder, SENTENCES), embeddings(out, SENTENCES)
    cos = (ref * got).sum(-1)
    assert cos.min() >= floor, cos
    # the tokenizer and sentence-transformers files came along
    for name in ["tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"]:
        assert (out / name).read_bytes() == (minilm_folder / name).read_bytes()


def test_asymmetric_checkpoints_need_dequantize_in_transformers(tmp_path, tiny_bert):
    """The note qconvert prints is true: transformers' default path refuses an asymmetric group checkpoint
    that compressed-tensors itself wrote, and loads it with dequantize=True."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)}))
    for _, mod in model.named_modules():
        if hasattr(mod, "weight_scale"):
            w = mod.weight.data.reshape(mod.weight.shape[0], -1, 32)
            s, z = calculate_qparams(w.amin(-1), w.amax(-1), args)
            mod.weight_scale.data, mod.weight_zero_point.data = s.to(mod.weight_scale.dtype), z.to(mod.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "lib")
    compressor.update_config(str(tmp_path / "lib"))
    with pytest.raises(RuntimeError, match="mismatch"):
        forward(tmp_path / "lib", torch.tensor([[1, 2]]))
    forward(tmp_path / "lib", torch.tensor([[1, 2]]), dequantize=True)
    p = run(tiny_bert, "-o", tmp_path / "q", "--set", "dtype=int4", "--set", "mapping=affine", "--set", "granularity=group", "--set", "group_size=32", "--set", "min_elements=0")
    assert "note: asymmetric per-channel or per-group layers" in p.stdout


PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Books became "
    "cheaper and more common, literacy spread across Europe, and ideas travelled faster than ever before. "
    "Within fifty years, printing shops had opened in more than two hundred cities, and millions of volumes "
    "had been produced, from bibles and grammars to calendars, pamphlets and scientific treatises."
)


def perplexity(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss))


def test_smollm2_perplexity_in_transformers(tmp_path, smollm2_hf):
    base = perplexity(smollm2_hf)
    run(smollm2_hf, "-o", tmp_path / "int8", "-q", "--preset", "int8")
    p8 = perplexity(tmp_path / "int8")
    # hidden size 576 is not a multiple of 128: groups of 64
    run(smollm2_hf, "-o", tmp_path / "int4", "-q", "--preset", "w4g128", "--set", "group_size=64")
    p4 = perplexity(tmp_path / "int4")
    print(f"SmolLM2-135M perplexity: float {base:.3f}, int8 per channel {p8:.3f}, int4 group 64 {p4:.3f}")
    assert abs(p8 - base) <= 0.01 * base, (base, p8)
    assert p4 <= 1.5 * base, (base, p4)
    cfg = json.loads((tmp_path / "int4" / "config.json").read_text())
    (group,) = cfg["quantization_config"]["config_groups"].values()
    # the tied embedding (lm_head) stays float; every projection of every layer is quantized
    tensors = torch_tensors(tmp_path / "int4" / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert sum(k.endswith(".weight_packed") for k in tensors) == 30 * 7
    assert group["weights"]["group_size"] == 64
    for name in ["tokenizer.json", "chat_template.jinja", "generation_config.json"]:
        assert (tmp_path / "int4" / name).read_bytes() == (smollm2_hf / name).read_bytes()


def library_checkpoint(folder, out, args, fmt=None):
    """tiny_bert quantized and saved by compressed-tensors' own compressor (min/max ranges)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["pooler.dense"]))
    for _, mod in model.named_modules():
        if hasattr(mod, "weight_scale"):
            w = mod.weight.data
            if args.strategy == "group":
                lo, hi = w.reshape(w.shape[0], -1, args.group_size).amin(-1), w.reshape(w.shape[0], -1, args.group_size).amax(-1)
            elif args.strategy == "channel":
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            else:
                lo, hi = w.min().reshape(1), w.max().reshape(1)
            s, z = calculate_qparams(lo, hi, args)
            mod.weight_scale.data = s.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data = z.to(mod.weight_zero_point.dtype).reshape(mod.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return json.loads((out / "config.json").read_text())["quantization_config"]


LIBRARY = [
    ("int4-asym-group32", dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)),
    ("int8-sym-channel", dict(num_bits=8, type="int", symmetric=True, strategy="channel")),
    ("int8-asym-tensor", dict(num_bits=8, type="int", symmetric=False, strategy="tensor")),
    ("fp8-channel", dict(num_bits=8, type="float", symmetric=True, strategy="channel")),
]


@pytest.mark.parametrize("args", [a for _, a in LIBRARY], ids=[i for i, _ in LIBRARY])
def test_checkpoints_written_by_compressed_tensors_are_read(tmp_path, tiny_bert, args):
    from compressed_tensors.quantization import QuantizationArgs

    qa = QuantizationArgs(**args)
    lib = tmp_path / "lib"
    qc = library_checkpoint(tiny_bert, lib, qa, fmt="float-quantized" if qa.type == "float" else None)
    (group,) = qc["config_groups"].values()
    fmt = group["format"]
    tensors = torch_tensors(lib / "model.safetensors")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    assert len(modules) == 12
    # dequantize gives exactly compressed-tensors' own decompression
    p = run("dequantize", lib, "-o", tmp_path / "deq.safetensors")
    assert "12 tensors restored to float" in p.stdout
    deq = load_file(str(tmp_path / "deq.safetensors"))
    for m in modules:
        np.testing.assert_array_equal(deq[m + ".weight"], decompress(tensors, m, group, fmt), err_msg=m)
        assert m + ".weight_scale" not in deq and m + ".weight_packed" not in deq
    # inspect, diff and conversion to the other formats read it
    assert "12 tensors are stored quantized (compressed-tensors)" in run("inspect", lib).stdout
    d = json.loads(run("diff", tiny_bert, lib, "--json").stdout)
    assert 0.9 < d["model"]["cosine"] < 1
    run(lib, "-o", tmp_path / "o.npz", "--preset", "keep", "-q")
    got = np.load(tmp_path / "o.npz", allow_pickle=False)
    np.testing.assert_array_equal(got[modules[0] + ".weight"], deq[modules[0] + ".weight"])
    run(lib, "-o", tmp_path / "o.pt", "-q")
    assert modules[0] + ".weight_scale" in torch.load(tmp_path / "o.pt", weights_only=True)
    # and back to compressed-tensors at another scheme: transformers runs it
    run(lib, "-o", tmp_path / "again", "--preset", "w4g128", "--set", "group_size=32", "--set", "min_elements=0", "-q")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert next(iter(cfg["config_groups"].values()))["weights"]["num_bits"] == 4
    forward(tmp_path / "again", torch.tensor([[1, 2, 3]]))


def test_a_lying_compressed_tensors_checkpoint_is_refused_in_one_line(tmp_path, tiny_bert):
    from safetensors.torch import save_file

    out = tmp_path / "q"
    run(tiny_bert, "-o", out, "--preset", "w4g128", "--set", "group_size=32", "--set", "min_elements=0", "-q")
    tensors = torch_tensors(out / "model.safetensors")
    cases = {
        "shape": ("encoder.layer.0.attention.self.query.weight_shape", torch.tensor([64, 4096])),
        "scale": ("encoder.layer.0.attention.self.query.weight_scale", torch.ones(64, 3)),
        "packed": ("encoder.layer.0.attention.self.query.weight_packed", torch.zeros(64, 3, dtype=torch.int32)),
        # found by the fuzzer: in_features × bits overflowed
        "huge": ("encoder.layer.0.attention.self.query.weight_shape", torch.tensor([64, 2**62])),
    }
    for what, (name, value) in cases.items():
        bad = tmp_path / what
        shutil.copytree(out, bad)
        save_file({**tensors, name: value}, str(bad / "model.safetensors"))
        r = subprocess.run([QCONVERT, "dequantize", str(bad), "-o", str(tmp_path / (what + ".safetensors"))], capture_output=True, text=True)
        assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1 and name.rsplit(".", 1)[0] in r.stderr, (what, r.stderr)
        assert not (tmp_path / (what + ".safetensors")).exists()


def test_a_pytorch_model_bin_folder_becomes_a_safetensors_model_folder(tmp_path, tiny_bert):
    folder = tmp_path / "bin"
    shutil.copytree(tiny_bert, folder)
    state = torch_tensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    run(folder, "-o", tmp_path / "q", "-q", "--set", "min_elements=0")
    run(tiny_bert, "-o", tmp_path / "ref", "-q", "--set", "min_elements=0")
    assert not (tmp_path / "q" / "pytorch_model.bin").exists()
    got, want = torch_tensors(tmp_path / "q" / "model.safetensors"), torch_tensors(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert json.loads((tmp_path / "q" / "config.json").read_text()) == json.loads((tmp_path / "ref" / "config.json").read_text())
    forward(tmp_path / "q", torch.tensor([[1, 2, 3]]))


def test_a_broken_config_json_only_stops_a_folder_input(tmp_path):
    """A single .safetensors file beside an unrelated, unreadable config.json is read on its own; a
    model folder whose config.json is broken is refused in one line."""
    from safetensors.numpy import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w.weight": np.ones((64, 64), np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{not json")
    run(folder / "model.safetensors", "-o", tmp_path / "one.safetensors", "-q")
    r = subprocess.run([QCONVERT, str(folder), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 3 and "config.json is not valid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_config_target_cannot_make_reading_take_exponential_time(tmp_path):
    """Targets are regular expressions from the file: they are matched in linear time, as policy
    patterns are. A backtracking matcher spent 0.6 s on each of these modules (its time limit)."""
    import time

    from safetensors.numpy import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    tensors = {}
    for k in range(40):
        name = "a" * 28 + f"!{k}"
        tensors |= {f"{name}.weight_packed": np.zeros((4, 1), np.int32), f"{name}.weight_scale": np.ones((4, 1), np.float32),
                    f"{name}.weight_shape": np.array([4, 8], np.int64)}
    save_file(tensors, str(folder / "model.safetensors"))
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
    cfg = {"architectures": ["X"], "quantization_config": {"quant_method": "compressed-tensors", "quantization_status": "compressed",
           "config_groups": {"g": {"targets": ["re:(a+)+b"], "weights": weights}, "h": {"targets": ["re:(a|aa)+!"], "weights": weights}}}}
    (folder / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    r = subprocess.run([QCONVERT, "inspect", str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "40 tensors are stored quantized" in r.stdout, r.stderr
    assert time.perf_counter() - start < 5
