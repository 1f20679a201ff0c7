"""Chat templating, truncation, masks and the collated PreferenceBatch."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from raco_ds.data import (
    PreferenceCollator,
    PreferenceData,
    PreferencePair,
    RowRef,
    TokenizationConfig,
    get_preset,
    load_preference_data,
    render_pair,
    tokenize_preference_data,
    truncate_pair,
)
from raco_ds.models import load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def _data(pairs: list[PreferencePair], num_objectives: int = 2) -> PreferenceData:
    spec = get_preset("pku_saferlhf")
    assert spec.num_objectives == num_objectives
    return PreferenceData(spec, pairs, fingerprint="crafted")


def _pair(prompt: str, a: str, b: str, labels=(1, -1), objective=-1) -> PreferencePair:
    return PreferencePair(({"role": "user", "content": prompt},), a, b, labels, objective, RowRef("crafted", 1))


# ---- rendering -----------------------------------------------------------------------------------


def test_chat_template_rendering(tokenizer):
    prompt, a, b = render_pair(tokenizer, _pair("Hi?", "Hello.", "Go."))
    assert prompt == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert (a, b) == ("Hello.<|im_end|>\n", "Go.<|im_end|>\n")


def test_plain_fallback_rendering(plain_tokenizer):
    pair = PreferencePair(
        (
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Bye"},
        ),
        "Ciao",
        "No",
        (1, -1),
        -1,
        RowRef("crafted", 1),
    )
    prompt, a, b = render_pair(plain_tokenizer, pair)
    assert prompt == "System: Be kind.\nUser: Hi\nAssistant: Yo\nUser: Bye\nAssistant: "
    assert (a, b) == ("Ciao<|im_end|>", "No<|im_end|>")  # EOS closes the response
    with pytest.raises(ValueError, match="has no chat_template"):
        render_pair(plain_tokenizer, pair, use_chat_template=True)


# ---- truncation ----------------------------------------------------------------------------------


def test_truncation_rules():
    cfg = TokenizationConfig(max_length=10, max_prompt_length=4)
    p, a, b = list(range(100, 106)), list(range(200, 203)), list(range(300, 302))
    assert truncate_pair(p, a, b, cfg) == (p, a, b, False)  # 6 + 3 <= 10: untouched
    # long responses: the prompt is cut to max_prompt_length (its END), responses keep their START
    p2, a2, b2, cut = truncate_pair(p, list(range(200, 220)), [300], cfg)
    assert cut and p2 == [102, 103, 104, 105] and a2 == list(range(200, 206)) and b2 == [300]
    # long prompt only: the prompt gives up just what is needed
    p3, a3, b3, cut = truncate_pair(list(range(100, 120)), a, b, cfg)
    assert cut and p3 == list(range(113, 120)) and a3 == a and b3 == b
    # nothing is ever cut to nothing
    for prompt_len in (1, 5, 50):
        for response_len in (1, 9, 50):
            p4, a4, b4, _ = truncate_pair(list(range(prompt_len)), list(range(response_len)), [7], cfg)
            assert p4 and a4 and b4 and len(p4) + max(len(a4), len(b4)) <= 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_length=1), ">= 2"),
        (dict(max_length=8, max_prompt_length=8), r"\[1, max_length=8\)"),
        (dict(max_length=8, max_prompt_length=0), r"\[1, max_length"),
        (dict(overflow="wrap"), "overflow"),
    ],
)
def test_tokenization_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenizationConfig(**kwargs)


def test_overflow_policies(tokenizer):
    data = _data([_pair("short", "ok", "fine"), _pair("p " * 50, "long answer " * 40, "x")])
    for overflow, kept, truncated, skipped in (("truncate", 2, 1, 0), ("skip", 1, 0, 1)):
        ds = tokenize_preference_data(data, tokenizer, TokenizationConfig(max_length=32, overflow=overflow))
        assert (len(ds), ds.num_truncated, ds.num_skipped) == (kept, truncated, skipped)
        assert all(len(i.prompt_ids) + max(len(i.response_a_ids), len(i.response_b_ids)) <= 32 for i in ds.items)
    with pytest.raises(ValueError, match=r"crafted:1: pair is longer than max_length=32"):
        tokenize_preference_data(data, tokenizer, TokenizationConfig(max_length=32, overflow="error"))


def test_truncated_prompt_keeps_its_end_and_response_its_start(tokenizer):
    data = _data([_pair("word " * 60 + "FINAL QUESTION", "START " + "blah " * 60, "B")])
    item = tokenize_preference_data(data, tokenizer, TokenizationConfig(max_length=40, max_prompt_length=12))[0]
    assert len(item.prompt_ids) == 12 and len(item.response_a_ids) == 28 and item.truncated
    prompt_text, response_text, _ = render_pair(tokenizer, data.pairs[0])
    full_prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert item.prompt_ids.tolist() == full_prompt[-12:]
    assert tokenizer.decode(item.prompt_ids).endswith("ION<|im_end|>\n<|im_start|>assistant\n")
    assert item.response_a_ids.tolist() == tokenizer(response_text, add_special_tokens=False)["input_ids"][:28]
    assert tokenizer.decode(item.response_a_ids).startswith("START")
    assert tokenizer.decode(item.response_b_ids) == "B<|im_end|>\n"  # the short side is untouched


# ---- masks and the batch -------------------------------------------------------------------------


def test_collated_batch_layout_and_masks(tokenizer):
    pairs = [
        _pair("Q one?", "Answer A1.", "B1", (1, -1)),
        _pair("Question two is longer?", "A2", "Answer B2 long.", (-1, 0)),
    ]
    ds = tokenize_preference_data(_data(pairs), tokenizer, TokenizationConfig(max_length=64))
    batch = PreferenceCollator(ds.pad_token_id, ds.num_objectives, pad_to_multiple_of=8)([ds[0], ds[1]])
    assert batch.num_pairs == 2 and batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] % 8 == 0
    assert batch.labels.tolist() == [[1, -1], [-1, 0]] and batch.labels.dtype == torch.long
    assert batch.pair_index.tolist() == [0, 1] and batch.objective_of_pair.tolist() == [-1, -1]
    assert batch.reference_logps is None and batch.response_mask.dtype == torch.bool
    rows = [(ds[0], "a"), (ds[1], "a"), (ds[0], "b"), (ds[1], "b")]  # A of each pair, then B of each pair
    for r, (item, side) in enumerate(rows):
        response = item.response_a_ids if side == "a" else item.response_b_ids
        n_prompt, n = len(item.prompt_ids), len(item.prompt_ids) + len(response)
        assert batch.input_ids[r, :n].tolist() == np.concatenate([item.prompt_ids, response]).tolist()
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert batch.response_mask[r].tolist() == [False] * n_prompt + [True] * len(response) + [False] * (
            batch.input_ids.shape[1] - n
        )
        assert (batch.input_ids[r, n:] == ds.pad_token_id).all()
    text = tokenizer.decode(batch.input_ids[2][batch.response_mask[2]])
    assert text == "B1<|im_end|>\n"


def test_batch_to_and_reference_lookup(tokenizer):
    ds = tokenize_preference_data(_data([_pair("a", "b", "c"), _pair("d", "e", "f")]), tokenizer, TokenizationConfig())
    table = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    batch = PreferenceCollator(ds.pad_token_id, 2, reference_logps=table)([ds[1], ds[0]])
    assert batch.reference_logps.tolist() == [-3.0, -1.0, -4.0, -2.0]  # rows: A1, A0, B1, B0
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.input_ids, batch.input_ids)
    with pytest.raises(ValueError, match="expects 3 objectives"):
        PreferenceCollator(ds.pad_token_id, 3)([ds[0]])


def test_bundled_presets_tokenise_with_the_template(tokenizer):
    for preset, pairs in (("pku_saferlhf", 400), ("hh_rlhf", 999)):
        ds = tokenize_preference_data(
            load_preference_data(get_preset(preset)), tokenizer, TokenizationConfig(max_length=256)
        )
        assert len(ds) == pairs and ds.num_truncated > 0
        assert all(len(i.prompt_ids) and len(i.response_a_ids) and len(i.response_b_ids) for i in ds.items)
        assert [i.pair_index for i in ds.items] == list(range(pairs))


def test_fingerprint_tracks_tokenisation_settings(tokenizer):
    data = _data([_pair("a " * 20, "b " * 20, "c")])
    fingerprints = {
        tokenize_preference_data(data, tokenizer, cfg).fingerprint
        for cfg in (
            TokenizationConfig(max_length=16),
            TokenizationConfig(max_length=24),
            TokenizationConfig(max_length=24, use_chat_template=False),
        )
    }
    assert len(fingerprints) == 3
    again = tokenize_preference_data(data, tokenizer, TokenizationConfig(max_length=16)).fingerprint
    assert again in fingerprints
