"""Running the command-line entry points from tests: in-process with captured streams, their one-line
errors, and a subprocess killed (SIGKILL) once it has written a file."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time


def run_cli(cli, args, *, stdin: str | bytes | None = None) -> tuple[int, str, str]:
    """``cli([str(a) for a in args])`` in-process: (exit status, stdout, stderr). Bytes on ``stdin`` come
    through a text stream with a binary buffer underneath, as a real stdin."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    if isinstance(stdin, bytes):
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    elif stdin is not None:
        sys.stdin = io.StringIO(stdin)
    sys.stdout, sys.stderr = out, err
    try:
        code = cli([str(a) for a in args])
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str, prefix: str, *needles: str) -> str:
    """The one line of ``err`` starting with ``prefix`` (e.g. ``"ugd.train: error: "``), holding every needle;
    fails when there is none, more than one, or a traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def sigkill_once_written(proc: subprocess.Popen, path, timeout: float = 240) -> None:
    """Waits until ``path`` exists, then kills ``proc`` with SIGKILL (and reaps it whatever happens).
    Fails with the process's stderr tail if it exits first, or after ``timeout`` seconds."""
    try:
        deadline = time.time() + timeout
        while not os.path.exists(path):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, f"{path} never appeared"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
