"""Stored document vectors for two-tower serving (docs/spec.md section 7: "documents once, stored").

    store = DocumentVectors.build(model, corpus)          # encodes each distinct text once
    store.save("docs.safetensors")
    store = DocumentVectors.load("docs.safetensors", model)   # refuses vectors of another checkpoint
    hits = model.rank(query, store, top_k=10)              # no document goes through the backbone
    rows = store.add(model, more_texts)                    # encodes only the texts not stored yet

File format (safetensors; ``FORMAT`` in the metadata):

    vectors     [M, H]   V_D of each document, in the dtype of the model that made them
    text_sha1   uint8 [M, 20]   the SHA-1 of each document's UTF-8 text: how records find their vector
    metadata    format, fingerprint (``UGDModel.fingerprint()``: which checkpoint made them), hidden_size,
                layout (the JSON of the prompt/length settings: max_document_len decides truncation),
                paradigm

A shard of a sharded build (``ugd.serving.doc_shards``) is the same file with format ``SHARD_FORMAT`` and the
shard's metadata; ``load`` refuses it (merge the shards first), ``read`` reads either.

A document is found by its exact text. Loading checks the fingerprint and the layout against the
model: vectors of another checkpoint would give wrong scores without any error, so they are refused.
The fingerprint (``ugd.fingerprint``) covers the backbone weights, the heads and both configs.

Several processes may extend one file at once: ``merge_into_file`` takes a lock (``PATH.lock``, an
OS file lock from the ``filelock`` package, released when a process dies) around reading the file
again, adding what it lacks and writing it, so no writer drops another's documents. The encoding
itself happens outside the lock. Every write is atomic (``write_atomically``): a killed writer leaves
the old file and a temporary that the next write removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save_file

from .._files import fsync_dir, new_file_mode
from ..checkpoint import CheckpointFileError, check_safetensors_file
from . import inference  # inference.encode_texts looked up at each call (tests count the encodes)
from .inference import as_texts, layout_of

FORMAT = "ugd-document-vectors/1"
SHARD_FORMAT = "ugd-document-vector-shard/1"  # one part of a sharded build (ugd.serving.doc_shards)


def text_key(text: str) -> bytes:
    """The 20-byte key of a document text (SHA-1 of its UTF-8 bytes)."""
    return hashlib.sha1(text.encode("utf-8")).digest()


def _layout_json(model) -> str:
    d = layout_of(model).to_dict()
    return json.dumps({k: d[k] for k in ("max_document_len", "position_mode")}, sort_keys=True)


@contextlib.contextmanager
def locked(path: str, timeout: float = 600.0):
    """Holds ``PATH.lock`` (an OS file lock, released when its process dies) for the block."""
    lock = FileLock(path + ".lock", mode=new_file_mode(path + ".lock"))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise ValueError(f"{path}: another process has held {path}.lock for {timeout:.0f} s; wait for it to "
                         "finish (the lock is released when that process ends)") from None
    try:
        yield
    finally:
        lock.release()


def _tmp_name(path: str, pid: int) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.tmp-{socket.gethostname()}-{pid}")


def remove_stale_temporaries(path: str) -> int:
    """Deletes the temporary files of writes to ``path`` whose process (on this host) is gone: a writer
    killed before its rename leaves one behind. Returns how many were removed."""
    prefix = os.path.basename(_tmp_name(path, 0))[:-1]  # ".NAME.tmp-HOST-"
    folder = os.path.dirname(os.path.abspath(path))
    removed = 0
    for name in os.listdir(folder):
        pid = name[len(prefix):]
        if not name.startswith(prefix) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running: its write may be in progress
        except ProcessLookupError:
            pass
        except OSError:  # alive, owned by someone else
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
            removed += 1
    return removed


def write_atomically(tensors: dict, path: str, metadata: dict) -> None:
    """A safetensors file at ``path``, all or nothing: written to a temporary file in the same folder,
    flushed to disk, then renamed over ``path``. Temporaries left by killed writers are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_name(path, os.getpid())
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, new_file_mode(path))  # safetensors writes 0600; a store is an ordinary output file
        with open(tmp, "rb+") as f:  # the data reaches the disk before the rename makes it the store
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)  # the rename itself (not every file system lets a folder be fsynced)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class DocumentVectors:
    """V_D of a set of documents, keyed by text, with the fingerprint of the model that made them."""

    def __init__(self, vectors: torch.Tensor, keys: list[bytes], *, fingerprint: str, layout: str, paradigm: str):
        if vectors.dim() != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"vectors must be [M, H] with one row per key, got {list(vectors.shape)} for {len(keys)} keys")
        self.vectors = vectors
        self.keys = list(keys)
        self.fingerprint = fingerprint
        self.layout = layout
        self.paradigm = paradigm
        self._row = {k: i for i, k in enumerate(self.keys)}
        if len(self._row) != len(self.keys):
            raise ValueError("duplicate document keys")
        self._projection = None  # (fingerprint, number of rows, tensor): W_d V_D on the model's device

    # ---------------------------------------------------------------- building

    @classmethod
    def empty(cls, model) -> "DocumentVectors":
        hidden = model.paradigm.vector_size(model)  # the paradigm's document vector (V_D for UGD)
        return cls(torch.empty((0, hidden), dtype=model.head_dtype), [],
                   fingerprint=model.fingerprint(), layout=_layout_json(model), paradigm=model.config.paradigm)

    @classmethod
    def build(cls, model, texts, **encode_kwargs) -> "DocumentVectors":
        """Encodes each distinct text of ``texts`` once (``encode_kwargs``: see ``encode_texts``)."""
        store = cls.empty(model)
        store.add(model, texts, **encode_kwargs)
        return store

    def add(self, model, texts, **encode_kwargs) -> torch.Tensor:
        """Encodes the texts not stored yet and appends them; returns the row of every text ``[N]``."""
        self.check(model)
        texts = as_texts(texts, "document")
        new: dict[bytes, str] = {}
        for t in texts:
            k = text_key(t)
            if k not in self._row and k not in new:
                new[k] = t
        if new:
            encode_kwargs.setdefault("output_device", "cpu")
            v = inference.encode_texts(model, list(new.values()), "document", **encode_kwargs)
            bad = int((~torch.isfinite(v).all(-1)).sum())
            if bad:  # a damaged checkpoint (or a dtype overflow): never store such vectors
                raise ValueError(f"the model produced non-finite document vectors (NaN or inf) for {bad} of {len(new)} "
                                 "documents: its weights are damaged or overflow in this dtype; use another checkpoint "
                                 "or --dtype float32")
            self.vectors = torch.cat([self.vectors, v.to(self.vectors.device, self.vectors.dtype)])
            for k in new:
                self._row[k] = len(self.keys)
                self.keys.append(k)
        return self.rows(texts)

    # ---------------------------------------------------------------- lookup

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self._row

    def rows(self, texts) -> torch.Tensor:
        """The row of each text ``[N]`` (int64), -1 where the text is not stored."""
        return torch.tensor([self._row.get(text_key(t), -1) for t in texts], dtype=torch.int64)

    def check(self, model) -> str:
        """Raises ValueError unless ``model`` is the checkpoint (and document layout) these vectors came from;
        returns its fingerprint."""
        # the layout first: it is part of the fingerprint too, and its own message says what changed
        layout = _layout_json(model)
        if layout != self.layout:
            raise ValueError(f"these document vectors were made with document layout {self.layout}, the model now "
                             f"uses {layout}: rebuild them, or restore the layout")
        fp = model.fingerprint()
        if fp != self.fingerprint:
            raise ValueError(f"these document vectors were made by another model (fingerprint {self.fingerprint[:12]}, "
                             f"this model's is {fp[:12]}): rebuild them with this model (DocumentVectors.build)")
        return fp

    def merge(self, other: "DocumentVectors") -> int:
        """Appends the documents of ``other`` (same model) that this store lacks; returns how many."""
        if other.fingerprint != self.fingerprint or other.layout != self.layout:
            raise ValueError("cannot merge document vectors of another model or layout")
        take = [i for i, k in enumerate(other.keys) if k not in self._row]
        if take:
            rows = torch.tensor(take, dtype=torch.int64)
            self.vectors = torch.cat([self.vectors, other.vectors[rows].to(self.vectors.device, self.vectors.dtype)])
            for i in take:
                self._row[other.keys[i]] = len(self.keys)
                self.keys.append(other.keys[i])
        return len(take)

    def merge_into_file(self, path: str, model=None, *, timeout: float = 600.0) -> int:
        """Saves this store to ``path`` without losing documents another process stored there meanwhile:
        under a file lock the file is read again, its documents this store lacks are merged in, and the
        union is written (atomically). Returns how many documents came from the file. Raises ValueError
        when the file now holds vectors of another model (with ``model``: checked against it)."""
        with locked(path, timeout):
            merged = 0
            if os.path.exists(path):
                on_disk = DocumentVectors.load(path, model)
                if on_disk.fingerprint != self.fingerprint or on_disk.layout != self.layout:
                    raise ValueError(f"{path} now holds vectors of another model or layout")
                merged = self.merge(on_disk)
            self.save(path)
            return merged

    def projected(self, model) -> torch.Tensor:
        """W_d V_D ``[M, H]`` on the model's device (FC_t's document half), computed once per model."""
        fp = self.check(model)
        if self._projection is None or self._projection[:2] != (fp, len(self)):
            paradigm, device, dtype = model.paradigm, model.head_device, model.head_dtype
            with torch.no_grad():
                p = torch.cat([paradigm.document_part(model, chunk.to(device, dtype))
                               for chunk in self.vectors.split(65536)]) if len(self) else \
                    paradigm.document_part(model, torch.empty((0, self.vectors.shape[1]), dtype=dtype, device=device))
            self._projection = (fp, len(self), p)
        return self._projection[2]

    # ---------------------------------------------------------------- storage

    def save(self, path: str, *, shard: dict | None = None) -> None:
        """Writes the safetensors file atomically (a temporary file in the same folder, flushed to disk, then
        a rename): a reader sees the old file or the new one, never a part, even when the writer is killed.
        ``shard`` (``ugd.serving.doc_shards``): the file is one shard of a sharded build, with this metadata."""
        keys = torch.frombuffer(bytearray(b"".join(self.keys)), dtype=torch.uint8).reshape(len(self.keys), 20) \
            if self.keys else torch.empty((0, 20), dtype=torch.uint8)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "layout": self.layout, "paradigm": self.paradigm,
                "hidden_size": str(self.vectors.shape[1])}
        if shard is not None:
            meta.update({k: str(v) for k, v in shard.items()}, format=SHARD_FORMAT)
        write_atomically({"vectors": self.vectors.contiguous().cpu(), "text_sha1": keys}, path, meta)

    @classmethod
    def load(cls, path: str, model=None) -> "DocumentVectors":
        """Reads a file written by ``save``; with ``model``, also checks that it made them (``check``)."""
        store, meta = cls.read(path)
        if meta.get("format") == SHARD_FORMAT:
            raise ValueError(f"{path} is shard {meta.get('shard')} of a sharded build, not a whole store: merge the "
                             "shards first (python -m ugd.predict merge-shards --doc_vectors STORE PARTS...)")
        if model is not None:
            store.check(model)
        return store

    @classmethod
    def read(cls, path: str) -> tuple["DocumentVectors", dict]:
        """A store or shard file and its metadata, unchecked against any model. A missing file raises
        FileNotFoundError; a truncated, damaged or foreign one ValueError naming it."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no document vectors at {path}")
        # size against header first: a cut file gets a message that says so, not safetensors' own
        try:
            # ugd writes stores atomically, so a cut store was cut after its write: there is nothing to resume
            check_safetensors_file(path, "document vectors", "delete it and build it again")
        except CheckpointFileError as e:  # "PATH is truncated ..." -> "PATH could not be read: it is truncated ..."
            raise ValueError(f"{path} could not be read: it {str(e).removeprefix(path).lstrip()}") from None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") not in (FORMAT, SHARD_FORMAT):
                    raise ValueError(f"{path} is not a UGD document-vector file (metadata format "
                                     f"{meta.get('format')!r}, expected {FORMAT!r})")
                vectors, keys = f.get_tensor("vectors"), f.get_tensor("text_sha1")
        except ValueError:
            raise
        except Exception as e:  # safetensors' own errors for a damaged or foreign file
            raise ValueError(f"{path} could not be read as safetensors: {str(e).splitlines()[0]}") from None
        if keys.dtype != torch.uint8 or keys.dim() != 2 or keys.shape[1] != 20 or vectors.dim() != 2 \
                or vectors.shape[0] != keys.shape[0]:
            raise ValueError(f"{path} is damaged: vectors {list(vectors.shape)} and text_sha1 {list(keys.shape)} "
                             "do not pair up as [M, H] and uint8 [M, 20]")
        raw = keys.contiguous().numpy().tobytes()
        store = cls(vectors, [raw[i: i + 20] for i in range(0, len(raw), 20)], fingerprint=meta.get("fingerprint", ""),
                    layout=meta.get("layout", ""), paradigm=meta.get("paradigm", ""))
        return store, meta

    def __repr__(self) -> str:
        return (f"DocumentVectors({len(self)} documents, hidden {self.vectors.shape[1]}, {self.vectors.dtype}, "
                f"model {self.fingerprint[:12]})")


__all__ = ["FORMAT", "SHARD_FORMAT", "DocumentVectors", "locked", "remove_stale_temporaries", "text_key",
           "write_atomically"]
