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
``--resume strict`` stops on a damaged newest checkpoint instead of passing over it.

A user error (option, config, data, path, permission, full disk, damaged
checkpoint) prints one ``error:`` line and exits 2; ``--debug`` adds its traceback.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

# Before any heavy import: SLURM's USR1 (or a TERM) from the first moment on becomes a flag the
# loop polls, so an early signal ends in a checkpoint and a requeue, not in a dead job.
from raco_ds.preemption import PreemptionHandler  # noqa: E402 - stdlib only

STOPPER = PreemptionHandler().install() if __name__ == "__main__" else None

from raco_ds.trainer.config import ConfigError, help_text, parse_args  # noqa: E402

DEBUG_FLAG = "--debug"
"""Print the traceback of a user error too (the launcher's own flag; ``--debug.*`` options are config)."""


def main(argv: list[str]) -> int:
    """Parse, build and train; return the process exit status."""
    if "--help" in argv or "-h" in argv:
        print(help_text())
        print(f"  {DEBUG_FLAG}\n      Print the traceback of errors that are reported as one 'error:' line.")
        return 0
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        cfg = parse_args(argv)
    except ConfigError as err:  # a typo must not cost a DeepSpeed start-up
        print(f"error: {err}", file=sys.stderr)
        return 2

    from raco_ds.trainer.loop import train
    from raco_ds.user_errors import run_reporting_user_errors

    try:
        return run_reporting_user_errors(lambda: train(cfg, stopper=STOPPER), debug=debug)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


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
