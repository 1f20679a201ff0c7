"""Judges: score generated responses, one number per sample, configured by name.

A judge is anything with a ``name`` and a ``score(samples) -> list[float]`` method (the
:class:`Judge` protocol). Judges are built from spec strings, ``"<kind>"`` or
``"<kind>:<argument>"``, by :func:`build_judge`; new kinds are added with
:func:`register_judge`. Built in:

``length_tokens``
    Response length in tokens of the policy's tokenizer (the end-of-sequence token excluded;
    a response cut at max_new_tokens counts max_new_tokens).
``length_words``
    Response length in whitespace-separated words.
``implicit_reward``
    The DPO implicit reward of the generated text: beta * (log pi(y|x) - log ref(y|x)),
    summed over the response tokens, with the policy being evaluated and the reference model
    of the run (beta: the run's loss.beta). What the training objective itself pays for.
``reward_model:<HF folder>``
    Any HF sequence-classification model (``AutoModelForSequenceClassification``, one
    output): the score of prompt + response, rendered with the reward model's own chat
    template when it has one, else as the policy's rendered prompt followed by the response.
``beaver_reward:<folder>`` / ``beaver_cost:<folder>``
    PKU-Alignment's beaver-7b-v1.0-reward / -cost (the PKU-SafeRLHF paper's judges): saved
    by safe-rlhf as ``LlamaForScore`` with a ``score_head``; loaded here as a Llama sequence
    classifier with that head (refused if any head weight is missing), prompted in their
    training format ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}``. The
    cost judge reports the negated cost, so that higher is better (more harmless) for every
    judge. 7B models: for GPUs (about 14 GB each in bf16).

>>> sorted(JUDGES)
['beaver_cost', 'beaver_reward', 'implicit_reward', 'length_tokens', 'length_words', 'reward_model']
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from raco_ds.evaluation.generation import Sample

__all__ = ["JUDGES", "Judge", "JudgeContext", "build_judge", "register_judge"]


class Judge(Protocol):
    """Scores generated samples; higher is better for the objective it stands for, unless documented."""

    name: str
    """The spec string the judge was built from (the metric's name in reports)."""

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """One score per sample, in order."""
        ...


@dataclass
class JudgeContext:
    """What judges may need from the evaluation: the policy, its reference, and the loss's beta."""

    policy: torch.nn.Module | None = None
    """The model being evaluated."""
    reference: torch.nn.Module | None = None
    """The run's reference (initial) model."""
    tokenizer: Any = None
    """The policy's tokenizer."""
    beta: float = 0.2
    """The loss's inverse temperature (implicit rewards are beta * log-ratios)."""
    device: str = "cpu"
    """Where judge models run."""
    batch_size: int = 8
    """Samples per judge forward."""


JudgeFactory = Callable[[str | None, JudgeContext], Judge]
JUDGES: dict[str, JudgeFactory] = {}
"""Judge kinds by name: factory(argument or None, context) -> Judge."""


def register_judge(kind: str) -> Callable[[JudgeFactory], JudgeFactory]:
    """Decorator adding a judge factory under ``kind`` (ValueError on a duplicate name)."""

    def add(factory: JudgeFactory) -> JudgeFactory:
        if kind in JUDGES:
            raise ValueError(f"a judge named {kind!r} is already registered; pick another name")
        JUDGES[kind] = factory
        return factory

    return add


def build_judge(spec: str, context: JudgeContext) -> Judge:
    """A judge from ``"<kind>"`` or ``"<kind>:<argument>"`` (ValueError naming the known kinds)."""
    kind, _, argument = spec.partition(":")
    if kind not in JUDGES:
        raise ValueError(f"unknown judge {spec!r}; known kinds: {sorted(JUDGES)} (e.g. length_tokens, "
                         "reward_model:path/to/hf_classifier)")
    return JUDGES[kind](argument or None, context)


@dataclass
class _FunctionJudge:
    name: str
    function: Callable[[Sample], float]

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [float(self.function(s)) for s in samples]


def _no_argument(kind: str, argument: str | None) -> None:
    if argument is not None:
        raise ValueError(f"judge {kind!r} takes no argument, got {kind}:{argument}")


@register_judge("length_tokens")
def _length_tokens(argument: str | None, context: JudgeContext) -> Judge:
    _no_argument("length_tokens", argument)
    return _FunctionJudge("length_tokens", lambda s: len(s.response_ids))


@register_judge("length_words")
def _length_words(argument: str | None, context: JudgeContext) -> Judge:
    _no_argument("length_words", argument)
    return _FunctionJudge("length_words", lambda s: len(s.response_text.split()))


@dataclass
class _ImplicitReward:
    name: str
    context: JudgeContext

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[float]:
        from raco_ds.logprobs import response_logps

        ctx = self.context
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        scores: list[float] = []
        for start in range(0, len(samples), ctx.batch_size):
            chunk = samples[start : start + ctx.batch_size]
            rows = [s.prompt_ids + s.response_ids for s in chunk]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=ctx.device)
            attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=ctx.device)
            response = torch.zeros_like(attention, dtype=torch.bool)
            for i, s in enumerate(chunk):
                response[i, len(s.prompt_ids) : len(s.prompt_ids) + len(s.response_ids)] = True
            logps = [response_logps(model(input_ids=ids, attention_mask=attention, use_cache=False).logits, ids,
                                    response)[0].double() for model in (ctx.policy, ctx.reference)]
            scores += (ctx.beta * (logps[0] - logps[1])).tolist()
        return scores


