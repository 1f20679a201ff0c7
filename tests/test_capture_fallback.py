"""The trainer's default capture on a model that one-pass capture gets wrong: it falls back to K passes.

Bloom with ``pretraining_tp=2, slow_but_exact=True`` applies its output projections as F.linear on
weight slices, outside the hooked module call: construction cannot see it, the first step's
self-check does. Under ``raco.capture=auto`` the run continues with K passes from that very step
(the same data, so it trains exactly like a K-pass run); ``raco.capture=onepass`` stops.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_runs import check, deterministic, metrics, run_python

COMMON = ["--preset", "tiny", "--max-steps", "2", "--logging.eval_every", "0", "--checkpointing.export", "false"]


@pytest.fixture(scope="module")
def bloom_tp(tmp_path_factory) -> Path:
    """A tiny Bloom folder (pretraining_tp=2, slow_but_exact) with the tiny models' tokenizer."""
    import torch
    import transformers as tf

    from raco_ds.tiny_models import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    config = tf.BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4, pretraining_tp=2,
                            slow_but_exact=True, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "bloom-tp2"
    tf.BloomForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_auto_falls_back_to_k_passes_and_trains_like_them(bloom_tp, tmp_path):
    auto = check(run_python(*COMMON, "--model", str(bloom_tp), "--output-dir", str(tmp_path / "auto")))
    log = auto.stdout
    assert "capture onepass" in log  # chosen at start-up: construction cannot see the sliced F.linear
    assert log.count("capture: K passes per step from here on") == 1
    assert "self_attention.dense.weight" in log and "mlp.dense_4h_to_h.weight" in log
    k_pass = check(run_python(*COMMON, "--model", str(bloom_tp), "--output-dir", str(tmp_path / "k"),
                              "--capture", "k_pass"))  # fmt: skip
    assert "self-check" not in k_pass.stdout
    fell_back, reference = metrics(tmp_path / "auto"), metrics(tmp_path / "k")
    for step in (1, 2):
        assert deterministic(fell_back[step]) == deterministic(reference[step]), step


def test_forced_onepass_stops_with_the_parameters_named(bloom_tp, tmp_path):
    result = run_python(*COMMON, "--model", str(bloom_tp), "--output-dir", str(tmp_path), "--capture", "onepass")
    assert result.returncode == 2, result.stderr[-3000:]
    text = result.stderr.strip().splitlines()[-1]
    assert text.startswith("error: raco.capture='onepass'") and "self_attention.dense.weight" in text
    assert "relative error" in text and "--capture auto or k_pass" in text
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()


def test_refused_model_falls_back_at_start_up_with_the_reason(tmp_path):
    """OPT's learned positions embed the attention mask, not ids: refused at construction, by name (ZeRO-2:
    the table is on the rank; under ZeRO-3 it is not, and the first step's check stops one-pass instead)."""
    import torch
    import transformers as tf

    from raco_ds.tiny_models import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    config = tf.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                          num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    tf.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    result = check(run_python(*COMMON, "--model", str(tmp_path / "opt"), "--output-dir", str(tmp_path / "run"),
                              "--max-steps", "1", "--ds_config", "ds_configs/zero2.json"))  # fmt: skip
    assert "one-pass capture unavailable" in result.stdout and "OPTLearnedPositionalEmbedding" in result.stdout
    assert "capture k_pass" in result.stdout
