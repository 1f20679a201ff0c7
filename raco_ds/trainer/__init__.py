"""The raco_ds trainer: config, the training loop on RacoHook, evaluation, checkpoints and export.

``launchers/train.py`` is the entry point; :func:`raco_ds.trainer.loop.train`
is the loop it calls. Submodules are imported lazily so that reading a config
never imports DeepSpeed.
"""

from raco_ds.trainer.config import ConfigError, TrainConfig, load_config, parse_args, save_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_args", "save_config"]
