"""The lock of a run folder: one ``python -m ugd.train`` at a time trains into an ``--output_dir``.

    with run_lock(output_dir):          # ConfigError (one line) when another process holds it
        ...train...
    run_lock_holder(output_dir)         # None, or the one-line reason a trainer still runs there

Two trainers writing checkpoints into one folder corrupt each other's saves and rotations; that happens
when a study is killed and its orphaned trainer goes on while a rerun starts the same run again. The
lock is ``<output_dir>/.ugd-train.lock``, taken with ``filelock`` (``flock`` on Unix): the kernel
releases it when its process ends, however it ends (kill -9 included), so a stale lock never blocks a
rerun, and ``--resume_from_checkpoint`` into the same folder takes it again like any new run. Under
torchrun only the global rank 0 takes it (the ranks of one job share the folder; a second job's rank
0 is refused and torchrun stops its other ranks).
"""

from __future__ import annotations

import contextlib
import os

from filelock import FileLock, Timeout

from .args import ConfigError

LOCK_NAME = ".ugd-train.lock"


def lock_path(output_dir) -> str:
    return os.path.join(os.path.abspath(os.fspath(output_dir)), LOCK_NAME)


def _held_message(output_dir) -> str:
    return (f"--output_dir {os.path.abspath(os.fspath(output_dir))} is locked by another ugd.train process that "
            f"trains into it ({lock_path(output_dir)}); wait for it to end or stop it, or name another --output_dir")


@contextlib.contextmanager
def run_lock(output_dir, *, enabled: bool = True):
    """Holds the lock of ``output_dir`` for the block (``enabled=False``: does nothing, for ranks > 0).
    A folder this call created and that holds nothing but the lock afterwards (the run failed before
    writing anything) is removed again, so a refused run leaves no trace."""
    if not enabled:
        yield
        return
    folder = os.path.abspath(os.fspath(output_dir))
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    lock = FileLock(lock_path(folder), timeout=0)  # try once: a second trainer is refused, not queued
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(_held_message(folder)) from None
    try:
        yield
    finally:
        if created and os.listdir(folder) == [LOCK_NAME]:
            with contextlib.suppress(OSError):
                os.unlink(lock_path(folder))
                os.rmdir(folder)
        lock.release()


def run_lock_holder(output_dir) -> str | None:
    """None when no process holds the lock of ``output_dir``, else the one-line message a second trainer
    would get (``ugd.study`` asks before it clears or resumes a run folder)."""
    path = lock_path(output_dir)
    if not os.path.isfile(path):
        return None
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return _held_message(output_dir)
    lock.release()
    return None
