"""Runs that survive damage (issue 15), on real single-process runs of launchers/train.py (ZeRO-3, tiny
model, real data): kill -9 at every phase of a save and an export, then resume bit-identical to an
uninterrupted run; truncated, zeroed and bit-flipped files of every checkpoint file type; planted
pickles that must never run; a read-only output folder; a disk that fills during a save; a stop
signal in the first second."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from trainer_runs import check, deterministic, metrics, run_python, run_with_fault, start_python

from raco_ds.preemption import EXIT_REQUEUE
from raco_ds.trainer import checkpoint as ckpt
from raco_ds.trainer.integrity import find_damage

COMMON = ["--preset", "tiny", "--max-steps", "6", "--checkpointing.save_every", "2", "--logging.eval_every", "0",
          "--checkpointing.keep_last", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    check(run_python(*COMMON, "--output-dir", str(out)))
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    """Every logged step, the held-out result and the exported weights equal the reference run's."""
    from safetensors.torch import load_file

    got, want = metrics(out), metrics(reference)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert deterministic(got[step]) == deterministic(want[step]), f"step {step} differs"
    assert json.loads((out / "eval_after.json").read_text()) == json.loads((reference / "eval_after.json").read_text())
    a, b = load_file(out / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def assert_nothing_lost(out: Path) -> None:
    """The last two checkpoints are kept, every sealed one verifies, and `latest` names the newest.

    (A crash in the middle of keep_last's pruning may leave an older checkpoint, whole, for the next save.)
    """
    sealed = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert sealed[-2:] == ["step_00000004", "step_00000006"], sealed
    for name in sealed:
        assert find_damage(out / "checkpoints" / name) == []
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"


# ---------------------------------------------------------------------------
# kill -9 anywhere, then --resume until done: the same run, bit for bit.

# Each entry kills one process at the first matching call; the next one resumes. In order, they
# reach: start-up, a file of the first checkpoint, each step of its seal, keep_last's pruning at the
# last checkpoint, then (resumed at the last step) the export.
KILL_CHAIN = [
    "after:{early}",                                            # imports, DeepSpeed start-up
    "torn:torch.save:optim_states",                             # DeepSpeed's optimizer file, half written
    "kill:os.rename:.tmp-step",                                 # manifest written, folder not renamed
    "kill:os.replace:latest",                                   # renamed, `latest` not yet updated
    "kill:shutil.rmtree:checkpoints/.old-step_",                # keep_last deleting an old checkpoint
    "after:{any}",                                              # a random moment of the final job
    "torn:safetensors.torch.save_file:.tmp-export",             # the export's weights, half written
    "kill:os.rename:.tmp-export",                               # the export written, not renamed
]  # fmt: skip


def test_kill9_at_every_phase_then_resume_is_bit_identical(uninterrupted, tmp_path):
    seed = int(os.environ.get("RACO_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    out = tmp_path / "killed"
    killed = 0
    for spec in KILL_CHAIN:
        spec = spec.format(early=f"{rng.uniform(0.05, 1.5):.2f}", any=f"{rng.uniform(0.5, 6.0):.2f}")
        result = run_with_fault(spec, *COMMON, "--output-dir", str(out), "--resume")
        if spec.startswith("after:") and result.returncode == 0:
            continue  # the run finished before the timer: nothing was injected
        why = f"{spec} (seed {seed}): exit {result.returncode}\n{result.stderr[-3000:]}"
        assert result.returncode == -signal.SIGKILL, why
        killed += 1
    check(run_python(*COMMON, "--output-dir", str(out), "--resume"))
    assert_same_run(out, uninterrupted)
    assert_nothing_lost(out)
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / ".tmp-export").exists()
    print(f"\nkill -9 chain (seed {seed}): {killed} processes killed, 1 resumed run identical to the uninterrupted one")


# ---------------------------------------------------------------------------
# Damaged files: every file type, three kinds of damage.


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "zeroed": _zero, "bit-flipped": _flip}


def test_damaged_files_of_every_type_are_named_and_the_previous_checkpoint_is_used(uninterrupted, tmp_path):
    newest = uninterrupted / "checkpoints" / "step_00000006"
    names = sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file())
    assert {"COMPLETE", "trainer_state.json", "rng_rank0.pt"} <= set(names) and any("optim_states" in n for n in names)
    injected = 0
    for name in names:
        for how, damage in DAMAGE.items():
            root = tmp_path / f"{name.replace('/', '_')}-{how}"
            shutil.copytree(uninterrupted / "checkpoints", root)
            damage(root / "step_00000006" / name)
            injected += 1
            found = ckpt.find_resumable(root)
            assert found.folder == root / "step_00000004", (name, how)
            assert str(root / "step_00000006" / name) in found.damaged[0], (name, how, found.damaged)
            with pytest.raises(ckpt.CheckpointError, match="Rerun with --resume to continue from the newest intact"):
                ckpt.find_resumable(root, strict=True)
            shutil.rmtree(root)
    print(f"\ndamaged checkpoint files: {injected} faults injected ({len(names)} file types x {len(DAMAGE)}), "
          f"{injected} reported by path and passed over")  # fmt: skip


