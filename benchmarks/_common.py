"""What benchmarks/overhead.py, memory.py and scaling.py share: model, data, engines, steps, timing, output.

- :class:`ModelSpec` -- a small randomly initialised Llama (``raco_ds.tiny_models.tiny_config``);
- :func:`make_pairs` -- DPO pairs in either data shape (per-objective pairs or shared pairs);
- :func:`init_engine` -- a DeepSpeed engine (fp32, torch AdamW, the stage asked for);
- :class:`Steps` -- one optimizer step of each mode on one engine and one batch (linear baseline,
  RACO with per-objective passes / a shared forward, RACO with one-pass capture), each timed by phase;
- :class:`CollectiveCounter` -- counts calls and bytes of every torch.distributed collective by phase;
- :func:`interleave` -- repetitions of several modes in rotating order (medians by :func:`medians`);
- :func:`peak_rss` / :func:`rss` -- resident memory of this process (VmHWM / VmRSS from /proc);
- :func:`launch` -- run a body on N gloo CPU ranks and collect what each returns;
- :func:`print_table`, :func:`write_json`, :func:`machine` -- output with the run's conditions.

Nothing here is specific to one benchmark; each script keeps only its own measurement loop.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import pickle
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

RESULTS = REPO / "benchmarks" / "results"
"""Default folder of the JSON results."""

Shape = Literal["objective", "shared"]
SHAPES: tuple[Shape, ...] = ("objective", "shared")
"""Data shapes: per-objective pairs (HH-RLHF style) and shared pairs (PKU-SafeRLHF style)."""

__all__ = [
    "REPO",
    "RESULTS",
    "SHAPES",
    "ModelSpec",
    "MEDIUM",
    "PairData",
    "make_pairs",
    "row_logps",
    "dpo_losses",
    "ds_config",
    "init_engine",
    "destroy_engine",
    "Steps",
    "CollectiveCounter",
    "interleave",
    "medians",
    "rss",
    "peak_rss",
    "reset_peak_rss",
    "launch",
    "machine",
    "print_table",
    "write_json",
    "base_parser",
    "spec_from",
    "spec_dict",
    "MALLOC_ENV",
]


# ---------------------------------------------------------------------------------------------------
# Model and data


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A small Llama (untied embeddings, fp32) built from a config: nothing is downloaded."""

    vocab: int = 512
    """Vocabulary size (the embedding and the head dominate P for small hidden sizes)."""
    hidden: int = 128
    """Hidden size."""
    layers: int = 2
    """Decoder layers."""
    seq: int = 64
    """Tokens per row (prompt 8 + response)."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than ``heads``)."""
    seed: int = 0
    """Initial weights (identical on every rank)."""

    def build(self) -> torch.nn.Module:
        """The model, in training mode, ``use_cache`` off."""
        import transformers

        from raco_ds.tiny_models import tiny_config

        config = tiny_config(
            "llama", vocab_size=self.vocab, hidden_size=self.hidden, num_layers=self.layers, num_heads=self.heads,
            num_kv_heads=self.kv_heads, intermediate_size=3 * self.hidden, max_position_embeddings=self.seq, tie_word_embeddings=False,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        torch.manual_seed(self.seed)
        model = transformers.LlamaForCausalLM(config).train()
        model.config.use_cache = False
        return model

    def num_params(self) -> int:
        """P: trainable parameters (counted on the meta device, nothing allocated)."""
        with torch.device("meta"):
            return sum(p.numel() for p in self.build().parameters())


MEDIUM = ModelSpec(vocab=8192, hidden=512, layers=2, seq=16)
"""~15M parameters (60 MiB fp32): shards big enough that buffer bytes and the hook's local work
stand out of RSS noise and timer noise, rows few enough that a step stays near a second on CPU."""

_PROMPT = 8  # prompt tokens per row; the rest of the row is the scored response


@dataclass
class PairData:
    """One rank's preference pairs: rows [0, B) response A, rows [B, 2B) response B (PreferenceBatch layout)."""

    input_ids: torch.Tensor
    """(2B, T) long."""
    attention_mask: torch.Tensor
    """(2B, T) long (all ones: equal lengths keep every mode's FLOPs identical)."""
    response_mask: torch.Tensor
    """(2B, T) bool: scored response tokens."""
    labels: torch.Tensor
    """(K, B) long in {+1, -1, 0}: objective k prefers A (+1), B (-1), or the pair is not its (0)."""
    reference: torch.Tensor
    """(2B,) reference log-probs (constant: the reference model is the same for every mode)."""
    owner: torch.Tensor | None
    """(B,) objective owning each pair (per-objective pairs); None for shared pairs."""

    @property
    def num_pairs(self) -> int:
        """B."""
        return self.labels.shape[1]

    def pairs(self, index: torch.Tensor) -> PairData:
        """The sub-batch of pairs ``index`` (both rows of each pair)."""
        rows = torch.cat([index, index + self.num_pairs])
        return PairData(
            self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows], self.labels[:, index],
            self.reference[rows], None if self.owner is None else self.owner[index],
        )  # fmt: skip

    def of_objective(self, k: int) -> PairData:
        """Objective k's own pairs (per-objective data)."""
        assert self.owner is not None, "shared pairs have no per-objective rows"
        return self.pairs(torch.nonzero(self.owner == k).flatten())


