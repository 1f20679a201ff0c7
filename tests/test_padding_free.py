"""Padding-free batches (data.padding_free) give the padded path's log-probs, gradients and training run.

The model-level checks use HelpSteer pairs (realistic lengths) tokenised for
the tiny models, in fp32: per-row response log-probs and each objective's
gradient from a packed batch must match the same pairs padded. The trainer
checks compare whole runs (1 rank; 2 ranks ZeRO-3, marked slow) against the
padded K-pass run.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from trainer_runs import check, deterministic, metrics, run_deepspeed, run_python

from raco_ds.data.batch import PreferenceCollator
from raco_ds.data.packing import PackingMismatchError, check_packed_forward, pack_rows
from raco_ds.logprobs import response_logps
from raco_ds.losses import preference_losses

# fp32 on CPU measures 0 difference (packing changes no reduction order); the margin covers other kernels.
LOGP_ATOL = 1e-4
GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def helpsteer_items():
    """8 HelpSteer pairs of spread lengths (tiny tokenizer, at most 384 tokens), the pad id and K (2 objectives)."""
    from transformers import AutoTokenizer

    from raco_ds.data.loading import load_preference_data
    from raco_ds.data.objectives import get_preset
    from raco_ds.data.tokenization import TokenizationConfig, tokenize_preference_data
    from raco_ds.tiny_models import ensure_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model("llama"))
    pairs = load_preference_data(get_preset("helpsteer"))
    dataset = tokenize_preference_data(pairs, tokenizer, TokenizationConfig(max_length=384, max_prompt_length=96))
    items = sorted((dataset[i] for i in range(len(dataset))), key=lambda item: len(item.response_a_ids))
    # Every 60th by length: short and long rows in one batch, as a shuffled real batch has.
    return items[::60][:8], dataset.pad_token_id, dataset.num_objectives


def _model(family: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    from raco_ds.tiny_models import ensure_tiny_model

    return AutoModelForCausalLM.from_pretrained(ensure_tiny_model(family), attn_implementation=attn,
                                                dtype=torch.float32).eval()  # fmt: skip


def _both(items, pad_id: int, k: int):
    return PreferenceCollator(pad_id, k)(items), PreferenceCollator(pad_id, k, padding_free=True)(items)


def _sequences(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(5, 99, rng.integers(1, 20)), rng.integers(5, 99, rng.integers(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_places_every_sequence_whole_with_restarting_positions(seed):
    sequences = _sequences(seed, 12)
    lengths = [len(p) + len(r) for p, r in sequences]
    packed = pack_rows(sequences, pad_token_id=0)
    rows, width = packed.input_ids.shape
    assert width == max(lengths) and rows <= len(sequences)
    for index, (prompt, response) in enumerate(sequences):
        row, where = (packed.row_of_token == index).nonzero(as_tuple=True)
        assert row.unique().numel() == 1 and where.tolist() == list(range(where[0], where[0] + lengths[index]))
        assert packed.input_ids[row, where].tolist() == [*prompt.tolist(), *response.tolist()]
        assert packed.position_ids[row, where].tolist() == list(range(lengths[index]))
        assert packed.response_mask[row, where].tolist() == [False] * len(prompt) + [True] * len(response)
    tail = packed.row_of_token == -1
    assert packed.attention_mask.bool().tolist() == (~tail).tolist() and not packed.response_mask[tail].any()
    assert packed.input_ids[tail].eq(0).all() and int(packed.attention_mask.sum()) == sum(lengths)
    # Segment boundaries: every segment inside one row, covering all P * L tokens.
    bounds = packed.cu_seq_lens.tolist()
    assert bounds[0] == 0 and bounds[-1] == rows * width
    assert all((end - 1) // width == start // width for start, end in zip(bounds, bounds[1:]))
    assert packed.max_seq_len == max(np.diff(bounds))


def test_pack_rows_rounds_the_row_length_up():
    packed = pack_rows(_sequences(0, 6), pad_token_id=0, pad_to_multiple_of=64)
    assert packed.input_ids.shape[1] == 64


def test_rejects_a_sequence_with_an_empty_prompt():
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_rows([(np.array([], dtype=np.int64), np.array([3, 4]))], pad_token_id=0)


def test_rejects_row_of_token_without_num_rows():
    logits, ids = torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="together"):
        response_logps(logits, ids, ids.bool(), row_of_token=ids)


@pytest.mark.parametrize(("family", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                             ("gemma", "sdpa")])  # fmt: skip
def test_packed_log_probs_match_padded(helpsteer_items, family, attn):
    items, pad_id, k = helpsteer_items
    padded, packed = _both(items, pad_id, k)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # sequences share rows
    model = _model(family, attn)
    with torch.no_grad():
        want, want_n = padded.response_logps(model(**padded.model_inputs(), use_cache=False).logits)
        got, got_n = packed.response_logps(model(**packed.model_inputs(), use_cache=False).logits)
    assert torch.equal(got_n, want_n)
    torch.testing.assert_close(got, want, rtol=0, atol=LOGP_ATOL)


def test_per_objective_gradients_match_padded(helpsteer_items):
    items, pad_id, k = helpsteer_items
    model = _model("llama")
    params = [p for p in model.parameters() if p.requires_grad]

    padded, packed = _both(items[::2], pad_id, k)  # 4 pairs of spread lengths keep it quick
    with torch.no_grad():  # a reference near the policy, so that no pair's sigmoid saturates
        reference = padded.response_logps(model(**padded.model_inputs(), use_cache=False).logits)[0]
    reference = reference + torch.linspace(-2.0, 2.0, reference.numel())

    def objective_grads(batch) -> list[list[torch.Tensor]]:
        logps, lengths = batch.response_logps(model(**batch.model_inputs(), use_cache=False).logits)
        b = batch.num_pairs
        out = preference_losses(logps[:b], logps[b:], batch.labels, reference_logps_a=reference[:b],
                                reference_logps_b=reference[b:], lengths_a=lengths[:b],
                                lengths_b=lengths[b:])  # fmt: skip
        return [list(torch.autograd.grad(out.losses[j], params, retain_graph=True)) for j in range(k)]

    for want, got in zip(objective_grads(padded), objective_grads(packed)):
        flat_want, flat_got = torch.cat([g.flatten() for g in want]), torch.cat([g.flatten() for g in got])
        assert flat_want.norm() > 0
        assert float((flat_got - flat_want).norm() / flat_want.norm()) <= GRAD_RTOL


class _IgnoresPacking(torch.nn.Module):
    """A model whose attention does not see packing (it drops the positions and the varlen kwargs)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=False, **_):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_check_packed_forward_passes_a_packing_model_and_stops_one_that_mixes_sequences(helpsteer_items):
    items, pad_id, k = helpsteer_items
    collator, model = PreferenceCollator(pad_id, k), _model("llama")
    assert check_packed_forward(model, items, collator) <= 1e-6
    with pytest.raises(PackingMismatchError, match=r"data\.padding_free.*--data.padding_free false"):
        check_packed_forward(_IgnoresPacking(model), items, collator)


