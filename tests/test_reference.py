"""response_logps and the reference log-probs: cache, rank split, frozen reference."""

from __future__ import annotations

import os

import pytest
import torch

import raco_ds.data.reference as reference_module
from raco_ds.data import (
    FrozenReference,
    PreferenceCollator,
    PreferenceData,
    TokenizationConfig,
    compute_reference_logps,
    get_preset,
    load_preference_data,
    precompute_reference_logps,
    reference_cache_key,
    reference_logps_of_batch,
    tokenize_preference_data,
)
from raco_ds.logprobs import response_logps
from raco_ds.models import load_model, load_tokenizer, model_identity

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI box is shared: one thread is faster than two contended ones for this tiny model.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _naive(logits, input_ids, mask):
    logps = torch.log_softmax(logits.double(), dim=-1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logps * mask[:, 1:]).sum(1), mask[:, 1:].sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_response_logps_matches_log_softmax(dtype, chunk):
    torch.manual_seed(0)
    logits = (torch.randn(4, 9, 17) * 3).to(dtype).requires_grad_()
    input_ids = torch.randint(0, 17, (4, 9))
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[0, 3:7] = mask[1, 1:] = mask[2, 8] = True  # row 3 scores nothing
    mask[3, 0] = True  # position 0 has no predecessor: never scored
    sums, counts = response_logps(logits, input_ids, mask, chunk=chunk)
    want_sums, want_counts = _naive(logits.detach(), input_ids, mask)
    assert counts.tolist() == [4, 8, 1, 0] and torch.equal(counts, want_counts.long())
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(sums.sum(), logits)
    leaf = logits.detach().double().requires_grad_()
    (want_grad,) = torch.autograd.grad(_naive(leaf, input_ids, mask)[0].sum(), leaf)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_response_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected logits \(R, T, V\)"):
        response_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny"), load_tokenizer("tiny")


@pytest.fixture(scope="module")
def small_dataset(tiny):
    data = load_preference_data(get_preset("pku_saferlhf"))
    data = PreferenceData(data.spec, data.pairs[:11], fingerprint=data.fingerprint + ":first11")
    return tokenize_preference_data(data, tiny[1], TokenizationConfig(max_length=64))


def _direct(model, dataset):
    """Reference log-probs of every pair from one plain forward over one batch."""
    batch = PreferenceCollator(dataset.pad_token_id, dataset.num_objectives)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = response_logps(logits, batch.input_ids, batch.response_mask)[0]
    return torch.stack([rows[: batch.num_pairs], rows[batch.num_pairs :]], dim=1)


