"""The server's mutable document store: ids, texts and their two-tower vectors in one safetensors file.

    store = DocumentStore.open(path, model)         # a new, empty store when the file does not exist
    store.upsert(model, [("d1", "text"), ...], vectors)   # vectors from encode_texts(..., "document")
    store.delete("d1")
    hits = store.top_k(model, v_q, k, positive_label)     # [(ids, texts, scores)] per query

The cascade (``/v1/search``) reranks the two tower's candidates with the single tower, which needs the
texts, so unlike ``DocumentVectors`` (vectors keyed by the SHA-1 of their text) this store keeps the
texts and the ids clients gave them. The file is a superset of ``DocumentVectors``' format: the same
``format`` metadata and ``vectors`` / ``text_sha1`` tensors, plus

    text_utf8, text_offsets   the texts' UTF-8 bytes end to end, and where each ends  (uint8 [B], int64 [M])
    id_utf8,   id_offsets     the ids, the same way

so ``DocumentVectors.load`` and ``python -m ugd.predict --doc_vectors`` read it (ignoring the texts).

Every change rewrites the whole file through ``doc_vectors.write_atomically`` (a temporary beside it,
fsync, rename) under the store's file lock (``PATH.lock``, the one ``ugd.predict`` takes): a kill -9 at
any moment leaves the old file or the new one, and a ``ugd.predict`` extending the same file waits.
A text is stored once: the file keys vectors by text, so two ids with the same text are refused.
"""

from __future__ import annotations

import os
import threading

import torch
from safetensors import safe_open

from ..doc_vectors import FORMAT, DocumentVectors, locked, text_key, write_atomically

_EXTRA = ("text_utf8", "text_offsets", "id_utf8", "id_offsets")


class StoreError(ValueError):
    """A request the store refuses (an unknown id, a text stored under another id); the message is one line."""


class UnknownDocument(StoreError):
    pass