@register_judge("implicit_reward")
def _implicit_reward(argument: str | None, context: JudgeContext) -> Judge:
    _no_argument("implicit_reward", argument)
    if context.policy is None or context.reference is None or context.tokenizer is None:
        raise ValueError("judge 'implicit_reward' needs the policy, the reference model and the tokenizer")
    return _ImplicitReward("implicit_reward", context)


@dataclass
class _SequenceClassifier:
    """Score = the single logit of an HF sequence classifier on the rendered conversation."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    render: Callable[[Sample], str]
    sign: float
    context: JudgeContext

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[float]:
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        scores: list[float] = []
        for start in range(0, len(samples), self.context.batch_size):
            texts = [self.render(s) for s in samples[start : start + self.context.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True)
            logits = self.model(**{k: v.to(self.context.device) for k, v in batch.items()}).logits
            scores += (self.sign * logits[:, 0].double()).tolist()
        return scores


def _user_text(sample: Sample, context: JudgeContext) -> str:
    """The user's request as plain text: the sample's own, else its rendered prompt decoded."""
    if sample.prompt_user is not None:
        return sample.prompt_user
    return context.tokenizer.decode(sample.prompt_ids, skip_special_tokens=True) if context.tokenizer else ""


def _judge_dtype(context: JudgeContext) -> torch.dtype:
    """bf16 on GPUs (a 7B judge is 14 GB instead of 28), fp32 on CPUs."""
    return torch.bfloat16 if str(context.device).startswith("cuda") else torch.float32


def _load_classifier(path: str, context: JudgeContext) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_judge_dtype(context))
    if model.config.num_labels != 1:
        raise ValueError(f"reward model {path} has {model.config.num_labels} outputs; a reward model has exactly one")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.to(context.device).eval(), tokenizer


@register_judge("reward_model")
def _reward_model(argument: str | None, context: JudgeContext) -> Judge:
    if not argument:
        raise ValueError("judge 'reward_model' needs a folder: reward_model:path/to/hf_sequence_classifier")
    model, tokenizer = _load_classifier(argument, context)

    def render(sample: Sample) -> str:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": _user_text(sample, context)},
                 {"role": "assistant", "content": sample.response_text}], tokenize=False)
        return sample.prompt_text + sample.response_text

    return _SequenceClassifier(f"reward_model:{argument}", model, tokenizer, render, 1.0, context)


BEAVER_FORMAT = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
"""The conversation format beaver-7b-v1.0's reward and cost models were trained on."""


def _load_score_model(path: str, context: JudgeContext) -> tuple[torch.nn.Module, Any]:
    """A safe-rlhf ``LlamaForScore`` folder as a Llama sequence classifier (its ``score_head`` as ``score``)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = Path(path)
    config = LlamaConfig.from_pretrained(folder, num_labels=1)
    model = LlamaForSequenceClassification(config).to(_judge_dtype(context))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin")):
        state.update(load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=True))
    state = {key.replace("score_head.", "score."): value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or "score.weight" not in state:
        raise ValueError(f"{path}: not a complete LlamaForScore checkpoint (missing {missing[:5]}, "
                         f"score head {'found' if 'score.weight' in state else 'absent'}); "
                         "pass the beaver-7b-v1.0-reward or -cost folder")
    if unexpected:
        raise ValueError(f"{path}: unexpected weights {unexpected[:5]}; this is not a LlamaForScore checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.to(context.device).eval(), tokenizer


def _beaver(kind: str, sign: float) -> JudgeFactory:
    def factory(argument: str | None, context: JudgeContext) -> Judge:
        if not argument:
            raise ValueError(f"judge {kind!r} needs a folder, e.g. {kind}:PKU-Alignment/beaver-7b-v1.0-"
                             f"{kind.split('_')[1]} (downloaded beforehand)")
        architectures = json.loads((Path(argument) / "config.json").read_text()).get("architectures") or []
        loader = _load_score_model if "LlamaForScore" in architectures else _load_classifier
        model, tokenizer = loader(argument, context)

        def render(sample: Sample) -> str:
            return BEAVER_FORMAT.format(prompt=_user_text(sample, context), response=sample.response_text)

        return _SequenceClassifier(f"{kind}:{argument}", model, tokenizer, render, sign, context)

    return factory


register_judge("beaver_reward")(_beaver("beaver_reward", 1.0))
register_judge("beaver_cost")(_beaver("beaver_cost", -1.0))
