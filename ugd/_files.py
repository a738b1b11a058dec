"""Files written by ugd: their permission bits, flushing them to disk, writing them atomically.

    new_file_mode        the mode a file written at a path gets (the replaced file's, else 0666 less the umask)
    give_ordinary_modes  the .safetensors files safetensors created private (0600) -> that ordinary mode
    fsync_dir, fsync_tree  flush a folder entry / every file of a folder to disk (checkpoints before a rename)
    atomic_text_file     a UTF-8 text file written all or nothing (a temporary beside it, then os.replace)

Private: the library's writers (``ugd.checkpoint``, ``ugd.data.records.write_jsonl``, the document
vector store, the evaluation report) use them; nothing here imports the rest of ugd.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def new_file_mode(path) -> int:
    """The permission bits a file written at ``path`` gets: those of the file it replaces, else what
    ``open()`` would give a new file (0666 less the process umask). Temporary files (mkstemp,
    safetensors) are created 0600, so atomic writers chmod them to this before the rename."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    return 0o666 & ~_umask()


def _umask() -> int:
    # Linux reports it in /proc: reading it there does not change it. os.umask can only read it by
    # setting it, and for that instant a file another thread creates would get mode 0666.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # the portable way; set back at once
    os.umask(mask)
    return mask


def give_ordinary_modes(folder) -> None:
    """Gives the ``.safetensors`` files under ``folder`` that safetensors created private (0600) the mode
    an ordinary new file gets (:func:`new_file_mode`): checkpoints are outputs like any other, readable by
    whoever the umask allows (a serving account, a colleague)."""
    mode = new_file_mode(os.path.join(os.fspath(folder), ".no-such-file"))
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if name.endswith(".safetensors") and os.stat(p).st_mode & 0o777 == 0o600 and mode != 0o600:
                os.chmod(p, mode)


def fsync_dir(path: str) -> None:
    """Flushes a folder's entries (a rename into it) to disk, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flushes every file of a folder (a checkpoint before it is renamed into place) to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
        fsync_dir(root)


@contextlib.contextmanager
def atomic_text_file(path, *, newline: str | None = None):
    """``with atomic_text_file(path) as f: f.write(...)``: a UTF-8 text file that a reader sees whole or
    not at all. Written to a temporary file in the same folder (created if needed) with the mode
    :func:`new_file_mode` gives ``path``, flushed to disk, then renamed over ``path``; on any error the
    temporary is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            os.chmod(tmp, new_file_mode(path))  # mkstemp makes the file private (0600)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