def _pack_strings(strings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    raw = [s.encode("utf-8") for s in strings]
    blob = b"".join(raw)
    ends, total = [], 0
    for r in raw:
        total += len(r)
        ends.append(total)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
    return data.clone(), torch.tensor(ends, dtype=torch.int64)


def _unpack_strings(data: torch.Tensor, ends: torch.Tensor, path: str, what: str) -> list[str]:
    blob = data.contiguous().numpy().tobytes()
    out, start = [], 0
    for end in ends.tolist():
        if not start <= end <= len(blob):
            raise ValueError(f"{path} is damaged: the {what} offsets do not fit its {len(blob)} bytes")
        out.append(blob[start:end].decode("utf-8"))
        start = end
    return out


class DocumentStore:
    """Documents (id, text, V_D) of one model, kept in memory and mirrored to ``path`` on every change.

    Thread-safe: readers (``top_k``, ``texts_of``) and writers take ``self.lock``; a search sees the store
    either before or after a change, never half of one."""

    def __init__(self, path: str | None, ids: list[str], texts: list[str], vectors: torch.Tensor, *,
                 fingerprint: str, layout: str, paradigm: str):
        self.path = path
        self.ids, self.texts, self.vectors = list(ids), list(texts), vectors
        self.fingerprint, self.layout, self.paradigm = fingerprint, layout, paradigm
        self.lock = threading.RLock()
        self._row = {d: i for i, d in enumerate(self.ids)}
        self._by_text = {text_key(t): d for d, t in zip(self.ids, self.texts)}
        self.version = 0  # bumped on each change: the cached projection belongs to one version
        self._projection: tuple[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | None, model) -> "DocumentStore":
        """The store at ``path`` (checked against ``model``: vectors of another checkpoint would rank wrongly
        without any error), or an empty one when the file does not exist yet (``path=None``: memory only)."""
        empty = DocumentVectors.empty(model)
        if path is None or not os.path.exists(path):
            return cls(path, [], [], empty.vectors, fingerprint=empty.fingerprint, layout=empty.layout,
                       paradigm=empty.paradigm)
        vectors_only, _ = DocumentVectors.read(path)  # its own one-line errors for damaged or foreign files
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            if not all(n in names for n in _EXTRA):
                raise ValueError(f"{path} holds document vectors without their texts (written by ugd.predict "
                                 "--doc_vectors); the cascade reranks texts: name a new store file and add the "
                                 "documents with POST /v1/documents, or pass --documents corpus.jsonl")
            texts = _unpack_strings(f.get_tensor("text_utf8"), f.get_tensor("text_offsets"), path, "text")
            ids = _unpack_strings(f.get_tensor("id_utf8"), f.get_tensor("id_offsets"), path, "id")
        if len(texts) != len(vectors_only) or len(ids) != len(texts):
            raise ValueError(f"{path} is damaged: {len(vectors_only)} vectors, {len(texts)} texts and {len(ids)} ids")
        if [text_key(t) for t in texts] != vectors_only.keys:
            raise ValueError(f"{path} is damaged: its texts do not match their stored SHA-1 keys")
        vectors_only.check(model)  # the fingerprint and layout of the model that made them
        return cls(path, ids, texts, vectors_only.vectors, fingerprint=vectors_only.fingerprint,
                   layout=vectors_only.layout, paradigm=vectors_only.paradigm)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row

    def text(self, doc_id: str) -> str:
        with self.lock:
            if doc_id not in self._row:
                raise UnknownDocument(f"no document with id {doc_id!r} in the store")
            return self.texts[self._row[doc_id]]

    def _projected(self, model) -> torch.Tensor:
        # W_d V_D once per version of the store, not once per query batch: the document half of FC_t
        if self._projection is None or self._projection[0] != self.version:
            paradigm = model.paradigm
            v = self.vectors.to(model.head_device, model.head_dtype)
            with torch.no_grad():
                self._projection = (self.version, paradigm.document_part(model, v))
        return self._projection[1]

    @torch.no_grad()
    def top_k(self, model, query_vectors: torch.Tensor, ks: list[int], positive_label: int):
        """For each query vector, its ``k`` best documents by the two tower: ``(ids, texts, scores)``, best
        first; the score is the probability of ``positive_label`` (as ``model.rank`` computes it)."""
        paradigm = model.paradigm
        with self.lock:
            ids, texts = self.ids, self.texts
            out = []
            if not ids:
                return [([], [], []) for _ in ks]
            pd = self._projected(model)
            pq = paradigm.query_part(model, query_vectors.to(model.head_device, model.head_dtype))
            for i, k in enumerate(ks):
                logits = paradigm.logits_from_parts(model, pq[i: i + 1, None, :], pd[None])
                scores = logits.float().softmax(-1)[0, :, positive_label].cpu()
                top = torch.topk(scores, min(k, scores.numel()))
                rows = top.indices.tolist()
                out.append(([ids[r] for r in rows], [texts[r] for r in rows], top.values.tolist()))
            return out

    # ------------------------------------------------------------------ changing

    def check_upsert(self, docs: list[tuple[str, str]]) -> None:
        """Refuses (StoreError) a batch that would store one text under two ids, before anything is encoded."""
        seen_ids: dict[str, str] = {}
        seen_texts: dict[bytes, str] = {}
        with self.lock:
            for doc_id, text in docs:
                if doc_id in seen_ids:
                    raise StoreError(f"id {doc_id!r} appears twice in this call")
                seen_ids[doc_id] = text
                key = text_key(text)
                other = seen_texts.get(key) or self._by_text.get(key)
                if other is not None and other != doc_id:
                    raise StoreError(f"document {doc_id!r} has the same text as stored document {other!r}; a text "
                                     "is stored once (delete the other id first)")
                seen_texts[key] = doc_id

    def upsert(self, docs: list[tuple[str, str]], vectors: torch.Tensor) -> tuple[int, int]:
        """Adds ``docs`` (id, text) with their V_D rows, replacing the text of ids already stored; writes the
        file. Returns (added, replaced)."""
        with self.lock:
            self.check_upsert(docs)
            ids, texts = list(self.ids), list(self.texts)
            vecs = self.vectors.clone()
            row = dict(self._row)
            new_rows, added, replaced = [], 0, 0
            for j, (doc_id, text) in enumerate(docs):
                v = vectors[j].to(vecs.dtype)
                if doc_id in row:
                    vecs[row[doc_id]] = v
                    texts[row[doc_id]] = text
                    replaced += 1
                else:
                    row[doc_id] = len(ids)
                    ids.append(doc_id)
                    texts.append(text)
                    new_rows.append(v)
                    added += 1
            if new_rows:
                vecs = torch.cat([vecs, torch.stack(new_rows)])
            self._commit(ids, texts, vecs)
            return added, replaced

    def delete(self, doc_id: str) -> None:
        with self.lock:
            if doc_id not in self._row:
                raise UnknownDocument(f"no document with id {doc_id!r} in the store")
            keep = [i for i, d in enumerate(self.ids) if d != doc_id]
            self._commit([self.ids[i] for i in keep], [self.texts[i] for i in keep],
                         self.vectors[torch.tensor(keep, dtype=torch.int64)])

    def _commit(self, ids, texts, vectors) -> None:
        # the file first: when the write fails the memory keeps the state the file still holds
        if self.path is not None:
            self._write(ids, texts, vectors)
        self.ids, self.texts, self.vectors = ids, texts, vectors
        self._row = {d: i for i, d in enumerate(ids)}
        self._by_text = {text_key(t): d for d, t in zip(ids, texts)}
        self.version += 1

    def _write(self, ids, texts, vectors) -> None:
        keys = b"".join(text_key(t) for t in texts)
        sha = torch.frombuffer(bytearray(keys), dtype=torch.uint8).reshape(len(texts), 20).clone() if texts \
            else torch.empty((0, 20), dtype=torch.uint8)
        text_utf8, text_offsets = _pack_strings(texts)
        id_utf8, id_offsets = _pack_strings(ids)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "layout": self.layout, "paradigm": self.paradigm,
                "hidden_size": str(vectors.shape[1]), "store": "ugd-serve/1"}
        tensors = {"vectors": vectors.contiguous().cpu(), "text_sha1": sha, "text_utf8": text_utf8,
                   "text_offsets": text_offsets, "id_utf8": id_utf8, "id_offsets": id_offsets}
        with locked(self.path, timeout=60.0):
            write_atomically(tensors, self.path, meta)


__all__ = ["DocumentStore", "StoreError", "UnknownDocument"]