def make_pairs(shape: Shape, k: int, pairs: int, spec: ModelSpec, seed: int) -> PairData:
    """Random DPO pairs for one rank: B = K x ``pairs`` pairs (2B rows) in both shapes, so both cost the same.

    ``shape="objective"``: ``pairs`` pairs per objective, each labelled by its owner only.
    ``shape="shared"``: every objective labels every pair (+1 or -1, no ties).
    """
    g = torch.Generator().manual_seed(seed)
    b = k * pairs
    ids = torch.randint(4, spec.vocab, (2 * b, spec.seq), generator=g)
    response = torch.zeros(2 * b, spec.seq, dtype=torch.bool)
    response[:, _PROMPT:] = True
    signs = torch.randint(0, 2, (k, b), generator=g) * 2 - 1
    owner = None
    if shape == "objective":
        owner = torch.arange(b) // pairs
        labels = torch.zeros(k, b, dtype=torch.long)
        labels[owner, torch.arange(b)] = signs[owner, torch.arange(b)]
    else:
        labels = signs.long()
    reference = -float(spec.seq - _PROMPT) * 6.0 + torch.randn(2 * b, generator=g)
    return PairData(ids, torch.ones_like(ids), response, labels, reference, owner)


def row_logps(model: Any, data: PairData) -> torch.Tensor:
    """(2B,) summed response log-probs of every row (``model``: the engine, or a forward callable for one-pass)."""
    from raco_ds.logprobs import response_logps

    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask, use_cache=False).logits
    return response_logps(logits, data.input_ids, data.response_mask)[0]


def dpo_losses(logps: torch.Tensor, data: PairData, beta: float = 0.2) -> torch.Tensor:
    """(K,) sigmoid-DPO losses; L_k averages objective k's non-tie pairs only (the same value in every mode)."""
    from raco_ds.losses import losses_from_margins, pair_margins

    b = data.num_pairs
    margins = pair_margins(logps[:b], logps[b:], reference_logps_a=data.reference[:b], reference_logps_b=data.reference[b:])
    return losses_from_margins(margins, data.labels, beta=beta)


# ---------------------------------------------------------------------------------------------------
# Engines


