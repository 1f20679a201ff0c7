"""The trainer config: strict loading, CLI overrides, validation messages, round trip, help text."""

from __future__ import annotations

import dataclasses
import json

import pytest

from raco_ds.trainer.config import (
    ALIASES,
    PRESETS,
    ConfigError,
    TrainConfig,
    field_docs,
    _flat_fields,
    config_from_dict,
    help_text,
    load_config,
    parse_args,
    save_config,
)


def test_defaults_are_the_readme_main_job():
    cfg = parse_args([])
    assert cfg.model.name_or_path == "smollm2-135m"
    assert cfg.data.dataset == "helpsteer"
    assert cfg.objectives.names == ["helpfulness", "concise"] and cfg.objectives.weights == [0.3, 0.7]
    assert cfg.raco.aggregator == "raco" and cfg.raco.c == 0.4 and cfg.loss.beta == 0.2


def test_short_options_and_dotted_overrides():
    cfg = parse_args(
        ["--objectives", "helpful,harmless", "--weights", "0.3,0.7", "--aggregator", "cagrad", "--c", "0.2",
         "--beta", "0.1", "--loss", "ipo", "--max-steps", "7", "--output-dir", "x", "--resume",
         "--optimisation.lr=1e-5", "--model.trainable_last_blocks", "-1", "--local_rank=1", "--data.num_train_pairs", "null"]
    )  # fmt: skip
    assert cfg.objectives.weights == [0.3, 0.7]
    assert (cfg.raco.aggregator, cfg.raco.c, cfg.loss.beta, cfg.loss.name) == ("cagrad", 0.2, 0.1, "ipo")
    assert cfg.optimisation.max_steps == 7 and cfg.optimisation.lr == 1e-5
    assert cfg.checkpointing.output_dir == "x" and cfg.checkpointing.resume is True
    assert cfg.model.trainable_last_blocks == -1 and cfg.data.num_train_pairs is None


def test_weights_are_normalised_onto_the_simplex():
    assert parse_args(["--weights", "1,3"]).objectives.weights == [0.25, 0.75]


def test_precedence_preset_then_file_then_cli(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimisation:\n  max_steps: 3\n  lr: 0.5\nlogging:\n  eval_every: 2\n")
    cfg = parse_args(["--preset", "tiny", "--config", str(path), "--max-steps", "5"])
    assert cfg.model.name_or_path == "tiny"  # preset
    assert cfg.optimisation.lr == 0.5 and cfg.logging.eval_every == 2  # file over preset
    assert cfg.optimisation.max_steps == 5  # CLI over file


def test_round_trip_of_the_saved_config(tmp_path):
    cfg = parse_args(["--preset", "tiny", "--weights", "0.2,0.8", "--loss.options", "{label_smoothing: 0.1}"])
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(saved) == cfg
    # the file is also a valid --config
    assert parse_args(["--config", str(saved)]) == cfg


def test_json_config_files_work(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"raco": {"aggregator": "linear"}}))
    assert parse_args(["--config", str(path)]).raco.aggregator == "linear"


@pytest.mark.parametrize(
    "text, message",
    [
        ("optimisation:\n  learning_rat: 1\n", "unknown key 'optimisation.learning_rat' in .*bad.yaml"),
        (
            "optimisation:\n  max_step: 1\n",
            "unknown key 'optimisation.max_step' in .*bad.yaml; did you mean 'max_steps'",
        ),
        ("optimisaton:\n  lr: 1\n", "unknown key 'optimisaton'.*did you mean 'optimisation'"),
        ("raco:\n  c: [1, 2]\n", "raco.c must be a number"),
        ("optimisation:\n  max_steps: 1.5\n", "optimisation.max_steps must be an integer"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_rejects_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--optimisation.max_step", "3"],
            "unknown option --optimisation.max_step .*did you mean --optimisation.max_steps",
        ),
        (["--weights", "0.5"], "objectives.weights has 1 entries .* for 2 objectives"),
        (["--weights", "-1,2"], "objectives.weights must be finite, >= 0"),
        (["--aggregator", "nope"], "raco.aggregator='nope' is not registered; use one of"),
        (["--loss", "nope"], "loss.name='nope' is not a registered loss"),
        (["--c", "1.0"], r"raco.c must be in \[0, 1\)"),
        (["--capture", "sometimes"], "raco.capture='sometimes' is not allowed"),
        (["--model.dtype", "fp16"], "model.dtype='fp16' is not allowed"),
        (["--max-steps", "0"], "optimisation.max_steps must be >= 1"),
        (["--data.max_prompt_length", "500"], "data.max_prompt_length=500 must be in"),
        (["--objectives", "a,a", "--weights", "0.5,0.5"], "objectives.names has duplicates"),
        (["--preset", "huge"], "--preset 'huge' is unknown"),
        (["--max-steps"], "option --max-steps needs a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--config", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_rejects_bad_command_lines(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_config_from_dict_is_strict():
    with pytest.raises(ConfigError, match="unknown key 'model.nme'"):
        config_from_dict({"model": {"nme": "x"}})


def test_every_field_has_a_docstring_and_appears_in_help():
    sections = [TrainConfig] + [
        f.default_factory().__class__ for f in dataclasses.fields(TrainConfig) if f.name != "ds_config"
    ]
    for cls in sections:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    text = help_text()
    for dotted in _flat_fields():
        assert f"--{dotted} " in text
    for alias in ALIASES:
        assert alias in text


def test_presets_are_valid_configs():
    for name in PRESETS:
        parse_args(["--preset", name])
