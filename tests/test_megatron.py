"""RacoMegatron on 2 CPU ranks (gloo) against a single-process oracle with full gradients.

One 2-rank launch runs three layouts in turn (parallel state re-initialised
between them), each a tiny megatron-core GPTModel (2 layers, hidden 16, vocab
32, tied embeddings) under DistributedDataParallel + the distributed optimizer
(Adam, fp32):

- ``dp2``: data parallel 2, owned shards split across ranks, several buckets,
  ``overlap_grad_reduce``, gradients through ``raco.backward`` (2 micro-batches
  per objective);
- ``tp2``: tensor parallel 2 (TP-duplicate filter: layer norms and row-parallel
  biases counted on TP rank 0 only), Megatron's no-pipelining schedule;
- ``pp2``: pipeline parallel 2 with tied embeddings (the last stage's copy is
  ``shared`` and skipped in the Gram, but still written and stepped), Megatron's
  1F1B schedule;
- ``dp2_plain``: data parallel 2 with the non-distributed optimizer (every rank
  owns whole gradients; the Gram is reduced over the model-parallel group).

dp2 then takes two more steps with a NaN in one objective on one rank only:
every rank must skip the first (on_nonfinite="skip") and raise on the second
(on_nonfinite="raise"), leaving the parameters alone.

The oracle, on every rank after the distributed step: the same model at TP=PP=1
in plain autograd, loaded with the gathered initial weights, one backward per
objective over all data-parallel micro-batches, the float64 Gram, the same
aggregator, and torch's AdamW on sum_k a_k g_k. Checked per layout: the Gram,
the coefficients, every owned written-back gradient slice, Megatron's
``get_grad_norm_fp32`` of the written-back gradients against the oracle
combination's norm, and the parameters after Megatron's ``optimizer.step()``.

Megatron's hard-coded CUDA calls are patched by tests/megatron_shim.py (test
only). Run: ``pytest -m slow tests/test_megatron.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from multirank import run_ranks

pytestmark = pytest.mark.slow

# name -> (tensor parallel, pipeline parallel, distributed optimizer)
LAYOUTS = {"dp2": (1, 1, True), "tp2": (2, 1, True), "pp2": (1, 2, True), "dp2_plain": (1, 1, False)}
WEIGHTS = [0.5, 0.3, 0.2]
AGGREGATOR, C = "raco", 0.4
MICRO_BATCHES, MICRO_BATCH, SEQ, VOCAB = 2, 2, 8, 32
LR = 1e-2
# Adam's first step is lr * g / (|g| + eps): with the usual eps = 1e-8 a float32
# rounding difference on a near-zero gradient entry moves that entry by a
# visible fraction of lr. A larger eps keeps the parameter check about the
# gradient, not about Adam's amplification of rounding.
ADAM_EPS = 1e-4


def _config(tp: int, pp: int):
    import torch
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0,
    )


def _gpt(config, pre: bool, post: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
        max_sequence_length=SEQ, pre_process=pre, post_process=post, share_embeddings_and_output_weights=True,
    )


def _micro_batch(k: int, dp_rank: int, m: int):
    """Objective k predicts token + k: the objectives pull the logits in conflicting directions."""
    import torch

    gen = torch.Generator().manual_seed(1000 * dp_rank + m)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    return tokens, positions, (tokens + k) % VOCAB


def _global_name(model, name: str) -> str:
    # Pipeline stages number their layers locally from 0; layer_number is global (1-based).
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _full_state(model) -> dict:
    """Every rank gets the whole model's parameters by global name (TP shards concatenated)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    mine = {}
    for name, param in model.named_parameters():
        if getattr(param, "shared", False):
            continue  # the last stage's tied copy of the word embeddings
        data = param.detach()
        if getattr(param, "tensor_model_parallel", False) and tp_group.size() > 1:
            pieces = [torch.empty_like(data) for _ in range(tp_group.size())]
            dist.all_gather(pieces, data.contiguous(), group=tp_group)
            data = torch.cat(pieces, dim=param.partition_dim)
        mine[_global_name(model, name)] = data.clone()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    full = {}
    for part in everyone:
        full.update(part)
    return full


def _owned_slices(raco, model) -> list:
    """(global name, TP partition dim or None, start, end, values) of every owned main_grad slice."""
    from megatron.core import parallel_state as ps

    names = {param: _global_name(model, n) for n, param in model.named_parameters()}
    out = []
    for section in raco.shard_layout.sections:
        for seg in section.segments:
            if getattr(seg.param, "shared", False):
                name = "embedding.word_embeddings.weight"
            else:
                name = names[seg.param]
            dim = seg.param.partition_dim if getattr(seg.param, "tensor_model_parallel", False) else None
            out.append((name, dim, ps.get_tensor_model_parallel_rank(), seg.start, seg.end, seg.view().clone()))
    return out