def ds_config(stage: int, micro_rows: int, *, comms_logger: bool = False) -> dict[str, Any]:
    """fp32 DeepSpeed config: torch AdamW, clipping 1.0, one micro-batch per objective (see RacoHook)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_rows,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if comms_logger:
        config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    return config


def init_engine(spec: ModelSpec, stage: int, micro_rows: int) -> Any:
    """A DeepSpeed engine around a fresh ``spec`` model (the process group must exist: see :func:`launch`)."""
    import deepspeed

    model = spec.build()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(stage, micro_rows))
    return engine


def destroy_engine(engine: Any) -> None:
    """Release what DeepSpeed holds for ``engine`` (hooks, buffers) so the next engine starts clean."""
    if hasattr(engine, "destroy"):
        engine.destroy()
    import gc

    gc.collect()


# ---------------------------------------------------------------------------------------------------
# Collective accounting


_COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
    "_all_gather_base", "_all_gather_base_coalesced", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all_single", "all_to_all", "gather", "scatter",
)  # fmt: skip


def _payload_bytes(args: tuple, kwargs: dict) -> int:
    """Bytes of a collective's message: its largest tensor argument (or list of tensors).

    That is DeepSpeed's comms-logger convention: the full buffer for all-reduce,
    the gathered output of an all-gather, the input of a reduce-scatter.
    """
    sizes = [0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            sizes.append(value.numel() * value.element_size())
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            sizes.append(sum(v.numel() * v.element_size() for v in value))
    return max(sizes)


class CollectiveCounter:
    """Counts calls and bytes of torch.distributed collectives, per (phase, op, dtype).

    DeepSpeed's own ``comms_logger`` sees only calls that go through ``deepspeed.comm``;
    the hook's K x K all-reduce and one-pass's reduce-scatters call torch.distributed
    directly. Wrapping torch.distributed itself catches both. :meth:`install` must run
    BEFORE ``deepspeed.init_distributed``: DeepSpeed caches some function objects
    (``all_gather_into_tensor``, ``reduce_scatter_tensor``) at initialisation.
    """

    def __init__(self) -> None:
        self.phase: str | None = None
        """Calls are attributed to this phase; None = not counted (the benchmark's own barriers)."""
        self.calls: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])

    def install(self) -> CollectiveCounter:
        """Wrap every collective in torch.distributed and torch.distributed.distributed_c10d."""
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            for name in _COLLECTIVES:
                fn = getattr(module, name, None)
                if fn is not None and not getattr(fn, "_counted", False):
                    setattr(module, name, self._wrap(name, fn))
        return self

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.phase is not None and not getattr(self, "_inside", False):
                dtypes = {v.dtype for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)}
                entry = self.calls[(self.phase, name.lstrip("_"), str(next(iter(dtypes), "-")).replace("torch.", ""))]
                entry[0] += 1
                entry[1] += _payload_bytes(args, kwargs)
            # A wrapped collective that calls another wrapped one (torch's own fallbacks) counts once.
            outer, self._inside = getattr(self, "_inside", False), True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside = outer

        counted._counted = True  # type: ignore[attr-defined]
        return counted

    @contextlib.contextmanager
    def counting(self, phase: str | None) -> Iterator[None]:
        """Attribute collectives inside the block to ``phase``."""
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def take(self) -> list[dict[str, Any]]:
        """The counts so far as rows {phase, op, dtype, calls, bytes}; resets the counter."""
        rows = [
            {"phase": p, "op": op, "dtype": dt, "calls": c, "bytes": b} for (p, op, dt), (c, b) in sorted(self.calls.items())
        ]
        self.calls.clear()
        return rows


_NO_COUNTER = CollectiveCounter()  # phase stays None: counts nothing


# ---------------------------------------------------------------------------------------------------
# Steps


