"""Plug-and-play inference (docs/spec.md section 7): two-tower vectors and scores, single-tower scores, ranking.

The ``UGDModel`` methods call these (``model.encode_documents(texts)`` is
``encode_texts(model, texts, "document")``)::

    model = UGDModel.from_pretrained("out/demo")                   # its tokenizer comes with it
    docs = model.encode_documents(corpus)                           # [M, H]: V_D, once, storable
    hits = model.rank("how do I reset my password", docs, top_k=5)  # [(index, score), ...]
    probs = model.predict(pairs, mode="single_tower")               # [N, C] class probabilities

Costs, as docs/spec.md section 7 asks:

* Two-tower. A query or a document is encoded alone (parts ``"q"`` / ``"d"``, each span attending to
  itself only, positions from 0 as inside a training sequence in ``position_mode="restart"``), packed
  without padding into batches of at most ``batch_tokens`` tokens. Its vector is the last hidden state
  at its ``[CLS]``. Scoring from stored vectors runs only the heads, never the backbone; ranking one
  query against M documents projects each document once (``DocumentVectors``, ``UGDHeads.document_part``).
* Single-tower. Spans Q D P with the paradigm's training mask (``ttm`` for ugd-ttm, ``stm`` for
  ugd-stm and stm): no G token is computed; the score comes from V_s.

What a model can serve, and how a text becomes a vector or a pair a score, is its paradigm's
(``model.paradigm``, ``ugd.paradigms.base``): this module never imports ``ugd.model``.

Inputs are checked: texts must be non-empty strings (an empty one raises ``ValueError`` naming its
index); a text longer than the layout's ``max_query_len`` / ``max_document_len`` keeps its beginning
(as in training) and one warning per call counts the truncated texts; an unknown mode raises.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..data.layout import LayoutConfig, encode_sample, prompt_ids, special_token_ids
from ..data.packing import budget_batches, pack
from ..modules.packed import move_batch

MODES = ("two_tower", "single_tower")
DEFAULT_BATCH_TOKENS = 16384
_SIDES = {"query": ("q", 0), "document": ("d", 1)}
_SPAN_NAMES = {"q": "queries", "d": "documents", "g": "reasons"}


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


def tqdm_disable(show_progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for ``show_progress``: True shows, False hides, None shows on a terminal only."""
    return None if show_progress is None else not show_progress


def check_count(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_mode(mode: str) -> str:
    """``"two_tower"`` or ``"single_tower"`` (hyphens accepted); a ValueError naming the modes otherwise."""
    m = mode.replace("-", "_") if isinstance(mode, str) else mode
    if m not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)} (or 'reason' for model.generate_reason)")
    return m


def _check_text(text, what: str, i: int) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} {i} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} {i} is empty (or only whitespace); a matching score needs text on both sides")
    return text


def as_texts(texts, what: str) -> list[str]:
    """A list of non-empty strings, or a ValueError naming the first bad one."""
    if isinstance(texts, str):
        raise ValueError(f"expected a list of {what} texts, got a single string (wrap it in a list)")
    if not isinstance(texts, Sequence):
        texts = list(texts)
    return [_check_text(t, what, i) for i, t in enumerate(texts)]


def as_pairs(pairs) -> list[tuple[str, str]]:
    """(query, document) tuples from tuples, lists or ``{"query", "document"}`` mappings."""
    if isinstance(pairs, (str, Mapping)) or (isinstance(pairs, tuple) and len(pairs) == 2
                                            and all(isinstance(x, str) for x in pairs)):
        raise ValueError("expected a list of pairs, got a single pair (wrap it in a list)")
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, Mapping):
            if "query" not in p or "document" not in p:
                raise ValueError(f"pair {i}: a mapping needs 'query' and 'document', got keys {sorted(p)}")
            q, d = p["query"], p["document"]
        elif isinstance(p, (tuple, list)) and len(p) == 2:
            q, d = p
        else:
            raise ValueError(f"pair {i}: expected (query, document) or {{'query', 'document'}}, got {p!r:.80}")
        out.append((_check_text(q, "query of pair", i), _check_text(d, "document of pair", i)))
    return out


