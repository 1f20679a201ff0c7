"""A tiny model, deterministic per-(step, objective, rank, micro-batch) data, DeepSpeed configs and the
single-process full-gradient oracle that every RacoHook test compares against.

The oracle is what the authors' code does, materialised: per objective the full
gradient averaged over every rank's micro-batches, the Gram in float64, the
coefficients from the same ``raco_ds.solver.aggregate``, the combined gradient,
torch's global-norm clipping (DeepSpeed's formula: scale by max/(norm+1e-6) when
below 1), torch AdamW (what DeepSpeed builds for ``"torch_adam": true``) and
DeepSpeed's own WarmupLR class on the oracle's optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from raco_ds.solver import aggregate

VOCAB, EMBED, HIDDEN, OUT, EXTRA = 11, 7, 13, 3, 5
BATCH, LENGTH = 3, 4
LR, MIN_LR, WEIGHT_DECAY, CLIP = 2e-2, 4e-3, 0.01, 0.35
WARMUP_STEPS = 3


class TinyNet(nn.Module):
    """Odd-sized parameters (padding under ZeRO) and a head that only objective 1 touches."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.body = nn.Linear(EMBED, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, OUT)
        self.only_objective_1 = nn.Linear(HIDDEN, OUT, bias=False)

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        """Objective k's loss (k < 3) on one micro-batch; k = -1 returns all 3 losses of one forward (shared pairs)."""
        h = self.norm(torch.tanh(self.body(self.embed(tokens).mean(1))))
        out = self.head(h)
        losses = [self._loss(out, target, 0), self._loss(out + self.only_objective_1(h), target, 1)]
        # Objective 2 touches only_objective_1 only when tokens[0, 0] == 0, which
        # batch() arranges for even micro-batch indices: a parameter that an objective's last micro-batch
        # does not touch although its first one did.
        extra = self.only_objective_1(h) if int(tokens[0, 0]) == 0 else 0.0
        losses.append(self._loss(out - 0.5 * extra, target, 2))
        return torch.stack(losses) if k < 0 else losses[k]

    @staticmethod
    def _loss(out: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        # The objectives pull the shared head in different directions (conflict) and at different scales.
        goal = (target, -0.5 * target.flip(-1), target.roll(1, -1))[k]
        return ((out.float() - goal) ** 2).mean() * (1.0, 3.0, 0.5)[k]


def param_groups(model: nn.Module, grouped: bool) -> list[dict] | list[nn.Parameter]:
    """All parameters, or two optimizer groups (no weight decay on biases and norms), as HF trainers do."""
    if not grouped:
        return list(model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]


def make_model(seed: int = 0) -> TinyNet:
    """The same initial weights in every process."""
    torch.manual_seed(seed)
    return TinyNet()


def batch(step: int, k: int, rank: int, micro: int, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic data for one micro-batch (shared pairs: the same batch for every objective)."""
    g = torch.Generator().manual_seed(100_003 * step + 1_009 * (0 if shared else k) + 101 * rank + micro)
    tokens = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=g)
    tokens[0, 0] = micro % 2  # the same on every rank: see TinyNet.forward (objective 2)
    target = torch.randn(BATCH, OUT, generator=g)
    return tokens, target


def ds_config(
    stage: int,
    micro_batches: int = 1,
    offload: bool = False,
    bf16: bool = False,
    grad_accum_fp32: bool = True,
    clipping: float = CLIP,
    extra_zero: dict | None = None,
) -> dict:
    """A DeepSpeed config for the tiny model (torch AdamW, WarmupLR, clipping)."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even tiny parameters (padding!)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    zero.update(extra_zero or {})
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": clipping,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": WEIGHT_DECAY, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": MIN_LR,
                "warmup_max_lr": LR,
                "warmup_num_steps": WARMUP_STEPS,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
        if grad_accum_fp32:
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


@dataclass
class OracleStep:
    """One oracle step: the full Gram, the coefficients and the parameter update."""

    gram: torch.Tensor
    coefficients: torch.Tensor | None
    update: torch.Tensor
    skipped: bool = False
    grads: list[torch.Tensor] = field(default_factory=list)


class Oracle:
    """Single-process RACO with full gradients, the reference for the distributed hook."""

    def __init__(
        self,
        weights: list[float],
        aggregator: str,
        c: float,
        clipping: float = CLIP,
        optimizer: str = "adamw",
        grouped: bool = False,
        seed: int = 0,
    ) -> None:
        from deepspeed.runtime.lr_schedules import WarmupLR

        self.model = make_model(seed)
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.aggregator, self.c, self.clipping = aggregator, c, clipping
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        else:
            self.optimizer = torch.optim.AdamW(
                param_groups(self.model, grouped), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY
            )
        self.scheduler = WarmupLR(
            self.optimizer, warmup_min_lr=MIN_LR, warmup_max_lr=LR, warmup_num_steps=WARMUP_STEPS, warmup_type="linear"
        )

    def flat_params(self) -> torch.Tensor:
        """All parameters, flattened in named_parameters order."""
        return torch.cat([p.detach().reshape(-1).double() for p in self.model.parameters()])

    def objective_gradient(
        self, step: int, k: int, world: int, micro_batches: int, shared: bool = False
    ) -> list[torch.Tensor]:
        """Objective k's gradient averaged over every rank's micro-batches (what DeepSpeed's reduction holds)."""
        self.model.zero_grad(set_to_none=True)
        for rank in range(world):
            for j in range(micro_batches):
                loss = self.model(*batch(step, k, rank, j, shared), k) / (world * micro_batches)
                loss.backward()
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.model.parameters()]

    def step(
        self, step: int, world: int, micro_batches: int, shared: bool = False, poison: int | None = None
    ) -> OracleStep:
        """One optimizer step on the full per-objective gradients; ``poison`` makes that objective's gradient NaN."""
        before = self.flat_params()
        grads = [self.objective_gradient(step, k, world, micro_batches, shared) for k in range(len(self.weights))]
        if poison is not None:
            grads[poison][0].fill_(float("nan"))
        flat = torch.stack([torch.cat([g.reshape(-1) for g in gk]).double() for gk in grads])
        gram = flat @ flat.T
        if not bool(torch.isfinite(gram.diagonal()).all()):
            return OracleStep(gram, None, torch.zeros_like(before), skipped=True)
        coefficients = aggregate(self.aggregator, gram, self.weights, self.c).coefficients
        for index, p in enumerate(self.model.parameters()):
            p.grad = sum(float(coefficients[k]) * grads[k][index] for k in range(len(grads)))
        if self.clipping > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clipping)
        self.optimizer.step()
        self.scheduler.step()
        return OracleStep(gram, coefficients, self.flat_params() - before)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
