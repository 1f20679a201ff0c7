"""Chat templating, tokenisation, truncation and loss masks for preference pairs.

Rendering. When the tokenizer has a chat template it is used: the prompt is
``apply_chat_template(prompt, add_generation_prompt=True)`` and a response is
what the template adds after that for the assistant message (its text plus
the end-of-turn marker, e.g. ``...<|im_end|>\\n``). Without a template (or with
``use_chat_template=False``) the documented plain format is used::

    [BOS]System: {system}\\n          (only when there is a system message)
    User: {user}\\n
    Assistant: {earlier reply}\\n
    User: {last user turn}\\n
    Assistant: {response}[EOS]

where the prompt ends with ``"Assistant: "`` and the response is
``{response}`` plus the EOS token when the tokenizer has one. BOS is added when
the tokenizer has one distinct from EOS (GPT-2-style tokenizers share them).

Prompt and response are tokenised separately (``add_special_tokens=False``;
special tokens written by the template are parsed as such), as TRL does, so
the boundary between them is exact and the response tokens of A and B are
scored on the same prompt tokens.

Truncation (per pair, so A and B keep the same prompt). When
``len(prompt) + len(longest response) > max_length``:

1. the prompt keeps its END: ``max(max_length - longest, min(len(prompt), max_prompt_length))`` tokens,
2. each response keeps its START: at most ``max_length - kept prompt`` tokens.

Because ``1 <= max_prompt_length < max_length`` (validated), neither side is
ever cut to nothing. ``overflow`` decides what a too-long pair does:
``"truncate"`` (default; counted and logged), ``"skip"`` (dropped; counted
and logged) or ``"error"`` (raise, naming the pair's ``file:row``).

Masks. ``response_mask`` is True on response tokens only (prompt and padding
are False); the model scores token t from position t - 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from raco_ds.data.loading import PreferenceData
from raco_ds.data.records import Message, PreferencePair

__all__ = [
    "PreferenceDataset",
    "TokenizationConfig",
    "TokenizedPair",
    "render_pair",
    "tokenize_preference_data",
    "truncate_pair",
]

logger = logging.getLogger(__name__)

Overflow = Literal["truncate", "skip", "error"]


@dataclass(frozen=True, kw_only=True)
class TokenizationConfig:
    """How pairs become token ids."""

    max_length: int = 1024
    """Maximum tokens of one row (prompt + one response)."""
    max_prompt_length: int | None = None
    """Prompt tokens kept when a pair is too long (the prompt's end is kept); None = max_length // 2."""
    overflow: Overflow = "truncate"
    """Too-long pairs: ``truncate`` (count and log), ``skip`` (drop, count and log) or ``error`` (raise)."""
    use_chat_template: bool | None = None
    """True: require the tokenizer's chat template; False: plain format; None: template when present."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2 (one prompt and one response token)")
        if not 1 <= self.prompt_budget < self.max_length:
            raise ValueError(
                f"max_prompt_length={self.max_prompt_length} must be in [1, max_length={self.max_length}) so that "
                "truncation leaves at least one prompt and one response token"
            )
        if self.overflow not in ("truncate", "skip", "error"):
            raise ValueError(f"overflow={self.overflow!r}; use 'truncate', 'skip' or 'error'")

    @property
    def prompt_budget(self) -> int:
        """The effective max_prompt_length."""
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2


@dataclass(frozen=True)
class TokenizedPair:
    """A tokenised pair: one prompt, two responses (row = prompt_ids + response ids)."""

    prompt_ids: np.ndarray
    """Prompt token ids (int32), after truncation."""
    response_a_ids: np.ndarray
    """Response A token ids (int32), after truncation."""
    response_b_ids: np.ndarray
    """Response B token ids (int32), after truncation."""
    labels: tuple[int, ...]
    """One label in {+1, -1, 0} per objective."""
    objective: int
    """Owning objective (per-objective data) or -1 (shared pairs)."""
    pair_index: int
    """Index of the pair in its :class:`PreferenceDataset` (the reference-cache key)."""
    truncated: bool = False
    """Whether truncation shortened the prompt or a response."""


# ---- rendering ------------------------------------------------------------------------------


def _plain_turns(messages: Sequence[Message]) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages)


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_pair(tokenizer: Any, pair: PreferencePair, use_chat_template: bool | None = None) -> tuple[str, str, str]:
    """Render ``(prompt_text, response_a_text, response_b_text)`` for ``pair`` (see the module docstring)."""
    template = _has_template(tokenizer) if use_chat_template is None else use_chat_template
    if template and not _has_template(tokenizer):
        raise ValueError(
            "use_chat_template=True but the tokenizer has no chat_template; set one or use use_chat_template=None"
        )
    prompt = list(pair.prompt)
    if template:
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        responses = []
        for response in (pair.response_a, pair.response_b):
            full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
            if not full.startswith(prompt_text):
                # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property;
                # the plain response plus EOS is the closest faithful rendering.
                logger.warning("chat template does not extend the prompt for %s; using response + EOS", pair.source)
                full = prompt_text + response + (tokenizer.eos_token or "")
            responses.append(full[len(prompt_text) :])
        return prompt_text, responses[0], responses[1]
    bos = tokenizer.bos_token if tokenizer.bos_token and tokenizer.bos_token != tokenizer.eos_token else ""
    eos = tokenizer.eos_token or ""
    return bos + _plain_turns(prompt) + "Assistant: ", pair.response_a + eos, pair.response_b + eos


# ---- truncation -----------------------------------------------------------------------------


def truncate_pair(
    prompt: Sequence[int], response_a: Sequence[int], response_b: Sequence[int], config: TokenizationConfig
) -> tuple[Sequence[int], Sequence[int], Sequence[int], bool]:
    """Truncate a pair to ``config.max_length`` (prompt keeps its end, responses their start).

    Returns the three (possibly shortened) sequences and whether anything was cut.

    >>> cfg = TokenizationConfig(max_length=6, max_prompt_length=2)
    >>> truncate_pair([1, 2, 3, 4], [5, 6, 7, 8, 9], [10], cfg)
    ([3, 4], [5, 6, 7, 8], [10], True)
    """
    longest = max(len(response_a), len(response_b))
    if len(prompt) + longest <= config.max_length:
        return prompt, response_a, response_b, False
    keep_prompt = max(config.max_length - longest, min(len(prompt), config.prompt_budget))
    keep_response = config.max_length - keep_prompt
    prompt = prompt[len(prompt) - keep_prompt :]
    return prompt, response_a[:keep_response], response_b[:keep_response], True


# ---- the tokenised data set -------------------------------------------------------------------


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenised pairs, indexable by ``pair_index``; build it with :func:`tokenize_preference_data`."""

    def __init__(
        self,
        items: list[TokenizedPair],
        objective_names: tuple[str, ...],
        shared: bool,
        fingerprint: str,
        pad_token_id: int,
        num_truncated: int = 0,
        num_skipped: int = 0,
    ) -> None:
        """Hold ``items`` (``pair_index`` = position), the objective names, whether labels are shared,
        the fingerprint keying the reference cache, the padding id and the truncation counts."""
        self.items = items
        self.objective_names = objective_names
        self.shared = shared
        self.fingerprint = fingerprint
        self.pad_token_id = pad_token_id
        self.num_truncated = num_truncated
        self.num_skipped = num_skipped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TokenizedPair:
        return self.items[index]

    @property
    def num_objectives(self) -> int:
        """K, the number of objectives."""
        return len(self.objective_names)

    def indices_of_objective(self, objective: int) -> list[int]:
        """Pair indices owned by ``objective`` (per-objective data) or labelled non-tie by it (shared)."""
        if self.shared:
            return [i for i, item in enumerate(self.items) if item.labels[objective] != 0]
        return [i for i, item in enumerate(self.items) if item.objective == objective]

    def num_tokens(self) -> int:
        """Total tokens over all rows (both responses, each with its prompt)."""
        return sum(2 * len(i.prompt_ids) + len(i.response_a_ids) + len(i.response_b_ids) for i in self.items)


def _tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", ""),
        "vocab_size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "class": type(tokenizer).__name__,
    }