def test_flipped_optimizer_byte_resumes_from_the_previous_checkpoint_identically(uninterrupted, tmp_path):
    out = tmp_path / "flipped"
    shutil.copytree(uninterrupted, out)
    for leftover in ("export", "eval_after.json"):
        shutil.rmtree(out / leftover) if (out / leftover).is_dir() else (out / leftover).unlink()
    optim = next((out / "checkpoints" / "step_00000006" / "ds").glob("*optim_states.pt"))
    _flip(optim)

    strict = run_python(*COMMON, "--output-dir", str(out), "--resume", "strict")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr, strict.stderr[-3000:]
    assert f"error: --resume strict: checkpoint {optim.parents[1]} is damaged: {optim}" in strict.stderr
    assert "Rerun with --resume to continue from the newest intact checkpoint step_00000004" in strict.stderr

    resumed = check(run_python(*COMMON, "--output-dir", str(out), "--resume"))  # the suggested fix
    assert f"{optim}: its sha256 does not match the manifest" in resumed.stdout
    assert "at step 4" in resumed.stdout
    assert_same_run(out, uninterrupted)
    assert_nothing_lost(out)


def test_no_intact_checkpoint_stops_with_the_damaged_file(uninterrupted, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", root)
    for folder in root.glob("step_*"):
        _zero(folder / "trainer_state.json")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.find_resumable(root)
    text = str(err.value)
    assert f"no intact checkpoint to resume in {root}" in text and "trainer_state.json" in text
    assert "start a new run with another --output-dir" in text


# ---------------------------------------------------------------------------
# Planted pickles: never executed, wherever they are planted.


class _Evil:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _plant(path: Path, marker: Path) -> None:
    torch.save(_Evil(marker), path)


def _reseal(folder: Path) -> None:
    """Rewrite the manifest to match the planted files (an attacker who can write the folder can)."""
    from raco_ds.trainer.integrity import build_manifest, manifest_text

    (folder / "COMPLETE").unlink()
    (folder / "COMPLETE").write_text(manifest_text({"step": 6, **build_manifest(folder)}))


def test_planted_pickles_are_refused_and_never_run(uninterrupted, tmp_path):
    from raco_ds.trainer.scores_file import load_scores

    marker = tmp_path / "pwned"
    newest = uninterrupted / "checkpoints" / "step_00000006"
    pickles = sorted(str(p.relative_to(newest)) for p in newest.rglob("*.pt"))
    assert len(pickles) >= 3  # DeepSpeed's model and optimizer states, the RNG state
    planted = 0
    for name in pickles:
        for resealed in (False, True):
            root = tmp_path / f"{name.replace('/', '_')}-{resealed}"
            shutil.copytree(uninterrupted / "checkpoints", root)
            _plant(root / "step_00000006" / name, marker)
            if resealed:
                _reseal(root / "step_00000006")
            planted += 1
            found = ckpt.find_resumable(root)
            assert found.folder == root / "step_00000004", name
            reason = "refused by the safe unpickler" if resealed else "the manifest"
            assert reason in found.damaged[0], found.damaged
            with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
                ckpt._load_tensors(root / "step_00000006" / name)  # the trainer's own loader refuses it too
            shutil.rmtree(root)
    for scores_file in ("reference_logps.safetensors", "heldout_logps.safetensors"):
        _plant(tmp_path / scores_file, marker)
        planted += 1
        assert load_scores(tmp_path / scores_file, {"any": "key"}) is None  # unreadable as safetensors: recomputed
    assert not marker.exists()
    print(f"\nplanted pickles: {planted} planted, 0 executed")


def test_a_planted_checkpoint_metadata_pickle_is_refused_and_never_run(tmp_path):
    """torch.distributed.checkpoint's .metadata (Megatron's checkpoints) is a plain pickle: a planted one
    that matches a rewritten manifest is refused before PyTorch unpickles it."""
    import pickle

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step_00000002"
    dcp.save({"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16), "note": {"step": 2}},
             checkpoint_id=str(folder / "ds"), no_dist=True)  # fmt: skip
    _reseal_as_step(folder, 2)
    assert find_damage(folder) == []  # the real metadata passes
    marker = tmp_path / "pwned"
    (folder / "ds" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _reseal_as_step(folder, 2)
    damage = find_damage(folder)
    assert len(damage) == 1 and ".metadata: refused by the safe unpickler (Unsupported global: builtins.exec)" in damage[0]
    assert not marker.exists()


def test_a_planted_non_tensor_item_of_a_megatron_checkpoint_is_refused_and_never_run(tmp_path):
    """Non-tensor items of a torch.distributed.checkpoint (Megatron's _extra_state, ...) are unpickled
    by PyTorch with weights_only=False; one planted inside a .distcp file is refused first."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from raco_ds.trainer.integrity import _MetadataUnpickler

    folder = tmp_path / "step_00000002"
    dcp.save({"w": torch.randn(4, 3), "extra": [1, 2.5, "x" * 2000]}, checkpoint_id=str(folder / "ds"), no_dist=True)
    _reseal_as_step(folder, 2)
    assert find_damage(folder) == []
    with open(folder / "ds" / ".metadata", "rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    (where,) = [w for i, w in metadata.storage_data.items()
                if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)]  # fmt: skip
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(_Evil(marker), evil)
    planted = evil.getvalue()
    data = bytearray((folder / "ds" / where.relative_path).read_bytes())
    assert len(planted) <= where.length  # fits in place: only the item changes
    data[where.offset:where.offset + len(planted)] = planted
    (folder / "ds" / where.relative_path).write_bytes(bytes(data))
    _reseal_as_step(folder, 2)
    damage = find_damage(folder)
    assert len(damage) == 1 and "item extra" in damage[0] and "refused by the safe unpickler" in damage[0], damage
    assert not marker.exists()
    torch.load(io.BytesIO(bytes(data[where.offset:where.offset + where.length])), weights_only=False)
    assert marker.exists()  # what PyTorch's loader would have done with the planted item


def _reseal_as_step(folder: Path, step: int) -> None:
    from raco_ds.trainer.integrity import MANIFEST_NAME, build_manifest, manifest_text

    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    (folder / MANIFEST_NAME).write_text(manifest_text({"step": step, **build_manifest(folder)}))


def test_early_stop_signal_requeues_and_planted_reference_pickles_never_run(uninterrupted, tmp_path):
    out = tmp_path / "early"
    out.mkdir()
    marker = tmp_path / "pwned"
    for name in ("reference_logps.pt", "reference_logps.safetensors"):  # the old name and the current one
        _plant(out / name, marker)
    process = start_python(*COMMON, "--output-dir", str(out))
    time.sleep(0.3)  # still importing: before this issue, SIGUSR1 here killed the job
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == EXIT_REQUEUE, output[-3000:]
    assert "received SIGUSR1" in output and "stopped after step" in output
    check(run_python(*COMMON, "--output-dir", str(out), "--resume"))  # what the requeued job runs
    assert_same_run(out, uninterrupted)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# The file system says no: a read-only output folder, a disk that fills during a save.


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_output_folder_is_one_error_line(tmp_path):
    folder = tmp_path / "ro"
    mounted = _mount_tmpfs(folder, "1m")
    try:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        elif os.geteuid() != 0:
            folder.chmod(0o555)
        else:
            pytest.skip("root without permission to mount: cannot make a folder read-only for this process")
        result = run_python(*COMMON, "--output-dir", str(folder / "run"))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert str(folder / "run") in line
        assert ("Read-only file system" in line) if mounted else ("write access" in line)
        assert "--output-dir" in line
    finally:
        if mounted:
            _umount(folder)
        folder.chmod(0o755)


def test_disk_full_during_save_names_the_path_and_space_then_resumes_identically(uninterrupted, tmp_path):
    out = tmp_path / "disk"
    mounted = _mount_tmpfs(out, "4m")  # the first checkpoint (about 2.4 MiB) fits, the second does not
    try:
        if mounted:
            full = run_python(*COMMON, "--output-dir", str(out))
        else:  # no tmpfs here: the second checkpoint's optimizer file gets the error a full disk gives
            full = run_with_fault("enospc:torch.save:step_00000004", *COMMON, "--output-dir", str(out))
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
        (line,) = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        assert f"no space left on the device of {out / 'checkpoints'}" in line
        assert "while writing checkpoint .tmp-step_00000004: it needs about 2.4 MiB" in line
        assert "then rerun with --resume" in line
        assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial save is gone, its space freed
        assert ckpt.find_resumable(out / "checkpoints").folder.name == "step_00000002"
        if mounted:  # the fix the message gives: free space (here: a larger disk), then --resume
            subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        check(run_python(*COMMON, "--output-dir", str(out), "--resume"))
        assert_same_run(out, uninterrupted)
        assert_nothing_lost(out)
    finally:
        if mounted:
            _umount(out)


def test_disk_full_error_without_errno_is_recognised(tmp_path):
    from raco_ds.diskspace import disk_full_error, is_disk_full

    free = shutil.disk_usage(tmp_path).free
    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert is_disk_full(torch_style, tmp_path, needed=free + 1)
    assert not is_disk_full(torch_style, tmp_path, needed=1)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path, needed=1)
    text = str(disk_full_error(tmp_path, free + 2**20, "checkpoint x", then="rerun with --resume"))
    assert str(tmp_path) in text and "Free at least 1.0 MiB" in text
