"""Evaluation that sees steering: cluster bootstrap, (dis)agreement metrics, generation, judges, sweep statistics.

Real parts throughout: the tiny Llama with its locally trained tokenizer (raco_ds.tiny_models),
a tiny randomly initialised sequence classifier built from a config as the reward model, and
the bundled data. Every test runs in seconds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raco_ds.evaluation import ItemValues, cluster_counts, estimate, estimates, preference_items
from raco_ds.evaluation.generation import GenerationConfig, generate
from raco_ds.evaluation.judges import JUDGES, JudgeContext, build_judge, register_judge
from raco_ds.losses import preference_losses
from raco_ds.pareto.statistics import MetricSpec, RunData, curve_roughness, sweep_statistics


@pytest.fixture(scope="module")
def tiny():
    from raco_ds.models import load_model, load_tokenizer

    return load_model("tiny").eval(), load_tokenizer("tiny")


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tokenizer = tiny
    texts = ["User: How do I bake bread?\n\nAssistant: ", "User: Is it safe to swim after eating?\n\nAssistant: ",
             "User: Name a colour.\n\nAssistant: "]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


# ---------------------------------------------------------------------------
# Bootstrap


def test_cluster_bootstrap_interval_covers_the_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        values = rng.normal(0.0, 1.0, size=40)
        counts = cluster_counts([str(i) for i in range(40)], num_resamples=500, seed=trial)
        est = estimate(values, [str(i) for i in range(40)], counts)
        covered += est.low <= 0.0 <= est.high
    assert 0.88 <= covered / 200 <= 0.99


def test_items_of_one_cluster_are_resampled_together():
    # Two clusters of identical items: a cluster bootstrap sees 2 units, not 20 independent items.
    values = np.array([0.0] * 10 + [1.0] * 10)
    clustered = estimate(values, ["a"] * 10 + ["b"] * 10, cluster_counts(["a", "b"], seed=0))
    independent = estimate(values, [str(i) for i in range(20)], cluster_counts([str(i) for i in range(20)], seed=0))
    assert clustered.value == independent.value == 0.5
    assert clustered.high - clustered.low > 2 * (independent.high - independent.low)


def test_estimates_share_one_draw_and_are_reproducible():
    items = {"x": ItemValues([1.0, 2.0, 3.0], ["a", "b", "c"]), "y": ItemValues([], [])}
    first, again = estimates(items, seed=3), estimates(items, seed=3)
    assert first["x"] == again["x"] and first["x"].n == 3
    assert math.isnan(first["y"].value) and first["y"].n == 0


# ---------------------------------------------------------------------------
# Preference metrics on disagreeing / agreeing pairs


def test_preference_items_split_pairs_by_agreement_and_match_the_loss_metrics():
    # 4 pairs, K=2: pair 0 both prefer A, pair 1 they disagree, pair 2 objective 1 ties, pair 3 disagree.
    labels = torch.tensor([[1, 1, -1, -1], [1, -1, 0, 1]])
    policy = torch.tensor([[-10.0, -12.0], [-9.0, -8.0], [-5.0, -6.0], [-7.0, -7.5]], dtype=torch.float64)
    reference = torch.tensor([[-11.0, -11.0], [-9.0, -9.0], [-5.0, -5.0], [-7.0, -7.0]], dtype=torch.float64)
    lengths = torch.full((4, 2), 3)
    items = preference_items(policy, reference, lengths, labels, ["p0", "p1", "p2", "p3"], ["help", "safe"],
                             loss="dpo", beta=0.5)
    assert items["accuracy_agree/help"].clusters == ["p0"]
    assert items["accuracy_disagree/help"].clusters == ["p1", "p3"]
    assert items["accuracy/help"].clusters == ["p0", "p1", "p2", "p3"]
    assert items["accuracy/safe"].clusters == ["p0", "p1", "p3"]  # the tie is no pair of "safe"
    # On disagreeing pairs the two objectives' margins are opposite: a pure trade-off.
    assert items["margin_disagree/help"].values == pytest.approx([-v for v in items["margin_disagree/safe"].values])
    # Means over all pairs are exactly the trainer's metrics (raco_ds.losses definitions).
    ref = preference_losses(policy[:, 0], policy[:, 1], labels, reference_logps_a=reference[:, 0],
                            reference_logps_b=reference[:, 1], loss="dpo", beta=0.5)
    for k, name in enumerate(["help", "safe"]):
        assert np.mean(items[f"accuracy/{name}"].values) == pytest.approx(ref.accuracy[k].item())
        assert np.mean(items[f"margin/{name}"].values) == pytest.approx(ref.margin[k].item())


# ---------------------------------------------------------------------------
# Generation


def test_greedy_generation_is_deterministic_and_batching_does_not_change_it(tiny, prompts):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, batch_size=3))
    one_by_one = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, batch_size=1))
    assert [s.response_ids for s in batched] == [s.response_ids for s in one_by_one]  # left padding is exact
    assert all(len(s.response_ids) <= 12 and (s.finished or len(s.response_ids) == 12) for s in batched)
    assert batched[0].prompt_ids == list(prompts[0])


def test_seeded_sampling_reproduces_and_seeds_differ(tiny, prompts):
    model, tokenizer = tiny

    def run(seed):
        cfg = GenerationConfig(max_new_tokens=10, sample=True, seed=seed, temperature=1.5)
        return [s.response_ids for s in generate(model, tokenizer, prompts, cfg)]

    assert run(1) == run(1) and run(1) != run(2)


def test_generation_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(sample=True, temperature=0.0)


# ---------------------------------------------------------------------------
# Judges


def test_length_and_implicit_reward_judges(tiny, prompts):
    from raco_ds.logprobs import response_logps
    from raco_ds.models import load_model

    model, tokenizer = tiny
    samples = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=8))
    context = JudgeContext(policy=model, reference=model, tokenizer=tokenizer, beta=0.2)
    assert build_judge("length_tokens", context).score(samples) == [len(s.response_ids) for s in samples]
    assert build_judge("length_words", context).score(samples) == [len(s.response_text.split()) for s in samples]
    assert build_judge("implicit_reward", context).score(samples) == [0.0] * 3  # policy == reference

    other = load_model("tiny")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rewards = build_judge("implicit_reward", JudgeContext(policy=other, reference=model, tokenizer=tokenizer,
                                                          beta=0.2)).score(samples)
    s = samples[0]
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(s.prompt_ids):] = True
    with torch.no_grad():
        expected = 0.2 * (response_logps(other(input_ids=ids).logits, ids, mask)[0]
                          - response_logps(model(input_ids=ids).logits, ids, mask)[0])
    assert rewards[0] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny):
    """A tiny randomly initialised Llama sequence classifier (one output) with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    _, tokenizer = tiny
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("reward")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_judge_scores_with_the_classifier(tiny, prompts, reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = tiny
    samples = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6))
    judge = build_judge(f"reward_model:{reward_model_dir}", JudgeContext(tokenizer=tokenizer, batch_size=2))
    scores = judge.score(samples)
    classifier = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for sample, score in zip(samples, scores):
        # The reward model's own chat template renders the conversation (the tiny tokenizer has one).
        text = tokenizer.apply_chat_template([
            {"role": "user", "content": tokenizer.decode(sample.prompt_ids, skip_special_tokens=True)},
            {"role": "assistant", "content": sample.response_text}], tokenize=False)
        with torch.no_grad():
            expected = classifier(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_beaver_judges_load_a_score_head_checkpoint_and_negate_the_cost(tiny, prompts, reward_model_dir, tmp_path):
    """safe-rlhf's LlamaForScore layout (score_head, architectures) loads as the classifier it is."""
    from safetensors.torch import load_file, save_file

    model, tokenizer = tiny
    beaver = tmp_path / "beaver-cost"
    beaver.mkdir()
    state = load_file(reward_model_dir / "model.safetensors")
    save_file({k.replace("score.", "score_head."): v for k, v in state.items()}, beaver / "model.safetensors")
    config = json.loads((reward_model_dir / "config.json").read_text())
    (beaver / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForScore"]}))
    tokenizer.save_pretrained(beaver)

    samples = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6))
    for sample in samples:
        sample.prompt_user = "How are you?"
    context = JudgeContext(tokenizer=tokenizer)
    cost = build_judge(f"beaver_cost:{beaver}", context).score(samples)
    reward = build_judge(f"beaver_reward:{reward_model_dir}", context).score(samples)  # plain HF classifier folder
    assert cost == pytest.approx([-r for r in reward], rel=1e-4, abs=1e-5)

    del state["score.weight"]
    save_file({k.replace("score.", "score_head."): v for k, v in state.items()}, beaver / "model.safetensors")
    with pytest.raises(ValueError, match="not a complete LlamaForScore"):
        build_judge(f"beaver_cost:{beaver}", context)


