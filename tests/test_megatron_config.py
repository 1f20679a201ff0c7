"""The Megatron launcher's config: the trainer's sections and parser plus ``megatron``; refusals; ``error:`` lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from raco_ds.megatron.config import MegatronTrainConfig, megatron_help_text, parse_megatron_args
from raco_ds.trainer.config import ConfigError, load_config, parse_args, save_config

LAUNCHER = Path(__file__).resolve().parent.parent / "launchers" / "train_megatron.py"


def test_shares_the_trainers_options_and_adds_megatron() -> None:
    argv = ["--objectives", "helpful,harmless", "--weights", "1,3", "--aggregator", "cagrad", "--c", "0.2",
            "--loss", "ipo", "--beta", "0.5", "--seed", "3", "--max-steps", "7", "--output-dir", "o",
            "--optimisation.lr", "2e-4", "--megatron.pipeline_parallel", "2", "--megatron.num_layers", "4"]  # fmt: skip
    cfg = parse_megatron_args(argv)
    trainer = parse_args(["--preset", "tiny", *argv[:-4]])
    assert cfg.objectives == trainer.objectives and cfg.loss == trainer.loss and cfg.raco.c == trainer.raco.c
    for name in ("lr", "seed", "max_steps"):
        assert getattr(cfg.optimisation, name) == getattr(trainer.optimisation, name), name
    assert cfg.objectives.weights == [0.25, 0.75]  # validated and normalised by the same checks
    assert cfg.raco.aggregator == "cagrad" and cfg.checkpointing.output_dir == "o"
    assert cfg.megatron.pipeline_parallel == 2 and cfg.megatron.num_layers == 4
    assert "--megatron.tensor_parallel" in megatron_help_text() and "--optimisation.lr" in megatron_help_text()


def test_saved_config_reloads_equal(tmp_path: Path) -> None:
    cfg = parse_megatron_args(["--megatron.tensor_parallel", "2", "--weights", "0.3,0.7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path, root=MegatronTrainConfig) == cfg
    assert parse_megatron_args(["--config", str(path)]) == cfg


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--megatron.tensor_parallel", "3"], "num_attention_heads=4 is not divisible by megatron.tensor_parallel=3"),
        (["--megatron.pipeline_parallel", "3"], "num_layers=2 is not divisible by megatron.pipeline_parallel=3"),
        (["--megatron.hidden_size", "0"], "megatron.hidden_size must be >= 1"),
        (["--model.lora.r", "8"], "model.lora.r=8 is not supported by the Megatron launcher"),
        (["--capture", "onepass"], "raco.capture='onepass' is not supported"),
        (["--logging.eval_every", "2"], "logging.eval_every=2 is not supported"),
        (["--model", "tiny", "--megatron.num_layers", "4"], "takes its shape from its HF config"),
        (["--checkpointing.export", "true"], "checkpointing.export=True needs an HF model"),
        (["--megatron.tensor_paralel", "2"], "did you mean --megatron.tensor_parallel"),
        (["--weights", "1,2,3"], "objectives.weights has 3 entries"),
    ],
)
def test_rejects_with_the_fix(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_megatron_args(argv)


def test_launcher_prints_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("train_megatron", LAUNCHER)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.main(["--megatron.tensor_parallel", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: megatron.num_attention_heads=4"), err
