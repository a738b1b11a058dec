"""Sharded document encoding: a corpus split over n processes or machines, then merged into one store.

    python -m ugd.predict --model M --input corpus.jsonl --mode documents --doc_vectors docs.safetensors --shard 0/2
    python -m ugd.predict --model M --input corpus.jsonl --mode documents --doc_vectors docs.safetensors --shard 1/2
    python -m ugd.predict merge-shards --doc_vectors docs.safetensors docs.part-0000[01]-of-00002.safetensors

The corpus is the distinct document texts of the input in first-seen order (what an unsharded build
stores, in its order). Shard i of n takes the contiguous slice ``[i*M//n, (i+1)*M//n)`` of it, so the
shards partition the corpus and, merged in shard order, rebuild the unsharded store row for row. Every
shard reads the whole input (cheap next to encoding) to know M and the slice.

A part file (``STORE.part-IIIII-of-NNNNN.safetensors``) is a document-vector file with format
``SHARD_FORMAT`` (so it is never taken for a whole store) and, besides the checkpoint fingerprint and
layout, the metadata a merge checks: ``shard`` ("i/n"), ``shard_documents``, ``corpus_documents`` (M)
and ``corpus_sha256`` (SHA-256 of the corpus's document keys in order). ``merge_parts`` refuses parts
of another checkpoint, layout or corpus, a missing or repeated shard, mixed n, and counts or keys that
do not add up (the merged keys must hash to ``corpus_sha256``), before it writes anything.
"""

from __future__ import annotations

import hashlib
import os
import re

import torch

from .doc_vectors import SHARD_FORMAT, DocumentVectors, locked, text_key
from .inference import unique_texts

