"""The Megatron launcher from a pretrained HF model to an HF export, on 2 CPU ranks (gloo, tests/megatron_shim.py).

One 2-rank launch of raco_ds.megatron.train with ``--model tiny`` (the packaged
tiny HF Llama) at tensor parallel 2 and ``--checkpointing.export true``:

- 2 RACO steps: the held-out evaluation before/after is written (eval_before.json,
  eval_after.json, scored on every held-out pair); the export (``<run>/export``) loads with
  ``AutoModelForCausalLM``, differs from the input model (it trained), and
  ``launchers/eval.py --model <run>`` evaluates the run folder (its Megatron
  config.yaml included);
- 0 steps: the export equals the input model bitwise (HF -> Megatron TP=2 -> HF), and
  the held-out margins after are exactly 0 (policy and reference are the same weights).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from multirank import run_ranks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "tiny", "--megatron.tensor_parallel", "2", "--data.max_length", "64",
         "--data.max_prompt_length", "32", "--data.num_train_pairs", "16", "--data.num_eval_pairs", "8",
         "--optimisation.micro_batch_size", "2", "--optimisation.gradient_accumulation_steps", "1",
         "--max-steps", "2", "--optimisation.lr", "1e-3", "--weights", "0.3,0.7",
         "--checkpointing.export", "true", "--checkpointing.save_final", "false"]  # fmt: skip


def _body(rank: int, world: int, root: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state as ps

    from raco_ds.megatron.config import parse_megatron_args
    from raco_ds.megatron.train import train

    trained = train(parse_megatron_args(FLAGS + ["--output-dir", f"{root}/trained"]))
    ps.destroy_model_parallel()
    untrained = parse_megatron_args(FLAGS + ["--output-dir", f"{root}/untrained"])
    untrained.optimisation.max_steps = 0  # below the parser's minimum on purpose: export the loaded weights
    train(untrained)
    ps.destroy_model_parallel()
    return {"history": trained}


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_hf_model_trains_at_tp2_and_exports(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from raco_ds.models import resolve_model_path

    results = run_ranks(_body, 2, str(tmp_path))
    for rank, result in enumerate(results):
        assert len(result["history"]) == 2, rank
        for scalars in result["history"]:
            assert scalars["raco/skipped"] == 0.0 and all(math.isfinite(v) for v in scalars.values()), scalars

    original = _tensors(Path(resolve_model_path("tiny")))
    untrained = _tensors(tmp_path / "untrained" / "export")
    assert sorted(untrained) == sorted(original)
    assert all(torch.equal(untrained[name], original[name]) for name in original), "round trip is not bitwise"

    before, after = (json.loads((tmp_path / "untrained" / f"{n}.json").read_text()) for n in ("eval_before",
                                                                                            "eval_after"))
    assert before == after and after["margin"] == [0.0, 0.0], after
    after = json.loads((tmp_path / "trained" / "eval_after.json").read_text())
    assert after["num_pairs"] == [8, 8] and all(math.isfinite(v) for v in after["likelihood_accuracy"]), after

    export = tmp_path / "trained" / "export"
    trained = _tensors(export)
    assert sorted(trained) == sorted(original)
    assert any(not torch.equal(trained[name], original[name]) for name in original), "training changed nothing"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.num_hidden_layers == 2 and (export / "tokenizer.json").is_file()

    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_launcher", REPO / "launchers" / "eval.py")
    eval_launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_launcher)
    assert eval_launcher.main(["--model", str(tmp_path / "trained"), "--device", "cpu"]) == 0
    # eval.py (HF forward of the export) and the launcher (Megatron TP=2 forward) score the same pairs alike.
    report = json.loads((export / "heldout_eval.json").read_text())  # written beside the model it evaluated
    for metric in ("loss", "margin", "likelihood_accuracy"):
        assert report["metrics"][metric] == pytest.approx(after[metric], abs=1e-4), metric
