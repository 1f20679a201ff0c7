"""Fast trainer unit tests (no DeepSpeed launch): DeepSpeed config filling, checkpoint atomicity and
resume refusal, resumable data streams, the held-out split, evaluation metrics, freezing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from raco_ds.trainer import checkpoint as ckpt
from raco_ds.trainer.config import ConfigError, parse_args
from raco_ds.trainer.ds_config import DEFAULT_DS_CONFIG, fill_ds_config, read_ds_config, zero_stage

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# DeepSpeed config: "auto" filled from the trainer, concrete values must agree.


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_ds_configs_fill_completely(name):
    raw, where = read_ds_config(REPO / "ds_configs" / name)
    cfg = parse_args(["--optimisation.micro_batch_size", "3", "--optimisation.gradient_accumulation_steps", "2"])
    filled = fill_ds_config(raw, cfg, world_size=4, hidden_size=64, name=where)
    assert filled["train_micro_batch_size_per_gpu"] == 3
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 3 * 2 * 4
    assert filled["optimizer"]["params"]["lr"] == cfg.optimisation.lr
    assert filled["scheduler"]["params"]["total_num_steps"] == cfg.optimisation.max_steps
    assert filled["bf16"]["enabled"] is False
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert "auto" not in json.dumps(filled)
    assert zero_stage(filled) == int(name[4])


def test_default_ds_config_is_zero3():
    raw, _ = read_ds_config(None)
    assert Path(DEFAULT_DS_CONFIG).name == "zero3.json" and zero_stage(raw) == 3


def test_bf16_follows_the_model_dtype():
    raw, _ = read_ds_config(None)
    filled = fill_ds_config(raw, parse_args(["--model.dtype", "bf16"]), world_size=1, hidden_size=8)
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False


def test_rejects_ds_config_that_disagrees_with_the_cli():
    raw = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 4,
        "train_batch_size": 999,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.1}},
        "gradient_clipping": 1.0,
    }
    cfg = parse_args(["--optimisation.micro_batch_size", "2"])
    with pytest.raises(ConfigError) as err:
        fill_ds_config(raw, cfg, world_size=2, hidden_size=8, name="my.json")
    text = str(err.value)
    assert "train_micro_batch_size_per_gpu=8 but --optimisation.micro_batch_size=2" in text
    assert 'set it to "auto" in my.json' in text and "pass --optimisation.micro_batch_size 8" in text
    assert "gradient_accumulation_steps=4 but --optimisation.gradient_accumulation_steps=1" in text
    assert "train_batch_size=999" in text and "= 4" in text
    assert "optimizer.params.lr=0.1" in text
    assert "gradient_clipping" not in text  # 1.0 agrees with the default


def test_allows_ds_config_with_agreeing_concrete_values():
    raw = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4}
    filled = fill_ds_config(raw, parse_args(["--optimisation.micro_batch_size", "2"]), world_size=2, hidden_size=8)
    assert filled == raw


def test_rejects_auto_that_nothing_fills():
    with pytest.raises(
        ConfigError, match=r"no trainer value fills the \"auto\" of \['zero_optimization.sub_group_size'\]"
    ):
        fill_ds_config({"zero_optimization": {"sub_group_size": "auto"}}, parse_args([]), world_size=1, hidden_size=8)


def test_missing_ds_config_file_names_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_ds_config(tmp_path / "nope.json")


# ---------------------------------------------------------------------------
# Checkpoints: atomic, only complete ones resume, and a wrong resume is refused.


class _FakeEngine:
    """Writes what DeepSpeed would (a folder per tag); can crash half-way."""

    def __init__(self, crash: bool = False) -> None:
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if self.crash:
            raise RuntimeError("disk full")


def _state(step: int, objectives=("helpful", "harmless"), world: int = 1) -> ckpt.TrainerState:
    return ckpt.TrainerState(
        step=step, objectives=list(objectives), weights=[0.5, 0.5], aggregator="raco", world_size=world,
        data_position={"streams": [{"epoch": 0, "taken": step}]},
    )  # fmt: skip


def test_checkpoint_is_complete_and_latest(tmp_path):
    ckpt.save_checkpoint(_FakeEngine(), tmp_path, _state(2))
    path = ckpt.save_checkpoint(_FakeEngine(), tmp_path, _state(4))
    assert (path / ckpt.COMPLETE).is_file() and (path / "ds" / "mp_rank_00_model_states.pt").is_file()
    assert ckpt.find_latest(tmp_path) == path == tmp_path / "step_00000004"
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    assert ckpt.read_trainer_state(path).data_position == {"streams": [{"epoch": 0, "taken": 4}]}
    assert (path / "rng_rank0.pt").is_file()


def test_crash_mid_save_never_leaves_a_valid_looking_checkpoint(tmp_path):
    good = ckpt.save_checkpoint(_FakeEngine(), tmp_path, _state(2))
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(_FakeEngine(crash=True), tmp_path, _state(4))
    assert not (tmp_path / "step_00000004").exists()
    assert ckpt.find_latest(tmp_path) == good
    # a folder under a final name but without the marker (e.g. copied by hand) is ignored too
    (tmp_path / "step_00000009").mkdir()
    assert ckpt.find_latest(tmp_path) == good
    # the next save cleans the debris of the crashed one
    ckpt.save_checkpoint(_FakeEngine(), tmp_path, _state(6))
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_prunes_old_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(_FakeEngine(), tmp_path, _state(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_keep_last_never_deletes_the_checkpoint_just_sealed(tmp_path):
    # A resume passed over damaged step 6 and continues from step 2: saving step 3 with keep_last=1
    # must keep step 3 (the newest verified one) and leave step 6 for this run to replace.
    for step in (2, 6):
        ckpt.save_checkpoint(_FakeEngine(), tmp_path, _state(step))
    path = ckpt.save_checkpoint(_FakeEngine(), tmp_path, _state(3), keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert path.is_dir() and not list(tmp_path.glob(".old-*"))


def test_rejects_resume_with_other_objectives(tmp_path):
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_compatible(_state(3), tmp_path, ["helpful", "harmless", "honest"], 1)
    text = str(err.value)
    assert "K=2 objectives ['helpful', 'harmless']" in text and "K=3" in text
    assert "--objectives helpful,harmless" in text and "--output-dir" in text
    with pytest.raises(ckpt.CheckpointError, match="--objectives helpful,harmless"):
        ckpt.check_compatible(_state(3), tmp_path, ["harmless", "helpful"], 1)


def test_rejects_resume_with_another_world_size(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="saved by 2 ranks and this run has 1"):
        ckpt.check_compatible(_state(3, world=2), tmp_path, ["helpful", "harmless"], 1)


def test_rejects_resume_with_another_loss(tmp_path):
    from raco_ds.trainer.config import parse_args

    dpo = ckpt.loss_identity(parse_args(["--preset", "tiny"]))
    saved = dataclasses.replace(_state(3), loss=dpo)
    assert ckpt.check_compatible(saved, tmp_path, ["helpful", "harmless"], 1, loss=dpo) == []
    for other in (["--loss.beta", "0.3"], ["--loss", "ipo"]):
        changed = ckpt.loss_identity(parse_args(["--preset", "tiny", *other]))
        with pytest.raises(ckpt.CheckpointError, match=r"trained with loss dpo \(beta 0.2.*--loss dpo --loss.beta 0.2"):
            ckpt.check_compatible(saved, tmp_path, ["helpful", "harmless"], 1, loss=changed)
    # A checkpoint from before the loss was recorded is not checked.
    assert ckpt.check_compatible(_state(3), tmp_path, ["helpful", "harmless"], 1, loss=dpo) == []


def test_allows_resume_with_other_weights_but_says_so(tmp_path):
    notes = ckpt.check_compatible(_state(3), tmp_path, ["helpful", "harmless"], 1, [0.2, 0.8], "raco")
    assert notes and "weights [0.2, 0.8]" in notes[0]


# ---------------------------------------------------------------------------
# Data: the split and the resumable streams.


@pytest.fixture(scope="module")
def tiny_data():
    from raco_ds.models import load_tokenizer

    cfg = parse_args(["--preset", "tiny", "--data.num_train_pairs", "40", "--data.num_eval_pairs", "8"])
    return cfg, load_tokenizer(cfg.model.name_or_path)


def test_split_is_seeded_and_disjoint(tiny_data):
    from raco_ds.trainer.data import build_data

    cfg, tokenizer = tiny_data
    _, _, split, _ = build_data(cfg, tokenizer, rank=0, world=1)
    _, _, again, _ = build_data(cfg, tokenizer, rank=0, world=2)
    assert split.eval_indices == again.eval_indices and split.train_pools == again.train_pools
    assert len(split.eval_indices) == 8 and len(split.train_pools[0]) == 40
    assert not set(split.eval_indices) & set(split.train_pools[0])


def test_stream_resumes_at_the_same_pair(tiny_data):
    from raco_ds.trainer.data import build_data

    cfg, tokenizer = tiny_data
    _, _, _, (stream,) = build_data(cfg, tokenizer, rank=1, world=2)
    seen = [stream.next().pair_index.tolist() for _ in range(7)]  # crosses an epoch (40 / (2*4) = 5 per epoch)
    _, _, _, (fresh,) = build_data(cfg, tokenizer, rank=1, world=2)
    for _ in range(3):
        fresh.next()
    position = fresh.state_dict()
    _, _, _, (resumed,) = build_data(cfg, tokenizer, rank=1, world=2)
    resumed.load_state_dict(position)
    assert [resumed.next().pair_index.tolist() for _ in range(4)] == seen[3:]
    assert position == {"epoch": 0, "taken": 3} and resumed.state_dict() == {"epoch": 1, "taken": 2}


def test_rejects_too_little_data(tiny_data):
    from raco_ds.trainer.data import build_data

    _, tokenizer = tiny_data
    bad = parse_args(["--preset", "tiny", "--data.num_eval_pairs", "400"])
    with pytest.raises(ConfigError, match=r"data.num_eval_pairs=400 \(whole prompt groups\) leaves none to train on"):
        build_data(bad, tokenizer, rank=0, world=1)
    bad = parse_args(["--preset", "tiny", "--data.num_train_pairs", "4", "--optimisation.micro_batch_size", "4"])
    with pytest.raises(ConfigError, match="raise --data.num_train_pairs or lower the batch size"):
        build_data(bad, tokenizer, rank=0, world=2)


def test_rejects_objectives_the_data_does_not_have(tiny_data):
    from raco_ds.trainer.data import build_data

    _, tokenizer = tiny_data
    bad = parse_args(["--preset", "tiny", "--objectives", "helpful,honest"])
    with pytest.raises(ConfigError, match="pass --objectives helpful,harmless"):
        build_data(bad, tokenizer, rank=0, world=1)


# ---------------------------------------------------------------------------
# Evaluation metrics and freezing.


def test_evaluate_metrics_from_scores(tiny_data):
    from raco_ds.trainer.eval import PairScores, evaluate
    from raco_ds.trainer.data import build_data

    cfg, tokenizer = tiny_data
    dataset, _, split, _ = build_data(cfg, tokenizer, rank=0, world=1)
    n = len(dataset)
    lengths = torch.full((n, 2), 4, dtype=torch.long)
    reference = PairScores(torch.full((n, 2), -10.0, dtype=torch.float64), lengths)
    # The policy raised exactly the response each pair's "helpful" label prefers.
    helpful = torch.tensor([dataset[i].labels[0] for i in range(n)])
    policy_logps = reference.logps.clone()
    policy_logps[:, 0] += (helpful > 0).double()
    policy_logps[:, 1] += (helpful < 0).double()
    result = evaluate(PairScores(policy_logps, lengths), reference, dataset, split.eval_indices, loss="dpo", beta=0.2)
    assert result["accuracy"][0] == 1.0 and result["likelihood_accuracy"][0] == 1.0
    assert result["margin"][0] == pytest.approx(0.2)
    before = evaluate(reference, reference, dataset, split.eval_indices, loss="dpo", beta=0.2)
    assert before["accuracy"] == [0.0, 0.0] and before["loss"][0] == pytest.approx(0.6931, abs=1e-4)


def test_freeze_bottom_trains_only_the_last_blocks():
    from raco_ds.models import load_model
    from raco_ds.trainer.model import freeze_bottom

    model = load_model("tiny")
    trainable, total = freeze_bottom(model, parse_args(["--preset", "tiny", "--model.trainable_last_blocks", "1"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)
    assert 0 < trainable < total
    with pytest.raises(ConfigError, match="model.trainable_last_blocks=5 but the model has 2 blocks"):
        freeze_bottom(load_model("tiny"), parse_args(["--preset", "tiny", "--model.trainable_last_blocks", "5"]))