AUTO = "auto"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str, environ=os.environ) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) as ``(i, n)``; ``"auto"`` reads RANK and WORLD_SIZE, which torchrun and
    accelerate launch set for each process they start."""
    if text.strip().lower() == AUTO:
        rank, world = environ.get("RANK"), environ.get("WORLD_SIZE")
        if rank is None or world is None:
            raise ValueError("--shard auto takes the shard from RANK and WORLD_SIZE, which are not set: start the "
                             "processes with torchrun or accelerate launch, or give --shard i/n")
        text = f"{rank}/{world}"
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"--shard must be i/n (shard i of n, 0 <= i < n) or auto, got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need n >= 1 and 0 <= i < n (shards are numbered from 0)")
    return i, n


def part_path(store: str, i: int, n: int) -> str:
    """Where shard ``i`` of ``n`` of ``store`` goes (``docs.safetensors``, 1, 4 ->
    ``docs.part-00001-of-00004.safetensors``)."""
    root, ext = os.path.splitext(store)
    return f"{root}.part-{i:05d}-of-{n:05d}{ext or '.safetensors'}"


def shard_bounds(m: int, i: int, n: int) -> tuple[int, int]:
    return i * m // n, (i + 1) * m // n


def corpus_sha256(keys) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k)
    return h.hexdigest()


def build_part(model, store: str, texts: list[str], i: int, n: int, **encode_kwargs) -> dict:
    """Writes shard ``i`` of ``n`` of the corpus ``texts`` (documents, repeats allowed) beside ``store``.
    Vectors already in ``store`` (when it exists) are copied, not encoded; a complete part of this very
    shard is kept as it is (a rerun after some shards failed redoes only those). Returns a summary."""
    corpus, _ = unique_texts(texts)
    keys = [text_key(t) for t in corpus]
    lo, hi = shard_bounds(len(corpus), i, n)
    meta = {"shard": f"{i}/{n}", "shard_documents": hi - lo, "corpus_documents": len(corpus),
            "corpus_sha256": corpus_sha256(keys)}
    path = part_path(store, i, n)
    summary = {"part": path, "shard": meta["shard"], "documents": hi - lo, "corpus": len(corpus), "encoded": 0}
    if os.path.exists(path):
        part, got = DocumentVectors.read(path)
        fingerprint = model.fingerprint()
        if part.fingerprint != fingerprint or any(got.get(k) != str(v) for k, v in meta.items()) \
                or part.keys != keys[lo:hi]:
            raise ValueError(f"{path} already holds shard {got.get('shard')} of another build (checkpoint "
                             f"{part.fingerprint[:12]} vs {fingerprint[:12]}, corpus of {got.get('corpus_documents')} "
                             f"vs {len(corpus)} documents): delete it (or the other build's parts) and run again")
        part.check(model)
        summary["kept"] = True
        return summary
    if os.path.exists(store):
        base = DocumentVectors.load(store, model)
    else:
        base = DocumentVectors.empty(model)
    before = len(base)
    rows = base.add(model, corpus[lo:hi], **encode_kwargs)
    summary["encoded"] = len(base) - before
    part = DocumentVectors(base.vectors[rows], [base.keys[r] for r in rows.tolist()], fingerprint=base.fingerprint,
                           layout=base.layout, paradigm=base.paradigm)
    part.save(path, shard=meta)
    return summary


def _read_part(path: str) -> tuple[DocumentVectors, dict, tuple[int, int]]:
    part, meta = DocumentVectors.read(path)
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a shard part (it is a whole store, format {meta.get('format')!r}); name the "
                         "files written by --shard i/n")
    try:
        i, n = parse_shard(meta.get("shard", ""))
        counts = int(meta["shard_documents"]), int(meta["corpus_documents"])
    except (ValueError, KeyError):
        raise ValueError(f"{path} is damaged: its shard metadata (shard, shard_documents, corpus_documents) is "
                         "missing or malformed") from None
    if len(part) != counts[0]:
        raise ValueError(f"{path} holds {len(part)} documents, its metadata says {counts[0]}: it is damaged; build "
                         f"shard {i}/{n} again")
    return part, meta, (i, n)


def merge_parts(paths: list[str], store: str) -> dict:
    """Checks that ``paths`` are the n parts of one sharded build and writes their union to ``store``
    (extending it when it exists and holds vectors of the same checkpoint), exactly as one unsharded
    build would have. Nothing is written unless every check passes. Returns a summary."""
    if not paths:
        raise ValueError("merge-shards needs the part files to merge (STORE.part-*-of-*.safetensors)")
    parts = [_read_part(p) for p in paths]
    first_path, (first, first_meta, (_, n)) = paths[0], parts[0]
    seen: dict[int, str] = {}
    for path, (part, meta, (i, n_i)) in zip(paths, parts):
        if (part.fingerprint, part.layout) != (first.fingerprint, first.layout):
            raise ValueError(f"{path} was made by another checkpoint (or document layout) than {first_path} "
                             f"(fingerprint {part.fingerprint[:12]} vs {first.fingerprint[:12]}); merge parts of "
                             "one build only")
        if n_i != n:
            raise ValueError(f"{path} is shard {i}/{n_i} but {first_path} is one of {n}: merge the parts of one build")
        if (meta.get("corpus_sha256"), meta.get("corpus_documents")) != \
                (first_meta.get("corpus_sha256"), first_meta.get("corpus_documents")):
            raise ValueError(f"{path} was built from another corpus than {first_path} ({meta.get('corpus_documents')} "
                             f"vs {first_meta.get('corpus_documents')} documents, or other texts): every shard must "
                             "read the same input")
        if i in seen:
            raise ValueError(f"shard {i}/{n} is given twice ({seen[i]} and {path}); name each part once")
        seen[i] = path
    missing = [i for i in range(n) if i not in seen]
    if missing:
        shown = ", ".join(f"{i}/{n}" for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        build = f"--shard {missing[0]}/{n}" if len(missing) == 1 else \
            f"--shard {missing[0]}/{n} (and so on for each missing one)"
        raise ValueError(f"shard {shown} is missing ({len(missing)} of {n}): build it with {build} "
                         "(or name its part file) and merge again")
    ordered = [parts[paths.index(seen[i])][0] for i in range(n)]
    m = int(first_meta["corpus_documents"])
    keys = [k for part in ordered for k in part.keys]
    if len(keys) != m or corpus_sha256(keys) != first_meta.get("corpus_sha256"):
        raise ValueError(f"the parts hold {len(keys)} documents but their corpus has {m} (or other texts): a part "
                         "is damaged; build the parts again")
    union = DocumentVectors(torch.cat([p.vectors for p in ordered]), keys, fingerprint=first.fingerprint,
                            layout=first.layout, paradigm=first.paradigm)
    with locked(store):
        if os.path.exists(store):
            base = DocumentVectors.load(store)
            if (base.fingerprint, base.layout) != (union.fingerprint, union.layout):
                raise ValueError(f"{store} holds vectors of another checkpoint (fingerprint {base.fingerprint[:12]}, "
                                 f"the parts' is {union.fingerprint[:12]}): name a new store, or delete it")
        else:
            base = DocumentVectors(union.vectors[:0], [], fingerprint=union.fingerprint, layout=union.layout,
                                   paradigm=union.paradigm)
        added = base.merge(union)
        base.save(store)
    return {"store": store, "parts": n, "documents": m, "added": added, "stored": len(base)}


def launcher_device(environ=os.environ) -> str | None:
    """``cuda:LOCAL_RANK`` under torchrun / accelerate launch on a CUDA machine, so that the n processes of
    one machine use n GPUs; None otherwise (the usual default applies)."""
    local = environ.get("LOCAL_RANK")
    if local is None or not local.isdigit() or not torch.cuda.is_available():
        return None
    return f"cuda:{local}"


__all__ = ["build_part", "launcher_device", "merge_parts", "parse_shard", "part_path", "shard_bounds"]