def test_judge_registry_names_unknown_kinds_and_takes_new_judges():
    with pytest.raises(ValueError, match="unknown judge 'fluency'"):
        build_judge("fluency", JudgeContext())
    with pytest.raises(ValueError, match="takes no argument"):
        build_judge("length_tokens:5", JudgeContext())

    class Exclamations:
        name = "test_exclamations"

        def score(self, samples):
            return [float(s.response_text.count("!")) for s in samples]

    def factory(argument, context):
        return Exclamations()

    register_judge("test_exclamations")(factory)
    try:
        assert build_judge("test_exclamations", JudgeContext()).score([]) == []
        with pytest.raises(ValueError, match="already registered"):
            register_judge("test_exclamations")(factory)
    finally:
        JUDGES.pop("test_exclamations")  # the registry is global: leave it as the other tests expect


# ---------------------------------------------------------------------------
# Sweep statistics


def _runs(noise: float, steer: float) -> list[RunData]:
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1):
        for w in (0.0, 0.25, 0.5, 0.75, 1.0):
            values = [steer * w + noise * v for v in rng.normal(size=20)]
            items = {"acc/a": {"values": values, "clusters": [f"g{i // 2}" for i in range(20)]}}
            runs.append(RunData("raco", (w, 1 - w), seed, {"acc/a": float(np.mean(values)), "len/b": 100 * w},
                                items, roughness=0.1 + 0.01 * seed))
    return runs


