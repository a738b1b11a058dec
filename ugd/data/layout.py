"""The UGD sequence layout (docs/spec.md sections 2 and 4): special tokens, spans, positions, LM targets.

One training sample is one sequence of four spans, in this order::

    Q  query tokens  [CLS]                                   Lq >= 1   (V_Q at its last token)
    D  document tokens  [CLS]                                Ld >= 1   (V_D at its last token)
    P  because [gMask], the correlation score is [CLS]      Lp >= 0   (V_s at its last token)
    G  [Start] r1 .. rn            (targets r1 .. rn [EOS])  Lg >= 0

``encode_sample`` builds one such sequence as python lists (an ``EncodedSample``); ``ugd.data.collator``
packs samples into padding-free batches and computes the attention intervals with
``ugd_ops.row_intervals``.

Conventions:

* Text is tokenized with ``add_special_tokens=False`` (no BOS is inserted), each span on its own, so a
  query or document encoded alone has exactly the token ids it has inside a full sequence.
* Lengths in ``LayoutConfig`` count the span's own special token: the Q span has at most
  ``max_query_len`` tokens including its ``[CLS]``, the G span at most ``max_reason_len`` tokens
  including ``[Start]``. Truncation keeps the *beginning* of each text and never drops a ``[CLS]``.
* ``lm_labels`` is -100 everywhere except the G span, where position t holds the target *of* position
  t (no shift is needed by the loss): inputs ``[Start] r1 .. rn``, labels ``r1 .. rn [EOS]``. Every G
  position has a target, so ``lm_labels != -100`` marks exactly the G span.
* Positions (``position_mode``): ``"restart"`` -- Q ``0..Lq-1``, D ``0..Ld-1``, P and G continue from
  ``Lq+Ld``; ``"continuous"`` -- ``0..L-1``. A lone document (parts ``"d"``) gets ``0..Ld-1`` in both
  modes (in continuous mode this differs from its positions inside a full sequence; restart is the
  mode in which lone encodings match the training sequence exactly).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"cls": "[CLS]", "gmask": "[gMask]", "start": "[Start]"}

IGNORE_INDEX = -100

POSITION_MODES = ("restart", "continuous")

#: The spans each ``parts`` string selects (Q, D, P, G); the rest have length 0.
PARTS = ("qdpg", "qdp", "qd", "q", "d")

#: What fills the ``interaction_positions`` at the head of the P span: ``"gmask"``, that many
#: ``[gMask]`` tokens (learned slots); ``"query"``, the query's first tokens read a second time.
INTERACTION_FILLS = ("gmask", "query")

# ---------------------------------------------------------------------------------------------
# special tokens
# ---------------------------------------------------------------------------------------------


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "the tokenizer has no EOS token (tokenizer.eos_token_id is None); UGD ends the reason with "
            "[EOS]: set one first, e.g. tokenizer.eos_token = '<|endoftext|>' (a token of its vocabulary)"
        )
    return int(eos)


def add_special_tokens(tokenizer, model=None) -> dict:
    """Adds ``[CLS]``, ``[gMask]`` and ``[Start]`` to ``tokenizer`` as special tokens (idempotent).

    With a ``model`` (a ``transformers`` PreTrainedModel), grows its input embeddings (and a tied or
    untied LM head, as ``resize_token_embeddings`` does) to ``len(tokenizer)`` when they are smaller;
    an embedding matrix that is already large enough (e.g. Qwen's, padded beyond the tokenizer) is
    left as it is, so this never shrinks a model.

    Returns:
        ``{"cls": id, "gmask": id, "start": id, "eos": tokenizer.eos_token_id}``.

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    _eos_id(tokenizer)
    existing = {str(t) for t in tokenizer.all_special_tokens}
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS.values() if t not in existing or t not in vocab]
    if missing:
        try:  # transformers >= 5
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        except TypeError:  # transformers 4.x
            tokenizer.add_special_tokens(
                {"additional_special_tokens": missing}, replace_additional_special_tokens=False
            )
    if model is not None:
        n = len(tokenizer)
        if model.get_input_embeddings().weight.shape[0] < n:
            model.resize_token_embeddings(n)
    return special_token_ids(tokenizer)