def _run_layout(tp: int, pp: int, distributed: bool, world: int) -> dict:
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from raco_ds.megatron import RacoMegatron

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    dp = world // (tp * pp)
    dp_rank = ps.get_data_parallel_rank()
    torch.manual_seed(0)
    config = _config(tp, pp)
    model = _gpt(config, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    # A pipeline needs Megatron's schedule (whatever DP is); DP without PP goes through raco.backward.
    use_schedule = pp > 1 or dp == 1
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=True,
        # dp2 without a pipeline: several buckets and asynchronous reduction, through raco.backward.
        overlap_grad_reduce=not use_schedule, bucket_size=None if use_schedule else 600,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    # clip_grad > 0 makes Megatron compute get_grad_norm_fp32 in step(); large enough never to clip.
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=1e6,
                        use_distributed_optimizer=distributed),
        [ddp],
    )
    initial = _full_state(model)

    raco = RacoMegatron(ddp, optimizer, WEIGHTS, aggregator=AGGREGATOR, c=C)
    misuse = _misuse_errors(raco)
    schedule = get_forward_backward_func()
    for k in range(len(WEIGHTS)):
        with raco.objective(k):
            if use_schedule:
                batches = iter([_micro_batch(k, dp_rank, m) for m in range(MICRO_BATCHES)])

                def forward_step(data_iterator, chunk):
                    tokens, positions, labels = next(data_iterator)
                    out = chunk(tokens, positions, None, labels=labels)
                    return out, lambda per_token: (per_token.float().mean(), {})

                schedule(
                    forward_step_func=forward_step, data_iterator=batches, model=[ddp],
                    num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                    forward_only=False,
                )
            else:
                for m in range(MICRO_BATCHES):
                    tokens, positions, labels = _micro_batch(k, dp_rank, m)
                    raco.backward(ddp(tokens, positions, None, labels=labels).float().mean() / MICRO_BATCHES)
    stats = raco.step()
    written = _owned_slices(raco, model)
    megatron_norm = float(optimizer.get_grad_norm())  # get_grad_norm_fp32 of the written-back grads
    stepped = _full_state(model)
    # The non-finite step calls the model directly, which a pipeline stage cannot do alone.
    nonfinite = _nonfinite_step(raco, ddp, model, dp_rank, stepped) if dp > 1 and distributed and pp == 1 else {}
    owned_numel = sum(s.numel for sec in raco.shard_layout.sections for s in sec.segments)
    counted_numel = sum(sec.counted_numel for sec in raco.shard_layout.sections)
    ps.destroy_model_parallel()

    oracle = _oracle(initial, dp)
    full_combined = oracle["combined"]
    slice_err = 0.0
    for name, dim, tp_rank, start, end, values in written:
        expected = full_combined[name]
        if dim is not None:
            expected = torch.chunk(expected, tp, dim=dim)[tp_rank]
        expected = expected.reshape(-1)[start:end]
        slice_err = max(slice_err, float((values - expected).abs().max()) if end > start else 0.0)
    combined_norm = oracle["combined_norm"]
    return {
        "gram_rel": float((stats.gram - oracle["gram"]).abs().max() / oracle["gram"].abs().max()),
        "coef_abs": float((stats.coefficients - oracle["coefficients"]).abs().max()),
        "coefficients": stats.coefficients.tolist(),
        "cosines": stats.cosines.tolist(),
        "clip_active": stats.clip_active,
        "slice_rel": slice_err / max(float(max(v.abs().max() for v in full_combined.values())), 1e-30),
        "norm_step_rel": abs(stats.grad_norm - combined_norm) / combined_norm,
        "norm_get_rel": abs(megatron_norm - combined_norm) / combined_norm,
        "param_abs_over_lr": max(float((stepped[n] - oracle["stepped"][n]).abs().max()) for n in stepped) / LR,
        "param_names_match": sorted(stepped) == sorted(oracle["stepped"]),
        "moved_over_lr": max(float((stepped[n] - initial[n]).abs().max()) for n in stepped) / LR,
        "owned_numel": owned_numel,
        "counted_numel": counted_numel,
        "skipped": stats.skipped,
        "update_successful": stats.update_successful,
        "misuse": misuse,
        **nonfinite,
    }


def _misuse_errors(raco) -> list[str]:
    """The contract's error paths, on a real adapter: each must raise the error meant."""
    import pytest

    with pytest.raises(RuntimeError, match="outside an objective block"):
        raco.backward(None)
    with pytest.raises(RuntimeError, match=r"before objective\(s\) \[0, 1, 2\] were captured"):
        raco.step()
    with pytest.raises(IndexError, match="out of range"), raco.objective(len(WEIGHTS)):
        pass
    with pytest.raises(RuntimeError, match="inside objective"), raco.objective(0), raco.objective(1):
        pass
    return ["ok"]