def _int32(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


def tokenize_preference_data(data: PreferenceData, tokenizer: Any, config: TokenizationConfig) -> PreferenceDataset:
    """Render, tokenise and truncate every pair of ``data`` (see the module docstring for the rules).

    The result's ``fingerprint`` hashes the data fingerprint, the config, the
    tokenizer's identity and every token id: it keys the reference cache.
    """
    texts = [render_pair(tokenizer, pair, config.use_chat_template) for pair in data.pairs]
    # One batched call per column: fast tokenizers parallelise and avoid per-call overhead.
    columns = [
        tokenizer([t[c] for t in texts], add_special_tokens=False)["input_ids"] if texts else [] for c in range(3)
    ]
    items: list[TokenizedPair] = []
    num_truncated = num_skipped = 0
    for pair, prompt, response_a, response_b in zip(data.pairs, *columns, strict=True):
        prompt, response_a, response_b, truncated = truncate_pair(prompt, response_a, response_b, config)
        if truncated:
            if config.overflow == "error":
                raise ValueError(
                    f"{pair.source}: pair is longer than max_length={config.max_length} tokens; raise max_length, "
                    "or set overflow='truncate' or 'skip'"
                )
            if config.overflow == "skip":
                num_skipped += 1
                continue
            num_truncated += 1
        items.append(
            TokenizedPair(
                _int32(prompt),
                _int32(response_a),
                _int32(response_b),
                pair.labels,
                pair.objective,
                len(items),
                truncated,
            )
        )
    if num_truncated or num_skipped:
        logger.warning(
            "tokenisation: %d of %d pairs longer than max_length=%d were %s",
            num_truncated + num_skipped,
            len(data.pairs),
            config.max_length,
            "truncated" if config.overflow == "truncate" else "skipped",
        )
    digest = hashlib.sha256(
        json.dumps(
            {"data": data.fingerprint, "config": asdict(config), "tokenizer": _tokenizer_identity(tokenizer)},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for item in items:
        for ids in (item.prompt_ids, item.response_a_ids, item.response_b_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(ids.tobytes())
        digest.update(np.asarray(item.labels, dtype=np.int8).tobytes())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreferenceDataset(
        items,
        data.objective_names,
        data.spec.shared,
        digest.hexdigest(),
        int(pad if pad is not None else 0),
        num_truncated,
        num_skipped,
    )