def test_steering_statistic_is_one_with_a_tight_interval_when_the_metric_follows_the_weight():
    stats, reference = sweep_statistics(_runs(noise=0.01, steer=1.0),
                                        [MetricSpec.parse("acc/a"), MetricSpec.parse("-len/b")], num_resamples=300)
    raco = stats["raco"]
    assert raco["steering"][0].value == pytest.approx(1.0) and raco["steering"][0].low > 0.8
    assert raco["steering"][1].value == pytest.approx(1.0)  # -length rises with w_b = 1 - w_a
    assert raco["num_seeds"] == [2] * 5 and reference == pytest.approx([min(m[0].value for m in raco["means"]), -100])
    hv = raco["hypervolume"]
    assert hv.low <= hv.value <= hv.high and hv.value > 0
    assert raco["roughness"].value == pytest.approx(0.105)


def test_steering_interval_spans_zero_when_the_metric_is_noise():
    stats, _ = sweep_statistics(_runs(noise=1.0, steer=0.0), [MetricSpec.parse("acc/a"), MetricSpec.parse("len/b")],
                                num_resamples=300)
    steering = stats["raco"]["steering"][0]
    assert steering.low < 0 < steering.high


def test_curve_roughness_ignores_trends_and_missing_steps():
    assert curve_roughness([3.0, 2.0, 1.0, math.nan, 0.0]) == 0.0
    assert math.isnan(curve_roughness([1.0, 2.0]))