def special_token_ids(tokenizer) -> dict:
    """The ids of the UGD special tokens in a tokenizer that already has them (see ``add_special_tokens``).

    Returns ``{"cls", "gmask", "start", "eos"}``; a ValueError if a token is missing or EOS is unset.
    """
    eos = _eos_id(tokenizer)
    vocab = tokenizer.get_vocab()
    absent = [t for t in SPECIAL_TOKENS.values() if t not in vocab]
    if absent:
        raise ValueError(
            f"the tokenizer lacks the UGD special tokens {absent}; call "
            "ugd.data.layout.add_special_tokens(tokenizer, model) first (it also resizes the model's embeddings)"
        )
    ids = {k: int(vocab[t]) for k, t in SPECIAL_TOKENS.items()}
    ids["eos"] = eos
    return ids


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str):
    """The tokenizer saved in ``path`` (a model folder or a UGD checkpoint).

    ``AutoTokenizer`` is right for a model's own tokenizer, but not for a generic one (the demo's
    word-level tokenizer, ``tokenizer_class`` "TokenizersBackend") saved beside a Qwen2 ``config.json``:
    transformers 5.23 then builds the model type's tokenizer class (Qwen2Tokenizer) from the file and
    every word becomes the same token. A generic class is therefore loaded as what it is.
    """
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        with open(cfg_file) as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in GENERIC_TOKENIZER_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# config and samples
# ---------------------------------------------------------------------------------------------


@dataclass
class LayoutConfig:
    """How a sample is laid out; serializable with ``dataclasses.asdict`` (``LayoutConfig(**d)`` back).

    Lengths count the span's special token: ``max_query_len`` and ``max_document_len`` include the
    span's ``[CLS]``, ``max_reason_len`` includes ``[Start]`` (so at most ``max_reason_len - 1``
    reason tokens are kept, and the targets are those tokens then ``[EOS]``).
    """

    prompt: str = "because [gMask], the correlation score is [CLS]"
    max_query_len: int = 64
    max_document_len: int = 512
    max_reason_len: int = 256
    position_mode: str = "restart"
    # Extra positions at the head of the P span, before the prompt text. Under the TTM mask only P
    # and G rows see Q and D together, so the single tower's whole Q-D interaction happens in the
    # few prompt positions; these give it more room (docs/paradigms.md, "Levers on the teacher").
    # Q and D rows never see P, so the two tower is the same with or without them.
    interaction_positions: int = 0
    interaction_fill: str = "gmask"

    def __post_init__(self):
        gmask, cls = SPECIAL_TOKENS["gmask"], SPECIAL_TOKENS["cls"]
        if not isinstance(self.prompt, str):
            raise ValueError(f"LayoutConfig.prompt must be a string, got {type(self.prompt).__name__}")
        if gmask not in self.prompt:
            raise ValueError(f"LayoutConfig.prompt must contain {gmask} (the reason placeholder); got {self.prompt!r}")
        if not self.prompt.endswith(cls):
            raise ValueError(
                f"LayoutConfig.prompt must end with {cls} (its last token is the single-tower vector V_s); "
                f"got {self.prompt!r}"
            )
        if SPECIAL_TOKENS["start"] in self.prompt:
            raise ValueError(f"LayoutConfig.prompt must not contain {SPECIAL_TOKENS['start']} (it opens the G span)")
        for name in ("max_query_len", "max_document_len", "max_reason_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LayoutConfig.{name} must be an int >= 1 (it counts the span's special token), got {v!r}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"LayoutConfig.position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        v = self.interaction_positions
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"LayoutConfig.interaction_positions must be an int >= 0, got {v!r}")
        if self.interaction_fill not in INTERACTION_FILLS:
            raise ValueError(f"LayoutConfig.interaction_fill must be one of {INTERACTION_FILLS}, "
                             f"got {self.interaction_fill!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EncodedSample:
    """One laid-out sequence (python lists, all of length ``sum(spans)``)."""

    input_ids: list[int]
    position_ids: list[int]
    lm_labels: list[int]
    spans: tuple[int, int, int, int]  # (Lq, Ld, Lp, Lg)
    label: int = IGNORE_INDEX  # -100 when absent
    truncated: str = ""  # the spans whose text was cut to its max length: a subset of "qdg"

    def __len__(self) -> int:
        return len(self.input_ids)


def _tokenize(tokenizer, text: str | None) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, ids: dict, config: LayoutConfig) -> list[int]:
    """The P span's token ids; checks that the tokenizer kept ``[gMask]`` and the final ``[CLS]`` whole."""
    p = _tokenize(tokenizer, config.prompt)
    if not p or p[-1] != ids["cls"] or ids["gmask"] not in p:
        raise ValueError(
            f"the tokenizer does not keep the prompt's special tokens whole (got {p} for {config.prompt!r}); "
            "call ugd.data.layout.add_special_tokens(tokenizer) first"
        )
    return p