def warn_truncated(samples, what: str) -> None:
    """One warning counting the samples whose texts were cut to the layout's max lengths."""
    counts: dict[str, int] = {}
    for s in samples:
        for span in s.truncated:
            counts[span] = counts.get(span, 0) + 1
    if counts:
        parts = ", ".join(f"{n} {_SPAN_NAMES[s]}" for s, n in sorted(counts.items()))
        warnings.warn(f"{what}: {parts} longer than the layout's max length were truncated (their beginning is kept, "
                      "as in training); raise max_query_len / max_document_len in model.config.layout to keep more",
                      stacklevel=3)


def tokenizer_of(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model.tokenizer is None: load the model with UGDModel.from_pretrained(path) from a "
                         "checkpoint that holds its tokenizer, or set model.tokenizer = <the tokenizer it was trained with>")
    return tok


def layout_of(model) -> LayoutConfig:
    return LayoutConfig(**model.config.layout) if model.config.layout else LayoutConfig()


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` for the block (no dropout), then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return model.head_device


def require(model, capability: str) -> None:
    """A ValueError saying what ``model``'s paradigm serves when it lacks ``capability``."""
    paradigm = model.paradigm
    if capability in paradigm.serves(model.config):
        return
    modes = [m for m in paradigm.modes(model.config) if m in MODES or m == "reason"]
    head = {"single_tower": "single-tower head", "generate": "generative task"}.get(capability, "two-tower head")
    why = paradigm.why_not(model.config, [capability])
    raise ValueError(f"paradigm {model.config.paradigm!r} has no {head} ({capability}{'; ' + why if why else ''}); "
                     f"it serves: {', '.join(repr(m) for m in modes) or 'nothing'}")


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Index batches of at most ``batch_tokens`` tokens, longest texts first (similar lengths together)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a text longer than the budget simply gets a batch of its own
        return [[order[j] for j in b] for b in budget_batches([lengths[i] for i in order], batch_tokens)]


# ---------------------------------------------------------------------------------------------
# two tower
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_texts(model, texts, side: str, *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 show_progress: bool | None = None, output_device="cpu", return_numpy: bool = False):
    """V_Q (``side="query"``) or V_D (``side="document"``) of each text: ``[N, H]`` in the model's dtype.

    Args:
        texts: non-empty strings.
        batch_tokens: token budget of a packed batch (>= 1).
        show_progress: tqdm bar over texts (None: only on a terminal).
        output_device: where the result goes (``None``: stays on the model's device).
        return_numpy: a float32 numpy array instead of a tensor.
    """
    if side not in _SIDES:
        raise ValueError(f"side must be 'query' or 'document', got {side!r}")
    require(model, {"query": "encode_queries", "document": "encode_documents"}[side])
    check_count("batch_tokens", batch_tokens, minimum=1)
    texts = as_texts(texts, side)
    part, _ = _SIDES[side]
    tok = tokenizer_of(model)
    layout = layout_of(model)
    if side == "document" and layout.position_mode != "restart":
        warnings.warn("position_mode='continuous': inside training sequences a document's positions started after "
                      "its query, so a document encoded alone differs from training; train with 'restart' to serve "
                      "two-tower vectors", stacklevel=3)
    ids = special_token_ids(tok)
    samples = [encode_sample(tok, ids, t, t, None, None, config=layout, parts=part) for t in texts]
    warn_truncated(samples, {"query": "encode_queries", "document": "encode_documents"}[side])
    paradigm = model.paradigm
    backbone = paradigm.side_backbone(model, side)
    device = _device(model)
    out = torch.empty((len(texts), paradigm.vector_size(model)), dtype=model.head_dtype, device=device)
    with eval_mode(model), tqdm(total=len(texts), unit=side[0], desc=f"{side}s",
                                disable=tqdm_disable(show_progress)) as bar:
        for idx in _batches([len(s) for s in samples], batch_tokens):
            batch = move_batch(pack([samples[i] for i in idx], "bidirectional"), device)
            h = model.encode(batch, backbone=backbone)
            out[torch.tensor(idx, device=device)] = paradigm.side_vectors(model, h, batch, side).to(out.dtype)
            bar.update(len(idx))
    if return_numpy:
        return out.float().cpu().numpy()
    return out if output_device is None else out.to(output_device)


def _as_vectors(model, vectors, what: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor):
        vectors = torch.as_tensor(vectors)
    hidden = model.paradigm.vector_size(model)
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or vectors.shape[1] != hidden:
        raise ValueError(f"{what} must be [N, {hidden}] (the model's vector size), got {list(vectors.shape)}")
    return vectors.to(device=model.head_device, dtype=model.head_dtype)


@torch.no_grad()
def score_pairs(model, query_vectors, document_vectors) -> torch.Tensor:
    """Two-tower class probabilities ``[N, C]`` (float32, CPU) of aligned pairs of stored vectors."""
    require(model, "score_pairs")
    v_q, v_d = _as_vectors(model, query_vectors, "query_vectors"), _as_vectors(model, document_vectors, "document_vectors")
    if v_q.shape[0] != v_d.shape[0]:
        raise ValueError(f"query_vectors and document_vectors must pair up: {v_q.shape[0]} vs {v_d.shape[0]} rows")
    logits = model.paradigm.pair_logits(model, v_q, v_d)  # exactly the training head
    return logits.float().softmax(-1).cpu()


@torch.no_grad()
def score_documents(model, query_vectors, documents, *, max_elements: int = 1 << 26) -> torch.Tensor:
    """Two-tower class probabilities ``[Nq, M, C]`` (float32, CPU) of every query against every document.

    ``documents``: a ``DocumentVectors`` (its projection is computed once and kept) or V_D ``[M, H]``.
    Work goes in chunks of at most ``max_elements`` pair-by-hidden values.
    """
    require(model, "score_pairs")
    paradigm = model.paradigm
    pq = paradigm.query_part(model, _as_vectors(model, query_vectors, "query_vectors"))
    if is_store(documents):
        pd = documents.projected(model)
    else:
        pd = paradigm.document_part(model, _as_vectors(model, documents, "documents"))
    nq, m, h = pq.shape[0], pd.shape[0], pq.shape[1]
    out = torch.empty((nq, m, model.config.num_labels), dtype=torch.float32)
    step = max(1, max_elements // max(1, nq * h))
    for lo in range(0, m, step):
        logits = paradigm.logits_from_parts(model, pq[:, None, :], pd[None, lo: lo + step, :])
        out[:, lo: lo + step] = logits.float().softmax(-1).cpu()
    return out


def is_store(documents) -> bool:
    """Whether ``documents`` is a store of document vectors (``ugd.DocumentVectors``: it has ``projected``).
    Duck-typed, so that this module need not import ``ugd.serving.doc_vectors`` (which imports this one)."""
    return callable(getattr(documents, "projected", None)) and hasattr(documents, "vectors")


# ---------------------------------------------------------------------------------------------
# single tower
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def single_tower_probs(model, pairs, *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                       show_progress: bool | None = None) -> torch.Tensor:
    """Single-tower class probabilities ``[N, C]`` (float32, CPU): spans Q D P, no G token."""
    require(model, "single_tower")
    check_count("batch_tokens", batch_tokens, minimum=1)
    pairs = as_pairs(pairs)
    tok = tokenizer_of(model)
    layout = layout_of(model)
    ids = special_token_ids(tok)
    prompt = prompt_ids(tok, ids, layout)
    samples = [encode_sample(tok, ids, q, d, None, None, config=layout, parts="qdp", _prompt=prompt) for q, d in pairs]
    warn_truncated(samples, "single-tower pairs")
    paradigm = model.paradigm
    mask = paradigm.single_tower_mask_of(model.config)
    device = _device(model)
    out = torch.empty((len(pairs), model.config.num_labels), dtype=torch.float32)
    with eval_mode(model), tqdm(total=len(pairs), unit="pair", desc="single tower",
                                disable=tqdm_disable(show_progress)) as bar:
        for idx in _batches([len(s) for s in samples], batch_tokens):
            batch = move_batch(pack([samples[i] for i in idx], mask), device)
            logits = paradigm.single_tower_logits(model, model.encode(batch), batch)
            out[torch.tensor(idx)] = logits.float().softmax(-1).cpu()
            bar.update(len(idx))
    return out


# ---------------------------------------------------------------------------------------------
# predict and rank
# ---------------------------------------------------------------------------------------------


def unique_texts(texts: list[str]) -> tuple[list[str], list[int]]:
    """(the distinct texts in first-seen order, the index of each text among them)."""
    first: dict[str, int] = {}
    inverse = [first.setdefault(t, len(first)) for t in texts]
    return list(first), inverse


def predict(model, pairs, mode: str = "two_tower", *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
            show_progress: bool | None = None) -> torch.Tensor:
    """Class probabilities ``[N, C]`` (float32, CPU) of (query, document) pairs.

    ``mode="two_tower"`` encodes each distinct query and document once, alone, and scores the pairs
    through FC_t and FC; ``mode="single_tower"`` runs Q D P per pair and scores V_s.
    """
    mode = check_mode(mode)
    pairs = as_pairs(pairs)
    if mode == "single_tower":
        return single_tower_probs(model, pairs, batch_tokens=batch_tokens, show_progress=show_progress)
    require(model, "score_pairs")
    if not pairs:
        return torch.empty((0, model.config.num_labels))
    queries, qi = unique_texts([q for q, _ in pairs])
    documents, di = unique_texts([d for _, d in pairs])
    kw = dict(batch_tokens=batch_tokens, show_progress=show_progress, output_device=None)
    v_q = encode_texts(model, queries, "query", **kw)
    v_d = encode_texts(model, documents, "document", **kw)
    return score_pairs(model, v_q[torch.tensor(qi, device=v_q.device)], v_d[torch.tensor(di, device=v_d.device)])


def check_positive_label(model, positive_label: int | None) -> int:
    """The class index ``positive_label`` names, None meaning the last class (as ``ugd serve`` and
    ``ugd.predict`` default): "match" in binary data, the top grade of graded data."""
    c = model.config.num_labels
    if positive_label is None:
        return c - 1
    if isinstance(positive_label, bool) or not isinstance(positive_label, int) or not 0 <= positive_label < c:
        raise ValueError(f"positive_label must be a class index in [0, {c}), got {positive_label!r}")
    return positive_label


def rank(model, query: str, documents, *, top_k: int | None = 10, mode: str = "two_tower", positive_label: int | None = None,
         batch_tokens: int = DEFAULT_BATCH_TOKENS, show_progress: bool | None = None) -> list[tuple[int, float]]:
    """The ``top_k`` documents for ``query`` as ``(index into documents, score)``, best first.

    The score is the probability of class ``positive_label`` (default None: the last class, "match" in
    binary data, the top grade of graded data).
    ``documents``: texts, or (two-tower only) stored vectors -- a ``DocumentVectors`` or V_D ``[M, H]``,
    in which case no document is encoded. ``top_k=None`` returns all of them.
    """
    mode = check_mode(mode)
    query = _check_text(query, "query", 0)
    positive_label = check_positive_label(model, positive_label)
    if top_k is not None:
        check_count("top_k", top_k, minimum=1)
    stored = is_store(documents) or isinstance(documents, torch.Tensor)
    if stored and mode != "two_tower":
        raise ValueError("stored document vectors serve mode='two_tower' only; single-tower scoring needs the texts")
    if mode == "single_tower":
        docs = as_texts(documents, "document")
        scores = single_tower_probs(model, [(query, d) for d in docs], batch_tokens=batch_tokens,
                                    show_progress=show_progress)[:, positive_label]
    else:
        if not stored:
            documents = encode_texts(model, as_texts(documents, "document"), "document", batch_tokens=batch_tokens,
                                     show_progress=show_progress, output_device=None)
        v_q = encode_texts(model, [query], "query", batch_tokens=batch_tokens, show_progress=False, output_device=None)
        scores = score_documents(model, v_q, documents)[0, :, positive_label]
    k = scores.numel() if top_k is None else min(top_k, scores.numel())
    top = torch.topk(scores, k)
    return [(int(i), float(s)) for s, i in zip(top.values, top.indices)]


__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "MODES",
    "as_pairs",
    "as_texts",
    "check_mode",
    "encode_texts",
    "predict",
    "rank",
    "score_documents",
    "score_pairs",
    "single_tower_probs",
    "unique_texts",
]
