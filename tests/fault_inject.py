"""Run launchers/train.py in this process with one fault injected at a chosen point (test helper).

    python tests/fault_inject.py SPEC -- TRAIN_ARGS...

SPEC:
  after:SECONDS        kill -9 this process SECONDS after it started (any phase)
  kill:FUNC:MATCH      kill -9 just before the first call of FUNC whose arguments mention MATCH
  torn:FUNC:MATCH      let that call write its file, cut the file to half its size, then kill -9
  enospc:FUNC:MATCH    make that call raise OSError(ENOSPC), as a disk that fills does
  none                 no fault

FUNC is a dotted module attribute looked up at call time by its callers: torch.save,
os.replace, os.rename, shutil.rmtree, safetensors.torch.save_file. The patch is in
place before the launcher imports anything (transformers binds save_file on import).
"""

from __future__ import annotations

import errno
import importlib
import os
import runpy
import signal
import sys
import threading
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "launchers" / "train.py"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(action: str, dotted: str, match: str) -> None:
    module_name, _, attr = dotted.rpartition(".")
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    done = False

    def faulty(*args, **kwargs):
        nonlocal done
        if done or not any(match in str(a) for a in args):
            return original(*args, **kwargs)
        done = True
        if action == "kill":
            _die()
        if action == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))
        result = original(*args, **kwargs)  # torn: the write happens, then half of it is lost
        written = Path(args[1])
        os.truncate(written, written.stat().st_size // 2)
        _die()
        return result

    setattr(module, attr, faulty)


def main(argv: list[str]) -> None:
    """Install the fault described by argv[0], then run the launcher with the arguments after ``--``."""
    spec, separator, *train_args = argv
    assert separator == "--", "usage: fault_inject.py SPEC -- TRAIN_ARGS..."
    action, _, rest = spec.partition(":")
    if action == "after":
        threading.Timer(float(rest), _die).start()
    elif action in ("kill", "torn", "enospc"):
        dotted, _, match = rest.partition(":")
        _patch(action, dotted, match)
    elif action != "none":
        raise SystemExit(f"unknown fault {spec!r}")
    sys.argv = [str(TRAIN), *train_args]
    runpy.run_path(str(TRAIN), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
