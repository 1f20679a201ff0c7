"""Batched generation for held-out prompts: greedy or seeded sampling, capped at max_new_tokens.

Prompts arrive as token ids already rendered the way training rendered them (the tokenizer's
chat template with the generation prompt, or the plain "User: ... Assistant: " form for
tokenizers without one, raco_ds.data.tokenization), so the model is asked exactly what it
was trained on. Batches are left-padded so that every row's next token follows its prompt.

A response ends at the first end-of-sequence token (not included) or at ``max_new_tokens``
(``finished`` is False then: the length is censored at the cap, which judges of length should
report).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = ["GenerationConfig", "Sample", "generate"]


@dataclass(kw_only=True)
class GenerationConfig:
    """How responses are generated."""

    max_new_tokens: int = 128
    """Cap on generated tokens per response."""
    batch_size: int = 16
    """Prompts per generate() call."""
    sample: bool = False
    """False: greedy decoding (deterministic). True: sampling with temperature/top_p, seeded."""
    temperature: float = 1.0
    """Sampling temperature (sample=True only)."""
    top_p: float = 1.0
    """Nucleus sampling mass (sample=True only)."""
    seed: int = 0
    """Seed of the sampling RNG (sample=True): the same seed gives the same samples."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} must be >= 1"
            )
        if self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")

    def describe(self) -> str:
        """E.g. "greedy, <= 128 new tokens" (for reports)."""
        how = f"sampled (T={self.temperature:g}, top_p={self.top_p:g}, seed {self.seed})" if self.sample else "greedy"
        return f"{how}, <= {self.max_new_tokens} new tokens"

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


@dataclass
class Sample:
    """One prompt and the response the model generated for it."""

    prompt_ids: list[int]
    """The rendered prompt's token ids."""
    response_ids: list[int]
    """Generated token ids, without padding and without the end-of-sequence token."""
    prompt_text: str
    """The rendered prompt, decoded."""
    response_text: str
    """The response, decoded without special tokens."""
    finished: bool
    """True when the model ended the response itself (False: cut at max_new_tokens)."""
    cluster: str = ""
    """The prompt's group (bootstrap cluster), e.g. "g12"."""
    prompt_user: str | None = None
    """The last user turn as plain text, when known (judges with their own prompt format use it)."""


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    clusters: Sequence[str] | None = None,
    users: Sequence[str] | None = None,
) -> list[Sample]:
    """Generate one response per prompt (token ids), in order; ``clusters`` and ``users`` (the plain
    user requests) are carried into the samples."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    if config.sample:
        torch.manual_seed(config.seed)  # HF sampling draws from the global RNG
    samples: list[Sample] = []
    try:
        for start in range(0, len(prompts), config.batch_size):
            batch = [list(map(int, p)) for p in prompts[start : start + config.batch_size]]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            options = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0} \
                if config.sample else {"do_sample": False}
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=config.max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos, **options)
            for row, prompt in enumerate(batch):
                generated = out[row, width:].tolist()
                finished = eos in generated
                response = generated[: generated.index(eos)] if finished else generated
                samples.append(Sample(
                    prompt_ids=prompt,
                    response_ids=response,
                    prompt_text=tokenizer.decode(prompt),
                    response_text=tokenizer.decode(response, skip_special_tokens=True),
                    finished=finished,
                    cluster=str(clusters[start + row]) if clusters is not None else str(start + row),
                    prompt_user=users[start + row] if users is not None else None,
                ))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return samples