def _capture_run(capture: str) -> SimpleNamespace:
    """Just what choose_capture reads, with a hook that would accept one-pass capture."""
    hook = SimpleNamespace(onepass_unsupported_reason=lambda: None)
    cfg = SimpleNamespace(raco=SimpleNamespace(capture=capture), data=SimpleNamespace(padding_free=True))
    return SimpleNamespace(cfg=cfg, hook=hook, rank=0)


def test_auto_capture_runs_k_passes_on_packed_batches(caplog):
    from raco_ds.trainer.capture import KPassStep, choose_capture

    with caplog.at_level(logging.WARNING, logger="raco_ds.trainer"):
        assert isinstance(choose_capture(_capture_run("auto")), KPassStep)
    assert "data.padding_free packs several sequences into one row" in caplog.text


def test_rejects_forced_onepass_on_packed_batches():
    from raco_ds.trainer.capture import choose_capture
    from raco_ds.trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"raco.capture='onepass' cannot run here: data.padding_free .*--capture"):
        choose_capture(_capture_run("onepass"))


def test_padding_free_is_off_by_default_and_set_from_the_command_line():
    from raco_ds.trainer.config import TrainConfig, parse_args

    assert TrainConfig().data.padding_free is False
    assert parse_args(["--data.padding_free", "true"]).data.padding_free is True


COMMON = ["--preset", "tiny", "--max-steps", "2", "--logging.eval_every", "0", "--checkpointing.export", "false"]


def _held_out(stdout: str) -> str:
    """The held-out evaluation table the run prints at its end (scored through the run's collator)."""
    return stdout[stdout.index("held-out evaluation") : stdout.index("run folder:")]


def _assert_trains_like_padded(padded, packed, padded_dir, packed_dir) -> None:
    assert "one-pass capture unavailable: data.padding_free" in packed.stdout + packed.stderr
    want, got = metrics(padded_dir), metrics(packed_dir)
    assert sorted(got) == sorted(want) == [1, 2]
    for step in want:
        assert deterministic(got[step]) == deterministic(want[step]), step
    assert _held_out(packed.stdout) == _held_out(padded.stdout)


def test_trainer_packed_run_matches_padded_run(tmp_path):
    padded = check(run_python(*COMMON, "--output-dir", str(tmp_path / "pad"), "--capture", "k_pass"))
    packed = check(run_python(*COMMON, "--output-dir", str(tmp_path / "pack"), "--data.padding_free", "true"))
    _assert_trains_like_padded(padded, packed, tmp_path / "pad", tmp_path / "pack")


@pytest.mark.slow
def test_trainer_packed_run_matches_padded_run_on_two_ranks_zero3(tmp_path):
    args = [*COMMON, "--ds_config", "ds_configs/zero3.json", "--logging.progress_bar", "false"]
    padded = check(run_deepspeed(2, *args, "--output-dir", str(tmp_path / "pad"), "--capture", "k_pass"))
    packed = check(run_deepspeed(2, *args, "--output-dir", str(tmp_path / "pack"), "--data.padding_free", "true"))
    _assert_trains_like_padded(padded, packed, tmp_path / "pad", tmp_path / "pack")