@dataclass
class Steps:
    """One optimizer step of each mode on one engine and one rank's batch, timed by phase.

    Every mode returns ``{phase: seconds}`` with ``forward``, ``backward``
    (for RACO: all passes, forward and backward together, as ``passes``),
    ``hook`` (the hook's own work, split into ``hook_capture`` ... ``hook_write``)
    and ``optimizer`` (``engine.step()``), timed on this rank.
    """

    engine: Any
    data: PairData
    weights: list[float]
    counter: CollectiveCounter = field(default_factory=lambda: _NO_COUNTER)
    hook: Any = None
    """RacoHook for the per-objective / shared-forward modes (built lazily)."""
    onepass_hook: Any = None
    """A second RacoHook for one-pass capture (``hook.onepass()`` hands the capture the hook's rows
    for good: a separate hook keeps the K-pass mode's buffers as they are)."""
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        self._wrap_engine_step()

    def _wrap_engine_step(self) -> None:
        # hook.step() calls engine.step() itself: wrap it on the instance so that the optimizer's time
        # and collectives (ZeRO-1/2 all-gather the updated parameters there) are not billed to the hook.
        step, counter, self._seconds_optimizer = self.engine.step, self.counter, 0.0

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            started = self.clock()
            with counter.counting("optimizer"):
                out = step(*args, **kwargs)
            self._seconds_optimizer += self.clock() - started
            return out

        self.engine.step = timed_step

    @property
    def k(self) -> int:
        """K."""
        return len(self.weights)

    def make_hook(self) -> Any:
        """The K-pass hook (RACO, c = 0.4)."""
        from raco_ds.deepspeed import RacoHook

        if self.hook is None:
            self.hook = RacoHook(self.engine, self.weights, aggregator="raco", c=0.4)
        return self.hook

    def onepass_reason(self) -> str | None:
        """None when one-pass capture can run on this engine, else why not."""
        from raco_ds.deepspeed import EngineLayout, onepass_unsupported_reason

        hook = self.hook or self.onepass_hook
        if hook is not None:
            return hook.onepass_unsupported_reason()
        return onepass_unsupported_reason(EngineLayout.from_engine(self.engine))

    def _optimizer(self) -> float:
        seconds, self._seconds_optimizer = self._seconds_optimizer, 0.0
        return seconds

    # -- modes -----------------------------------------------------------------------------------------
    def linear(self) -> dict[str, float]:
        """The weighted-loss baseline (DPO-LW): one forward over all rows, one backward of sum_k w_k L_k."""
        engine, c = self.engine, self.clock
        t0 = c()
        with self.counter.counting("passes"):
            losses = dpo_losses(row_logps(engine, self.data), self.data)
            total = sum(w * losses[k] for k, w in enumerate(self.weights))
            # Without this barrier the backward's first gradient reduction would absorb the ranks' skew
            # and F would read low, B high; with it F is the slowest rank's forward (one gloo barrier, <1 ms).
            _barrier()
            t1 = c()
            engine.set_gradient_accumulation_boundary(True)
            engine.backward(total)
        t2 = c()
        engine.step()
        return {"forward": t1 - t0, "backward": t2 - t1, "passes": t2 - t0, "optimizer": self._optimizer()}

    def raco(self) -> dict[str, float]:
        """RACO through the hook: per-objective pairs one pass per objective; shared pairs
        ``hook.backward_shared`` (one forward + K backwards on ZeRO 0-2, K forwards on ZeRO-3)."""
        hook, engine, data, c = self.make_hook(), self.engine, self.data, self.clock
        t0 = c()
        with self.counter.counting("passes"):
            if data.owner is not None:
                for k in range(self.k):
                    mine = data.of_objective(k)
                    with hook.objective(k):
                        hook.backward(dpo_losses(row_logps(engine, mine), mine)[k])
            elif int(engine.zero_optimization_stage()) == 3:
                hook.backward_shared(lambda: dpo_losses(row_logps(engine, data), data))
            else:
                hook.backward_shared(dpo_losses(row_logps(engine, data), data))
        t1 = c()
        with self.counter.counting("hook"):
            stats = hook.step()
        return self._with_hook(stats, {"passes": t1 - t0}, c() - t1)

    def raco_onepass(self) -> dict[str, float]:
        """RACO with one-pass capture: one forward + one backward over all rows, one reduce-scatter per bucket."""
        from raco_ds.deepspeed import RacoHook
        from raco_ds.onepass import coefficients_from_losses

        if self.onepass_hook is None:
            self.onepass_hook = RacoHook(self.engine, self.weights, aggregator="raco", c=0.4)
        hook, data, c = self.onepass_hook, self.data, self.clock
        t0 = c()
        with self.counter.counting("scatter"), hook.onepass() as op:  # leaving it: order check, boundary state
            with self.counter.counting("passes"), op.record(rows=data.input_ids.shape[0]):
                logps = row_logps(op.forward, data)  # engine.module's forward (see DeepSpeedOnePass)
                losses = dpo_losses(logps, data)
                op.backward(logps.sum(), coefficients_from_losses(logps, losses))
            t1 = c()
        t2 = c()
        with self.counter.counting("hook"):
            stats = hook.step()
        return self._with_hook(stats, {"passes": t1 - t0, "scatter": t2 - t1}, c() - t2)

    def _with_hook(self, stats: Any, out: dict[str, float], seconds_step: float) -> dict[str, float]:
        out["optimizer"] = self._optimizer()
        parts = {f"hook_{p}": getattr(stats, f"seconds_{p}") for p in ("capture", "gram", "allreduce", "solve", "write")}
        # The capture happens during the passes (at each objective's end); the rest inside hook.step().
        out["passes"] -= parts["hook_capture"]
        out["hook"] = sum(parts.values())
        out["hook_other"] = max(seconds_step - out["optimizer"] - out["hook"] + parts["hook_capture"], 0.0)
        out.update(parts)
        return out


