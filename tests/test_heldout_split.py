"""The held-out split cannot leak: no held-out prompt or response text appears in a training pair."""

from __future__ import annotations

import logging

import pytest

from raco_ds.data.loading import load_preference_data
from raco_ds.data.objectives import get_preset
from raco_ds.trainer.config import ConfigError, parse_args
from raco_ds.trainer.data import leakage_groups

HELPSTEER = ["--preset", "tiny", "--data", "helpsteer", "--objectives", "helpfulness,concise"]


@pytest.fixture(scope="module")
def tokenizer():
    from raco_ds.models import load_tokenizer

    return load_tokenizer("tiny")


def _texts(pair) -> tuple[str, set[str]]:
    return repr([(m["role"], m["content"]) for m in pair.prompt]), {pair.response_a, pair.response_b}


@pytest.mark.parametrize("argv", [
    [*HELPSTEER, "--data.num_eval_pairs", "60", "--data.num_train_pairs", "null"],
    ["--preset", "tiny", "--data.num_eval_pairs", "80", "--data.num_train_pairs", "null"],
    ["--preset", "tiny", "--data", "hh_rlhf", "--data.num_eval_pairs", "30", "--data.num_train_pairs", "null"],
], ids=["helpsteer-derived-pairs", "pku-shared-pairs", "hh-per-objective"])
def test_no_heldout_prompt_or_response_text_in_training(argv, tokenizer, caplog):
    from raco_ds.trainer.data import build_data

    cfg = parse_args(argv)
    pairs = load_preference_data(get_preset(cfg.data.dataset)).pairs
    with caplog.at_level(logging.INFO):
        dataset, _, split, _ = build_data(cfg, tokenizer, rank=0, world=1)
    train = [i for pool in split.train_pools for i in pool]
    heldout_prompts = {_texts(pairs[i])[0] for i in split.eval_indices}
    heldout_responses = set().union(*(_texts(pairs[i])[1] for i in split.eval_indices))
    for i in train:
        prompt, responses = _texts(pairs[i])
        assert prompt not in heldout_prompts, f"training pair {i} has a held-out prompt"
        assert not responses & heldout_responses, f"training pair {i} has a held-out response"
    # Every pool holds out at least what was asked for, in whole groups, and trains on the rest.
    pools = 1 if dataset.shared else dataset.num_objectives
    assert len(split.eval_indices) >= pools * cfg.data.num_eval_pairs
    assert len(set(split.eval_indices)) + len(train) == len(dataset)
    assert 0 < split.num_eval_groups <= len(split.eval_indices)
    assert "prompt groups" in split.describe()


def test_helpsteer_split_keeps_every_prompt_on_one_side(tokenizer):
    """The flaw the split fixes: HelpSteer's derived pairs share prompts (139 prompts, 510 pairs)."""
    from raco_ds.trainer.data import build_data

    cfg = parse_args([*HELPSTEER, "--data.num_eval_pairs", "40", "--data.num_train_pairs", "null"])
    pairs = load_preference_data(get_preset("helpsteer")).pairs
    groups = leakage_groups(pairs)
    assert len(set(groups)) < len(pairs)  # prompts repeat: a pair-level split would leak
    _, _, split, _ = build_data(cfg, tokenizer, rank=0, world=1)
    eval_groups = {groups[i] for i in split.eval_indices}
    assert not eval_groups & {groups[i] for i in split.train_pools[0]}
    assert split.num_eval_groups == len(eval_groups)


def test_split_is_shared_by_training_seeds_and_world_sizes(tokenizer):
    from raco_ds.trainer.data import build_data

    base = [*HELPSTEER, "--data.num_eval_pairs", "40"]
    _, _, a, _ = build_data(parse_args([*base, "--seed", "0"]), tokenizer, rank=0, world=1)
    _, _, b, _ = build_data(parse_args([*base, "--seed", "3"]), tokenizer, rank=1, world=2)
    _, _, c, _ = build_data(parse_args([*base, "--data.split_seed", "1"]), tokenizer, rank=0, world=1)
    assert a.eval_indices == b.eval_indices and a.train_pools == b.train_pools
    assert set(a.eval_indices) != set(c.eval_indices)


def test_rejects_a_split_that_leaves_nothing_to_train(tokenizer):
    from raco_ds.trainer.data import build_data

    cfg = parse_args([*HELPSTEER, "--data.num_eval_pairs", "510"])
    with pytest.raises(ConfigError, match="whole prompt groups"):
        build_data(cfg, tokenizer, rank=0, world=1)


def test_generation_answers_each_heldout_prompt_once_however_truncation_rendered_it(tokenizer):
    """A prompt kept whole in one pair and cut in another (short max_prompt_length) is one prompt."""
    from raco_ds.pareto.evaluate import _held_out_prompts, _Split
    from raco_ds.trainer.data import build_data

    cfg = parse_args([*HELPSTEER, "--data.num_eval_pairs", "64", "--data.num_train_pairs", "null",
                      "--data.max_length", "96", "--data.max_prompt_length", "24"])
    pairs = load_preference_data(get_preset("helpsteer")).pairs
    dataset, collator, split, _ = build_data(cfg, tokenizer, rank=0, world=1)
    renderings: dict[str, set[bytes]] = {}
    for i in split.eval_indices:
        renderings.setdefault(_texts(pairs[i])[0], set()).add(dataset[i].prompt_ids.tobytes())
    assert any(len(r) > 1 for r in renderings.values()), "the case this test needs: one prompt rendered twice"

    prompts, clusters, users = _held_out_prompts(_Split(dataset, split, [], collator, None), limit=1000)
    assert len(prompts) == len(renderings) == len(set(split.eval_prompts.values()))
    assert len(clusters) == len(users) == len(prompts)
