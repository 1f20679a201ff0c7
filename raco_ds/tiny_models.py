"""Tiny causal LMs for tests and the ``tiny`` preset: small configs and a locally trained tokenizer.

Nothing is downloaded. The tokenizer is a byte-level BPE (vocabulary
:data:`TINY_VOCAB_SIZE`) trained in about a second on the bundled preference
data, with ChatML special tokens and a ChatML chat template, so the same code
paths as a real chat model run (template, EOS, padding). The model is a
randomly initialised (seeded) Llama / Qwen2 / Gemma-style config of ~0.1M
parameters. :func:`ensure_tiny_model` saves both once under the cache root
(atomically) so every test and rank loads the identical model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from raco_ds.diskcache import atomic_directory, cache_root

__all__ = [
    "CHATML_TEMPLATE",
    "TINY_FAMILIES",
    "TINY_VOCAB_SIZE",
    "ensure_tiny_model",
    "tiny_config",
    "train_tiny_tokenizer",
]

Family = Literal["llama", "qwen2", "gemma"]
TINY_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "gemma")
"""Architectures :func:`tiny_config` can build."""
TINY_VOCAB_SIZE = 1024
"""Vocabulary of the tiny tokenizer (256 bytes + specials + merges)."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The ChatML template (the one SmolLM2 and Qwen2 use), set on the tiny tokenizer."""

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# Bump when the tokenizer or model recipe changes, so stale cache entries are not reused.
_RECIPE_VERSION = 1


def _bundled_texts() -> list[str]:
    """Every string value of every bundled data row: the tokenizer's training corpus."""
    from raco_ds.data.objectives import bundled_data_dir

    texts: list[str] = []
    for path in sorted(bundled_data_dir().glob("*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
    if not texts:
        raise FileNotFoundError(f"no bundled *.jsonl data under {bundled_data_dir()} to train the tiny tokenizer on")
    return texts


def train_tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = TINY_VOCAB_SIZE) -> Any:
    """Train a byte-level BPE tokenizer with ChatML specials and template (default corpus: bundled data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts if texts is not None else _bundled_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


def tiny_config(
    family: Family = "llama",
    *,
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Any:
    """A tiny transformers config of ``family`` (Llama untied by default; Qwen2 and Gemma tied, as upstream).

    >>> tiny_config("gemma").tie_word_embeddings
    True
    """
    from transformers import GemmaConfig, LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    if family == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=bool(tie_word_embeddings))
    elif family == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=tie_word_embeddings is not False)
    elif family == "gemma":
        config = GemmaConfig(
            **common, head_dim=hidden_size // num_heads, tie_word_embeddings=tie_word_embeddings is not False
        )
    else:
        raise ValueError(f"unknown tiny model family {family!r}; use one of {TINY_FAMILIES}")
    return config


def ensure_tiny_model(family: Family = "llama", seed: int = 0) -> Path:
    """Return the cached folder of the tiny ``family`` model + tokenizer, building it on first use (~2 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    final = cache_root() / f"tiny-{family}-seed{seed}-v{_RECIPE_VERSION}"
    if (final / "config.json").is_file():
        return final
    with atomic_directory(final) as tmp:
        tokenizer = train_tiny_tokenizer()
        config = tiny_config(
            family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final