def test_cached_reference_equals_a_direct_forward(tiny, small_dataset, tmp_path, monkeypatch):
    model, _ = tiny
    identity = model_identity("tiny")
    table = precompute_reference_logps(model, small_dataset, identity, batch_size=4, cache_dir=tmp_path)
    torch.testing.assert_close(table, _direct(model, small_dataset).float(), rtol=1e-5, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == [f"{reference_cache_key(identity, small_dataset)}.pt"]

    def must_not_compute(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(reference_module, "compute_reference_logps", must_not_compute)
    again = precompute_reference_logps(model, small_dataset, identity, cache_dir=tmp_path)
    assert torch.equal(again, table)
    # a different model identity is a different entry (so it is computed, here: refused)
    with pytest.raises(AssertionError, match="cache should have been used"):
        precompute_reference_logps(model, small_dataset, identity + "x", cache_dir=tmp_path)


def test_corrupt_cache_entry_is_recomputed(tiny, small_dataset, tmp_path):
    model, _ = tiny
    path = tmp_path / f"{reference_cache_key('id', small_dataset)}.pt"
    path.write_bytes(b"not a tensor")
    table = precompute_reference_logps(model, small_dataset, "id", batch_size=8, cache_dir=tmp_path)
    assert torch.isfinite(table).all() and torch.equal(torch.load(path), table)


def test_simulated_ranks_split_the_work_and_merge_to_the_full_table(tiny, small_dataset):
    model, _ = tiny
    full = compute_reference_logps(model, small_dataset, batch_size=4)
    shares = [compute_reference_logps(model, small_dataset, batch_size=2, rank=r, world_size=2) for r in range(2)]
    owned = [~torch.isnan(s[:, 0]) for s in shares]
    assert (
        owned[0].sum() == 6 and owned[1].sum() == 5 and not (owned[0] & owned[1]).any() and (owned[0] | owned[1]).all()
    )
    merged = torch.where(owned[0][:, None], shares[0], shares[1])
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-4)


def test_frozen_reference_fills_batches(tiny, small_dataset):
    model, _ = tiny
    table = compute_reference_logps(model, small_dataset, batch_size=4)
    frozen = FrozenReference(load_model("tiny"))
    assert not any(p.requires_grad for p in frozen.model.parameters())
    batch = PreferenceCollator(small_dataset.pad_token_id, 2)([small_dataset[3], small_dataset[7]])
    filled = frozen.fill(batch).reference_logps
    torch.testing.assert_close(filled, torch.cat([table[[3, 7], 0], table[[3, 7], 1]]), rtol=1e-5, atol=1e-4)


def _two_rank_body(rank: int, world_size: int, cache_dir: str) -> torch.Tensor:
    import torch as _torch

    model, tokenizer = load_model("tiny"), load_tokenizer("tiny")
    data = load_preference_data(get_preset("pku_saferlhf"))
    data = PreferenceData(data.spec, data.pairs[:11], fingerprint=data.fingerprint + ":first11")
    dataset = tokenize_preference_data(data, tokenizer, TokenizationConfig(max_length=64))
    table = precompute_reference_logps(model, dataset, model_identity("tiny"), batch_size=2, cache_dir=cache_dir)
    assert _torch.isfinite(table).all()
    return table


@pytest.mark.slow
def test_two_gloo_ranks_compute_share_gather_and_cache(tiny, small_dataset, tmp_path):
    from multirank import run_ranks

    tables = run_ranks(_two_rank_body, 2, str(tmp_path))
    torch.testing.assert_close(tables[0], tables[1], rtol=0, atol=0)
    torch.testing.assert_close(tables[0], _direct(tiny[0], small_dataset).float(), rtol=1e-5, atol=1e-4)
    assert len(list(tmp_path.glob("*.pt"))) == 1


def _engine_body(rank: int, world_size: int) -> torch.Tensor:
    from raco_ds.data import build_reference_engine

    tokenizer = load_tokenizer("tiny")
    data = load_preference_data(get_preset("pku_saferlhf"))
    data = PreferenceData(data.spec, data.pairs[:4], fingerprint="first4")
    dataset = tokenize_preference_data(data, tokenizer, TokenizationConfig(max_length=48))
    reference = build_reference_engine(load_model("tiny"), {"train_micro_batch_size_per_gpu": 2})
    batch = PreferenceCollator(dataset.pad_token_id, 2)([dataset[0], dataset[1 + rank]])
    return reference(batch)


@pytest.mark.slow
def test_zero3_reference_engine_matches_the_plain_model(tiny, small_dataset):
    from multirank import run_ranks

    rows = run_ranks(_engine_body, 2)
    model, tokenizer = tiny
    data = load_preference_data(get_preset("pku_saferlhf"))
    dataset = tokenize_preference_data(
        PreferenceData(data.spec, data.pairs[:4], fingerprint="first4"), tokenizer, TokenizationConfig(max_length=48)
    )
    for rank, got in enumerate(rows):
        batch = PreferenceCollator(dataset.pad_token_id, 2)([dataset[0], dataset[1 + rank]])
        torch.testing.assert_close(got, reference_logps_of_batch(model, batch), rtol=1e-5, atol=1e-4)
