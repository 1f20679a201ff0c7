"""Megatron checkpoints on 2 CPU ranks: a stopped and resumed run is bit-identical to a straight one.

One 2-rank launch (data parallel 2, distributed optimizer, tiny GPTModel, the
bundled PKU-SafeRLHF sample) trains the same config twice:

- straight: 4 steps, a final checkpoint;
- stopped: a stop request (what SIGUSR1 sets) after step 2 checkpoints and
  exits with EXIT_REQUEUE (85); then the run is resumed with ``--resume``
  for the remaining 2 steps and the same final checkpoint.

The per-step logs (losses, coefficients, Gram, norms) must be equal, and the
final checkpoints' model and optimizer shards byte-identical (their manifest
hashes), which is what "bit-identical parameters" means for a sharded model
(it needs Adam's restored step count and zeroed bucket padding, see
raco_ds.megatron.checkpoint).
A resume under another tensor-parallel size is refused with an error that
names the layout to relaunch with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from multirank import run_ranks

pytestmark = pytest.mark.slow

FLAGS = ["--megatron.num_layers", "2", "--megatron.hidden_size", "32", "--megatron.num_attention_heads", "4",
         "--megatron.ffn_hidden_size", "64", "--data.max_length", "64", "--data.max_prompt_length", "32",
         "--optimisation.micro_batch_size", "2", "--optimisation.gradient_accumulation_steps", "1",
         "--max-steps", "4", "--optimisation.lr", "1e-3", "--checkpointing.save_final", "true"]  # fmt: skip


def _body(rank: int, world: int, root: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state as ps

    from raco_ds.megatron.config import parse_megatron_args
    from raco_ds.megatron.train import train
    from raco_ds.preemption import PreemptionHandler
    from raco_ds.trainer.checkpoint import CheckpointError

    class StopAfterSecondStep(PreemptionHandler):
        """Requests a stop (as SIGUSR1 would) when polled after the second step."""

        polls = 0

        def should_stop(self, group=None) -> bool:
            self.polls += 1
            if self.polls == 2:
                self.request()
            return super().should_stop(group)

    def run(name: str, *extra: str, stopper=None):
        try:
            return train(parse_megatron_args([*FLAGS, "--output-dir", f"{root}/{name}", *extra]), stopper=stopper)
        finally:
            ps.destroy_model_parallel()

    straight = run("straight")
    try:
        run("stopped", stopper=StopAfterSecondStep())
        status = None
    except SystemExit as stop:
        status = stop.code
    resumed = run("stopped", "--resume")
    try:
        run("stopped", "--resume", "--megatron.tensor_parallel", "2", "--max-steps", "5")
        refusal = ""
    except CheckpointError as err:
        refusal = str(err)
    return {"straight": straight, "resumed": resumed, "status": status, "refusal": refusal}


def _shard_hashes(run_dir: Path) -> dict[str, str]:
    manifest = json.loads((run_dir / "checkpoints" / "step_00000004" / "COMPLETE").read_text())
    return {name: entry["sha256"] for name, entry in manifest["files"].items() if name.endswith(".distcp")}


def _untimed(rows: list[dict]) -> list[dict]:
    """The logged rows without their timings (the only values that may differ)."""
    return [{key: value for key, value in row.items() if not key.startswith("time/")} for row in rows]


def _logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """One 2-rank launch: the straight run, the stopped and resumed run, the refused resume."""
    root = tmp_path_factory.mktemp("megatron_resume")
    return root, run_ranks(_body, 2, str(root))


def test_stop_request_checkpoints_exits_85_and_resumes(runs: tuple[Path, list[dict]]) -> None:
    root, results = runs
    for rank, result in enumerate(results):
        assert result["status"] == 85, (rank, result["status"])  # raco_ds.preemption.EXIT_REQUEUE
        assert len(result["straight"]) == 4 and len(result["resumed"]) == 2, rank
        # The first resumed step sees exactly the saved parameters and the saved data position.
        assert _untimed(result["straight"][2:3]) == _untimed(result["resumed"][:1]), rank
        assert "tensor_parallel" in result["refusal"] and "--megatron.tensor_parallel 1" in result["refusal"], result
    assert [row["step"] for row in _logged(root / "stopped")] == [1, 2, 3, 4]


def test_resume_is_bit_identical(runs: tuple[Path, list[dict]]) -> None:
    root, results = runs
    for rank, result in enumerate(results):
        assert _untimed(result["straight"][2:]) == _untimed(result["resumed"]), rank
    assert _untimed(_logged(root / "straight")) == _untimed(_logged(root / "stopped"))
    straight, resumed = _shard_hashes(root / "straight"), _shard_hashes(root / "stopped")
    assert straight and straight == resumed
