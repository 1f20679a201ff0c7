"""raco_ds.megatron.train (what launchers/train_megatron.py runs) on 2 CPU ranks (real bundled data, tiny
GPTModel, RACO steps), and a CPU dry run of scripts/gpu_check_megatron.py.

One launch trains two layouts in turn: pipeline parallel 2 with tied embeddings
(the reference pass and the losses on the last stage) and tensor parallel 2.
Megatron's CUDA calls are patched by tests/megatron_shim.py (test only).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from multirank import run_ranks

pytestmark = pytest.mark.slow

LAUNCHER = Path(__file__).resolve().parent.parent / "launchers" / "train_megatron.py"
COMMON = ["--megatron.num_layers", "2", "--megatron.hidden_size", "32", "--megatron.num_attention_heads", "4",
          "--megatron.ffn_hidden_size", "64", "--data.max_length", "96", "--optimisation.micro_batch_size", "2",
          "--optimisation.gradient_accumulation_steps", "2", "--max-steps", "2", "--weights", "0.3,0.7",
          "--optimisation.lr", "1e-3"]


def _body(rank: int, world: int, out_dir: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state as ps

    from raco_ds.megatron.config import parse_megatron_args
    from raco_ds.megatron.train import train

    out = {}
    layouts = {"pp2": ["--megatron.pipeline_parallel", "2"], "tp2": ["--megatron.tensor_parallel", "2"]}
    for name, flags in layouts.items():
        out[name] = train(parse_megatron_args(COMMON + flags + ["--output-dir", f"{out_dir}/{name}"]))
        out[name + "_last_stage"] = ps.is_pipeline_last_stage()
        ps.destroy_model_parallel()
    return out


def test_launcher_trains_with_pipeline_and_tensor_parallelism(tmp_path: Path) -> None:
    results = run_ranks(_body, 2, str(tmp_path))
    for name in ("pp2", "tp2"):
        for rank, result in enumerate(results):
            history = result[name]
            assert len(history) == 2, (name, rank)
            for scalars in history:
                assert scalars["raco/skipped"] == 0.0, (name, rank, scalars)
                assert all(math.isfinite(v) for v in scalars.values()), (name, rank, scalars)
                assert "raco/coef/0" in scalars and "raco/coef/1" in scalars, (name, rank, scalars)
            if result[name + "_last_stage"]:
                assert history[0]["loss/helpful"] > 0 and history[0]["loss/harmless"] > 0, (name, rank, history[0])
        # Every rank of a step solved the same Gram (the adapter verifies; the logs agree too).
        assert results[0][name][-1]["raco/coef/1"] == results[1][name][-1]["raco/coef/1"]


def _gpu_check_body(rank: int, world: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_shim

    megatron_shim.install()
    import torch

    path = LAUNCHER.parent.parent / "scripts" / "gpu_check_megatron.py"
    spec = importlib.util.spec_from_file_location("gpu_check_megatron", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return {p: (script.check(p, torch.device("cpu")), script.TOLERANCES[p]) for p in script.TOLERANCES}


def test_gpu_check_script_dry_run_on_cpu() -> None:
    """scripts/gpu_check_megatron.py's checks pass on CPU under the shim (keeps the GPU script from rotting)."""
    (result,) = run_ranks(_gpu_check_body, 1)
    for precision, (errors, tolerances) in result.items():
        assert errors["update_successful"] == 1.0, (precision, errors)
        for key, tolerance in tolerances.items():
            assert errors[key] <= tolerance, (precision, key, errors)
