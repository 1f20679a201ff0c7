"""Train with RACO on megatron-core: tensor, pipeline and data parallelism, distributed optimizer.

Needs megatron-core (``pip install -e .[megatron]``) and one GPU per rank:

    torchrun --nproc_per_node 8 launchers/train_megatron.py --tensor-parallel 2 --pipeline-parallel 2 \\
        --num-layers 8 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 4096 \\
        --dataset pku_saferlhf --weights 0.3,0.7 --aggregator raco --c 0.4 --bf16 --max-steps 100

A minimal run (tiny GPTModel, bundled PKU-SafeRLHF sample, locally trained tokenizer):

    torchrun --nproc_per_node 2 launchers/train_megatron.py --tensor-parallel 2

Every field of raco_ds.megatron.train.MegatronTrainConfig is a ``--flag`` (``--help`` lists them).
See docs/megatron.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raco_ds.megatron.train import MegatronTrainConfig, train  # noqa: E402
from raco_ds.trainer.config import field_docs  # noqa: E402


def parse_args(argv: list[str]) -> MegatronTrainConfig:
    """``--field-name value`` for every config field (booleans: ``--flag`` / ``--no-flag``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    docs = field_docs(MegatronTrainConfig)
    for f in dataclasses.fields(MegatronTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    return MegatronTrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str]) -> int:
    """Parse, train, tear down; return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = parse_args(argv)
    import torch.distributed as dist

    owns_process_group = not dist.is_initialized()  # torchrun: train() initialises it
    try:
        train(cfg)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
