"""response_logps and the reference log-probs: scoring, the run folder's cache, rank split, ZeRO-3."""

from __future__ import annotations

import os

import pytest
import torch

import raco_ds.trainer.reference as reference_module
from raco_ds.data import PreferenceCollator, PreferenceData, TokenizationConfig, get_preset, load_preference_data
from raco_ds.data import tokenize_preference_data
from raco_ds.logprobs import response_logps
from raco_ds.models import load_model, load_tokenizer
from raco_ds.trainer import ConfigError, parse_args
from raco_ds.trainer.data import DataSplit
from raco_ds.trainer.eval import PlainEngine, score_pairs
from raco_ds.trainer.reference import REFERENCE_FILE, initial_reference

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


def _first_pairs(tokenizer, count: int):
    data = load_preference_data(get_preset("pku_saferlhf"))
    data = PreferenceData(data.spec, data.pairs[:count], fingerprint=f"{data.fingerprint}:first{count}")
    return tokenize_preference_data(data, tokenizer, TokenizationConfig(max_length=64))


@pytest.fixture(scope="module")
def small_dataset(tiny):
    return _first_pairs(tiny[1], 11)


def _direct(model, dataset):
    """Reference log-probs of every pair from one plain forward over one batch, (N, 2) float64."""
    batch = PreferenceCollator(dataset.pad_token_id, dataset.num_objectives)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = response_logps(logits, batch.input_ids, batch.response_mask)[0]
    return torch.stack([rows[: batch.num_pairs], rows[batch.num_pairs :]], dim=1).double()


def _reference(model, dataset, out, *, resumed=False, dtype="fp32", loss="dpo"):
    cfg = parse_args(["--preset", "tiny", "--model.dtype", dtype, "--loss", loss, "--logging.eval_batch_size", "4"])
    split = DataSplit(train_pools=[[0, 2, 4, 6, 8, 10]], eval_indices=[1, 3, 5])
    collator = PreferenceCollator(dataset.pad_token_id, dataset.num_objectives)
    return initial_reference(PlainEngine(model), dataset, collator, split, cfg, out, rank=0, resumed=resumed)


def test_reference_scores_every_used_pair_like_a_direct_forward(tiny, small_dataset, tmp_path):
    model, _ = tiny
    scores = _reference(model, small_dataset, tmp_path)
    used = [0, 1, 2, 3, 4, 5, 6, 8, 10]
    torch.testing.assert_close(scores.logps[used], _direct(model, small_dataset)[used], rtol=1e-5, atol=1e-4)
    assert scores.logps[[7, 9]].isnan().all()  # pairs the run never uses are not scored
    assert [p.name for p in tmp_path.iterdir()] == [REFERENCE_FILE]
    # Reference-free losses score only the held-out pairs (for the evaluation)
    (tmp_path / "simpo").mkdir()
    simpo = _reference(model, small_dataset, tmp_path / "simpo", loss="simpo")
    assert (~simpo.logps[:, 0].isnan()).nonzero().flatten().tolist() == [1, 3, 5]


def test_the_saved_reference_is_reused_and_refused_for_another_model(tiny, small_dataset, tmp_path, monkeypatch):
    model, _ = tiny
    first = _reference(model, small_dataset, tmp_path)

    def must_not_score(*args, **kwargs):
        raise AssertionError("the saved reference should have been used")

    monkeypatch.setattr(reference_module, "score_pairs", must_not_score)
    again = _reference(model, small_dataset, tmp_path)
    torch.testing.assert_close(again.logps, first.logps, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(again.lengths, first.lengths)
    # Another model's file (here: another dtype): a resumed run stops, a fresh one recomputes.
    with pytest.raises(ConfigError, match="a resumed run must keep --model"):
        _reference(model, small_dataset, tmp_path, resumed=True, dtype="bf16")
    with pytest.raises(AssertionError, match="should have been used"):
        _reference(model, small_dataset, tmp_path, dtype="bf16")


def test_a_damaged_reference_file_is_recomputed(tiny, small_dataset, tmp_path):
    model, _ = tiny
    first = _reference(model, small_dataset, tmp_path)
    (tmp_path / REFERENCE_FILE).write_bytes(b"not safetensors")
    again = _reference(model, small_dataset, tmp_path, resumed=True)
    torch.testing.assert_close(again.logps, first.logps, rtol=0, atol=0, equal_nan=True)
    reread = _reference(model, small_dataset, tmp_path)  # the recomputed file is intact
    torch.testing.assert_close(reread.logps, again.logps, rtol=0, atol=0, equal_nan=True)


def _two_rank_body(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    import deepspeed

    tokenizer = load_tokenizer("tiny")
    dataset = _first_pairs(tokenizer, 11)
    collator = PreferenceCollator(dataset.pad_token_id, dataset.num_objectives)
    # 5 pairs in batches of 2: rank 0 runs two batches, rank 1 one and a padding forward (ZeRO-3's collectives)
    indices = [0, 3, 4, 7, 10]
    plain = score_pairs(PlainEngine(load_model("tiny")), dataset, range(len(dataset)), 2, collator)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=load_model("tiny").requires_grad_(False), config=config)
    zero3 = score_pairs(engine, dataset, indices, 2, collator)
    return {"plain": plain.logps, "zero3": zero3.logps, "lengths": zero3.lengths}


@pytest.mark.slow
def test_two_gloo_ranks_score_each_pair_once_plain_and_under_zero3(tiny, small_dataset):
    from multirank import run_ranks

    results = run_ranks(_two_rank_body, 2)
    direct = _direct(tiny[0], small_dataset)
    for got in results:  # every rank ends with the full table
        torch.testing.assert_close(got["plain"], results[0]["plain"], rtol=0, atol=0)
        torch.testing.assert_close(got["plain"], direct, rtol=1e-5, atol=1e-4)
        scored = [0, 3, 4, 7, 10]
        torch.testing.assert_close(got["zero3"][scored], direct[scored], rtol=1e-5, atol=1e-4)
        assert got["zero3"][[1, 2, 5, 6, 8, 9]].isnan().all() and (got["lengths"][scored] > 0).all()