def interaction_ids(tokenizer, ids: dict, query: str | None, config: LayoutConfig) -> list[int]:
    """The interaction positions that open the P span (``config.interaction_positions`` of them at most).

    ``"gmask"``: that many ``[gMask]`` tokens. ``"query"``: the query's first tokens again (fewer when
    the query is shorter, none for an empty query), within the same ``max_query_len`` cut as the Q span.
    """
    k = config.interaction_positions
    if k == 0:
        return []
    if config.interaction_fill == "gmask":
        return [ids["gmask"]] * k
    return _tokenize(tokenizer, query)[: min(k, config.max_query_len - 1)]


def _check_parts(parts: str) -> str:
    if parts not in PARTS:
        raise ValueError(f"unknown parts {parts!r}; expected one of {PARTS}")
    return parts


def record_texts(record, i: int, shape: str) -> tuple[str, str]:
    """(query, document) of record ``i``; a ValueError naming the record (and ``shape``, what a record
    holds) otherwise. Shared by ``UGDCollator`` and the embedding paradigms."""
    if not isinstance(record, Mapping):
        raise ValueError(f"record {i}: expected a mapping with 'query' and 'document', got {type(record).__name__}")
    for key in ("query", "document"):
        if key not in record:
            raise ValueError(f"record {i}: missing {key!r} (a record is {shape})")
        if not isinstance(record[key], str):
            raise ValueError(f"record {i}: {key!r} must be a string, got {type(record[key]).__name__}")
    return record["query"], record["document"]


def record_label(record, i: int) -> int | None:
    """The int label of record ``i`` (a mapping), None when absent; a ValueError naming the record otherwise."""
    label = record.get("label")
    if label is None:
        return None
    try:
        return int(label)
    except (TypeError, ValueError):
        raise ValueError(f"record {i}: 'label' must be an int, got {label!r}") from None


def encode_sample(
    tokenizer,
    ids: dict,
    query: str,
    document: str,
    reason: str | None = None,
    label: int | None = None,
    *,
    config: LayoutConfig,
    parts: str = "qdpg",
    _prompt: list[int] | None = None,
) -> EncodedSample:
    """Lays out one sample (docs/spec.md section 2).

    Args:
        tokenizer: a tokenizer holding the UGD special tokens.
        ids: ``add_special_tokens(tokenizer)`` / ``special_token_ids(tokenizer)``.
        query, document: texts; an empty text gives a span of ``[CLS]`` alone.
        reason: the G span's text; ``None`` or ``""`` gives ``Lg = 0`` (no L_gen for this sample).
        label: the class, or ``None`` (stored as -100).
        config: lengths, prompt and position mode.
        parts: which spans to build -- ``"qdpg"`` (full UGD), ``"qdp"`` (single tower), ``"qd"``
            (shared two tower), ``"q"`` (a query alone), ``"d"`` (a document alone: document tokens
            then ``[CLS]``, exactly as inside the full sequence). Unselected spans have length 0.
    """
    _check_parts(parts)
    cls = ids["cls"]
    q = d = p = g = []
    g_labels: list[int] = []
    truncated = ""

    def cut(text: str | None, limit: int, span: str) -> list[int]:
        nonlocal truncated
        tokens = _tokenize(tokenizer, text)
        if len(tokens) > limit:
            truncated += span
        return tokens[:limit]

    if "q" in parts:
        q = cut(query, config.max_query_len - 1, "q") + [cls]
    if "d" in parts:
        d = cut(document, config.max_document_len - 1, "d") + [cls]
    if "p" in parts:
        p = interaction_ids(tokenizer, ids, query, config) + (
            list(_prompt) if _prompt is not None else prompt_ids(tokenizer, ids, config))
    if "g" in parts and reason:
        r = cut(reason, config.max_reason_len - 1, "g")
        g = [ids["start"]] + r
        g_labels = r + [ids["eos"]]
    Lq, Ld, Lp, Lg = len(q), len(d), len(p), len(g)
    L = Lq + Ld + Lp + Lg
    if config.position_mode == "restart":
        positions = list(range(Lq)) + list(range(Ld)) + list(range(Lq + Ld, L))
    else:
        positions = list(range(L))
    labels = [IGNORE_INDEX] * (Lq + Ld + Lp) + g_labels
    return EncodedSample(
        input_ids=q + d + p + g,
        position_ids=positions,
        lm_labels=labels,
        spans=(Lq, Ld, Lp, Lg),
        label=IGNORE_INDEX if label is None else int(label),
        truncated=truncated,
    )


__all__ = [
    "IGNORE_INDEX",
    "INTERACTION_FILLS",
    "PARTS",
    "POSITION_MODES",
    "SPECIAL_TOKENS",
    "EncodedSample",
    "LayoutConfig",
    "add_special_tokens",
    "encode_sample",
    "interaction_ids",
    "load_tokenizer",
    "prompt_ids",
    "record_label",
    "record_texts",
    "special_token_ids",
]
