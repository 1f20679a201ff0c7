"""Train an LLM on several conflicting preference objectives with RACO on DeepSpeed.

The README's main job (no GPU needed: SmolLM2-135M-Instruct, the bundled
PKU-SafeRLHF sample, RACO over helpful/harmless, ZeRO-3 on 2 CPU ranks):

    deepspeed --num_gpus 2 launchers/train.py --ds_config ds_configs/zero3.json

A one-minute smoke run (tiny model, real data), then a resumable longer one:

    deepspeed --num_gpus 2 launchers/train.py --ds_config ds_configs/zero3.json --preset tiny
    python launchers/train.py --preset tiny --output-dir outputs/t --checkpointing.save_every 4
    python launchers/train.py --preset tiny --output-dir outputs/t --max-steps 16 --resume

Options: ``--config run.yaml``, short ones (``--objectives helpful,harmless
--weights 0.3,0.7 --aggregator raco --c 0.4 --beta 0.2 --loss dpo --max-steps N
--output-dir DIR --resume``) and every config field as a dotted option
(``--optimisation.lr 1e-5``); ``--help`` lists them all with their docs.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raco_ds.trainer.config import ConfigError, help_text, parse_args


def main(argv: list[str]) -> int:
    """Parse, build and train; return the process exit status."""
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
    except ConfigError as err:  # a typo must not cost a DeepSpeed start-up
        print(f"error: {err}", file=sys.stderr)
        return 2

    from raco_ds.trainer.checkpoint import CheckpointError
    from raco_ds.trainer.loop import train

    try:
        train(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # Everything is written and the process groups are destroyed. Skip interpreter
    # finalization: gloo worker threads can still hold DeepSpeed's async work there and
    # abort the process ("terminate called without an active exception", pytorch#190489),
    # turning a finished run into exit 250 intermittently on CPU ranks.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