def _nonfinite_step(raco, ddp, model, dp_rank: int, before: dict) -> dict:
    """Objective 1 turns NaN on data-parallel rank 0 only: every rank must skip the step
    (on_nonfinite="skip"), then raise NonFiniteGradientError (on_nonfinite="raise")."""
    from raco_ds.megatron import NonFiniteGradientError

    def capture_with_nan() -> None:
        for k in range(len(WEIGHTS)):
            with raco.objective(k):
                tokens, positions, labels = _micro_batch(k, dp_rank, 0)
                loss = ddp(tokens, positions, None, labels=labels).float().mean()
                if k == 1 and dp_rank == 0:
                    loss = loss * float("nan")
                raco.backward(loss)

    capture_with_nan()
    stats = raco.step()
    raco.on_nonfinite = "raise"
    capture_with_nan()
    try:
        raco.step()
        raised = []
    except NonFiniteGradientError as err:
        raised = err.stats.nonfinite_objectives
    raco.on_nonfinite = "skip"
    after = _full_state(model)
    return {
        "nan_skipped": stats.skipped,
        "nan_objectives": stats.nonfinite_objectives,
        "nan_raised": raised,
        "nan_params_unchanged": all(bool((after[n] == before[n]).all()) for n in before),
    }


def _oracle(initial: dict, dp: int) -> dict:
    """Single process, TP = PP = 1, plain autograd: full per-objective gradients, materialised."""
    import torch
    from megatron.core import parallel_state as ps

    from raco_ds.solver import aggregate

    ps.initialize_model_parallel(1, 1)
    model = _gpt(_config(1, 1), True, True)
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(initial), f"oracle names differ: {sorted(set(params) ^ set(initial))}"
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(initial[name])
    names = sorted(params)
    grads = []
    for k in range(len(WEIGHTS)):
        model.zero_grad(set_to_none=True)
        loss = 0.0
        for r in range(dp):
            for m in range(MICRO_BATCHES):
                tokens, positions, labels = _micro_batch(k, r, m)
                loss = loss + model(tokens, positions, None, labels=labels).float().mean() / (dp * MICRO_BATCHES)
        loss.backward()
        grads.append({n: params[n].grad.detach().clone() for n in names})
    flat = torch.stack([torch.cat([g[n].reshape(-1) for n in names]).double() for g in grads])
    gram = flat @ flat.T
    coefficients = aggregate(AGGREGATOR, gram, torch.tensor(WEIGHTS, dtype=torch.float64), C).coefficients
    combined = {n: sum(float(coefficients[k]) * grads[k][n] for k in range(len(WEIGHTS))) for n in names}
    combined_norm = float(torch.cat([combined[n].reshape(-1).double() for n in names]).norm())
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=LR, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.0)
    for n in names:
        params[n].grad = combined[n].clone()
    optimizer.step()
    ps.destroy_model_parallel()
    return {
        "gram": gram, "coefficients": coefficients, "combined": combined, "combined_norm": combined_norm,
        "stepped": {n: params[n].detach().clone() for n in names},
    }


def _body(rank: int, world: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_shim

    megatron_shim.install()
    return {name: _run_layout(*layout, world) for name, layout in LAYOUTS.items()}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    """One 2-rank launch for every layout."""
    return run_ranks(_body, 2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_single_process_oracle(results: list[dict], layout: str) -> None:
    for rank, by_layout in enumerate(results):
        r = by_layout[layout]
        context = f"{layout} rank {rank}: {r}"
        assert not r["skipped"] and r["update_successful"], context
        assert r["gram_rel"] < 1e-5, context
        assert r["coef_abs"] < 1e-5, context
        assert r["slice_rel"] < 1e-5, context
        assert r["norm_step_rel"] < 1e-5 and r["norm_get_rel"] < 1e-5, context
        assert r["param_names_match"], context
        assert r["moved_over_lr"] > 0.1, context  # the step really moved the parameters
        assert r["param_abs_over_lr"] < 1e-4, context
    # Every rank solved the same Gram to the same coefficients (also verified inside the step).
    assert results[0][layout]["coefficients"] == results[1][layout]["coefficients"]


def test_shards_split_as_megatron_does(results: list[dict]) -> None:
    """DP2 owns half of the elements per rank; TP2 counts replicated params on one rank; PP2 skips the tied copy."""
    dp0, dp1 = results[0]["dp2"], results[1]["dp2"]
    assert dp0["owned_numel"] == dp0["counted_numel"] and dp1["owned_numel"] == dp1["counted_numel"]
    tp0, tp1 = results[0]["tp2"], results[1]["tp2"]
    assert tp0["owned_numel"] == tp1["owned_numel"] and tp1["counted_numel"] < tp0["counted_numel"] == tp0["owned_numel"]
    pp0, pp1 = results[0]["pp2"], results[1]["pp2"]
    assert pp0["counted_numel"] == pp0["owned_numel"] and pp1["owned_numel"] - pp1["counted_numel"] == VOCAB * 16
    plain0, plain1 = results[0]["dp2_plain"], results[1]["dp2_plain"]
    assert plain0["owned_numel"] == plain1["owned_numel"] == dp0["owned_numel"] + dp1["owned_numel"]


def test_misuse_raises_the_error_meant(results: list[dict]) -> None:
    assert all(by_layout[name]["misuse"] == ["ok"] for by_layout in results for name in LAYOUTS)


def test_nonfinite_objective_skips_on_every_rank(results: list[dict]) -> None:
    for by_layout in results:
        r = by_layout["dp2"]
        assert r["nan_skipped"] and r["nan_objectives"] == [1] and r["nan_params_unchanged"], r
        assert r["nan_raised"] == [1], r
