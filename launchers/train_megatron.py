"""Train with RACO on megatron-core: tensor, pipeline and data parallelism, distributed optimizer.

Needs megatron-core (``pip install -e .[megatron]``) and one GPU per rank. From a pretrained HF
model (a folder or a short name such as ``smollm2-135m``, loaded offline) to an HF export in
``outputs/mcore/export`` that ``launchers/eval.py --model outputs/mcore`` evaluates:

    torchrun --nproc_per_node 6 launchers/train_megatron.py --model smollm2-135m \\
        --megatron.tensor_parallel 3 --model.dtype bf16 \\
        --data pku_saferlhf --objectives helpful,harmless --weights 0.3,0.7 --aggregator raco --c 0.4 \\
        --max-steps 100 --output-dir outputs/mcore --checkpointing.save_every 20 --resume \\
        --checkpointing.export true

A minimal run (the default: a tiny random GPT of the ``megatron.*`` shape, ``--model random-gpt``,
on the bundled PKU-SafeRLHF sample with a locally trained tokenizer; ``--model tiny`` starts from the
packaged tiny HF Llama instead):

    torchrun --nproc_per_node 2 launchers/train_megatron.py --megatron.tensor_parallel 2

The options are launchers/train.py's (same sections, short aliases, ``--config run.yaml``, strict
validation) plus the ``megatron.*`` section; ``--help`` lists them. A SIGUSR1 or SIGTERM checkpoints
at the end of the step and exits 85 (slurm/raco_megatron.sh requeues the job, which resumes with
``--resume``). A user error prints one ``error:`` line and exits 2; ``--debug`` adds its traceback.
See docs/megatron.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

# Before any heavy import: an early USR1/TERM becomes a flag the loop polls, not a dead job.
from raco_ds.preemption import PreemptionHandler  # noqa: E402 - stdlib only

STOPPER = PreemptionHandler().install() if __name__ == "__main__" else None

from raco_ds.megatron.config import megatron_help_text, parse_megatron_args  # noqa: E402
from raco_ds.trainer.config import ConfigError  # noqa: E402

DEBUG_FLAG = "--debug"
"""Print the traceback of a user error too (the launcher's own flag)."""


def main(argv: list[str]) -> int:
    """Parse, train, tear down; return the process exit status."""
    if "--help" in argv or "-h" in argv:
        print(megatron_help_text())
        return 0
    debug = DEBUG_FLAG in argv
    try:
        cfg = parse_megatron_args([arg for arg in argv if arg != DEBUG_FLAG])
    except ConfigError as err:  # a typo must not cost a Megatron start-up
        print(f"error: {err}", file=sys.stderr)
        return 2

    import logging

    import torch.distributed as dist

    from raco_ds.megatron.train import train
    from raco_ds.user_errors import run_reporting_user_errors

    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s raco] %(message)s", datefmt="%H:%M:%S")
    try:
        return run_reporting_user_errors(lambda: train(cfg, stopper=STOPPER), debug=debug)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