# ---------------------------------------------------------------------------------------------------
# Timing


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def interleave(
    modes: Mapping[str, Callable[[], dict[str, float]]], reps: int, warmup: int = 1
) -> dict[str, list[dict[str, float]]]:
    """Run every mode ``warmup + reps`` times, rotating the order each repetition.

    Rotating (A B C, B C A, C A B, ...) spreads drift and noisy neighbours over
    every mode alike, so ratios of medians stay meaningful on a shared machine.
    Each sample gets ``total``: wall time from a barrier before the step to a
    barrier after it (the slowest rank's step, what a job waits for), and ``cpu``:
    this rank's CPU time in the step (all its threads). On a shared machine wall
    time includes waiting for a core; CPU time is the work done, and its ratios
    are far steadier (it misses the cost of waiting on other ranks, which gloo
    does without spinning).
    """
    names = list(modes)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            _barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
            parts = dict(modes[name]())
            parts["cpu"] = time.process_time() - cpu_started
            _barrier()
            parts["total"] = time.perf_counter() - started
            if rep >= warmup:
                samples[name].append(parts)
    return samples


def medians(samples: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Median of every key over the samples."""
    keys = {key for sample in samples for key in sample}
    return {key: statistics.median(s[key] for s in samples if key in s) for key in sorted(keys)}


# ---------------------------------------------------------------------------------------------------
# Memory


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def rss() -> int:
    """Resident set size of this process now, bytes (VmRSS)."""
    return 1024 * _status_kib("VmRSS")


def peak_rss() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss`, bytes (VmHWM)."""
    return 1024 * _status_kib("VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_ARENA_MAX": "2"}
"""glibc settings for the ranks: every allocation over 64 KiB is its own mmap, returned to the OS
when freed, so RSS tracks live tensors (glibc's default raises the threshold to 32 MiB after the first
free, after which freed tensors stay resident and hide later peaks)."""


# ---------------------------------------------------------------------------------------------------
# Launching ranks


def _rank_entry(rank: int, world: int, port: int, out_dir: str, body: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)  # one thread per rank: the ranks share the machine's cores
    import warnings

    # torch 2.13 deprecates the *_tensor collective names that DeepSpeed and raco_ds still call.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch.distributed", category=FutureWarning)
    counter = CollectiveCounter().install()  # before DeepSpeed caches collective functions
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        result = body(rank, world, counter, *args)
        Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch(body: Callable[..., Any], world: int, *args: Any, env: Mapping[str, str] | None = None) -> list[Any]:
    """Run ``body(rank, world, counter, *args)`` on ``world`` spawned gloo CPU ranks; return each rank's result.

    ``counter`` is the rank's installed :class:`CollectiveCounter`. ``env`` is set
    before the ranks start (glibc reads its malloc settings at process start).
    """
    import torch.multiprocessing as mp

    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as out_dir:
            mp.spawn(_rank_entry, args=(world, port, out_dir, body, args), nprocs=world, join=True)
            return [pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes()) for r in range(world)]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------------
# Output


def machine() -> dict[str, Any]:
    """Date, host, CPU, load and versions: the conditions a number was measured under."""
    import deepspeed

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "git_head": commit.stdout.strip() or None,
    }


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
    """A plain aligned table (floats with 3 significant decimals unless pre-formatted)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    print(f"\n== {title} ==")
    print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in text:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    if note:
        print(note)


def write_json(path: str | Path, benchmark: str, config: Mapping[str, Any], results: Any, *, started: Mapping[str, Any]) -> Path:
    """Write {benchmark, machine at start and end, config, results} to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": benchmark, "machine": dict(started), "load_avg_1m_end": round(os.getloadavg()[0], 1),
               "config": dict(config), "results": results}  # fmt: skip
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path


def base_parser(doc: str, name: str) -> Any:
    """An argparse parser with the flags every benchmark has: --json, --quick, --reps, --warmup, model sizes."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(RESULTS / f"{name}.json"), help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="smallest settings (smoke test): tiny model, 1 rep")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each mode (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--vocab", type=int, help="model vocabulary")
    parser.add_argument("--hidden", type=int, help="model hidden size")
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--seq", type=int, help="tokens per row")
    return parser


def spec_from(args: Any, default: ModelSpec, quick: ModelSpec = ModelSpec(vocab=128, hidden=32, layers=1, seq=16)) -> ModelSpec:
    """The benchmark's model: ``default`` (or ``quick`` with --quick), overridden by explicit size flags."""
    spec = quick if args.quick else default
    chosen = {name: getattr(args, name) for name in ("vocab", "hidden", "layers", "seq") if getattr(args, name) is not None}
    return replace(spec, **chosen)


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    """The spec plus P, for JSON."""
    return {**asdict(spec), "params": spec.num_params()}
