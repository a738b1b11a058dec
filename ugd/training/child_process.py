"""Child processes that die with their parent: ``subprocess.run(cmd, preexec_fn=die_with_parent())``.

``python -m ugd.study`` runs each training as a child process. Killed with SIGKILL, the study cannot
stop its child, which would go on training into a run folder that a rerun trains into again. On Linux
the child asks the kernel (``prctl(PR_SET_PDEATHSIG)``) for SIGTERM when its parent ends: ``ugd.train``
then saves a checkpoint and stops (``ugd.training.signals``), ``ugd.evaluate`` just stops. Elsewhere
(macOS, Windows) ``die_with_parent()`` is None and the child is not tied to its parent; the run-folder
lock (``ugd.training.run_lock``) still refuses a second trainer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
    """libc's prctl, looked up in the parent: the child between fork and exec must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` that makes the child get ``sig`` when this process ends; None where the system
    has no such request (the child then runs on its own, as without it)."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # the parent may have died between fork and prctl: then the signal never comes, so send it now
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec
