"""The output-path rule of the commands (``ugd.evaluate``, ``ugd.predict``, ``ugd.study``; docs/training.md,
"Inputs and outputs"), checked before any work is done:

    problems = output_problems(outputs={"--output": out, "--predictions": preds},
                               inputs={"--input": data, "--model": ckpt})

* an output never resolves to an input or to another output (symbolic links and hard links followed: a
  command never replaces the file it reads, nor writes two outputs over each other);
* a file output is not an existing folder, no part of its parent path is a file, and its nearest
  existing parent folder accepts new files (probed: permission bits say nothing for root, and a
  read-only mount refuses even root);
* a folder output (``ugd.study --out``) is not an existing file, with the same parent checks.

Each problem is one line naming the flag; the commands raise the first one as their one-line error.
Nothing here imports the rest of ugd.
"""

from __future__ import annotations

import os
import tempfile

#: a path that means a standard stream (``ugd.predict --input -``), never a file
STDIO = "-"


def _same(a: str, b: str) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only the resolved paths can tell
        return False


def nearest_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists; a broken symbolic link counts as existing (``lexists``),
    so a path through one is refused by the caller's ``isdir`` check instead of failing later in makedirs."""
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def writable_problem(flag: str, path: str, *, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (or created as a folder, ``folder=True``), or None."""
    path = os.path.abspath(os.fspath(path))
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{flag} {path} is a file, not a folder; name a folder"
    elif os.path.isdir(path):
        return f"{flag} {path} is a folder; name a file to write"
    start = path if folder else os.path.dirname(path)
    existing = nearest_existing(start)
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{flag} {path}: {existing} is a broken symbolic link; remove it or name another path"
    if not os.path.isdir(existing):
        return f"{flag} {path}: {existing} is a file, so no folder can hold this path; name another path"
    if folder and existing == path:
        probe_in = path
    else:
        probe_in = existing
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ugd-write-check-", dir=probe_in))
    except OSError as e:
        return f"{flag} {path} cannot be written: {probe_in} does not accept new files ({e.strerror}); " \
               "name a writable path"
    return None


def output_problems(outputs: dict, inputs: dict, *, folders: tuple = ()) -> list[str]:
    """One line per problem of ``outputs`` ({flag: path or None}) against ``inputs`` ({flag: path or None})
    and each other; ``folders``: the flags of outputs that are folders. Paths None or ``-`` are skipped."""
    outs = [(f, os.fspath(p)) for f, p in outputs.items() if p is not None and os.fspath(p) != STDIO]
    ins = [(f, os.fspath(p)) for f, p in inputs.items() if p is not None and os.fspath(p) != STDIO]
    problems = []
    for i, (flag, path) in enumerate(outs):
        clash = next((f for f, p in ins if _same(path, p)), None)
        if clash:
            problems.append(f"{flag} {path} is also {clash}, an input: writing it would destroy the input; "
                            "name another path")
            continue
        clash = next((f for f, p in outs[:i] if _same(path, p)), None)
        if clash:
            problems.append(f"{flag} {path} is also {clash}: one would overwrite the other; name two paths")
            continue
        problem = writable_problem(flag, path, folder=flag in folders)
        if problem:
            problems.append(problem)
    return problems
