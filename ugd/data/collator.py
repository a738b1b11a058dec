"""The collator of every paradigm: records -> packed batches (docs/spec.md sections 3, 6, 8).

A packed batch (``ugd.data.packing.pack``) is one sequence of T tokens holding B samples back to back
(no padding), as a dict:

    input_ids     int64 [1, T]
    position_ids  int64 [1, T]   (per sample, see ugd.data.layout: restart or continuous)
    lm_labels     int64 [1, T]   -100 except on G spans, where position t holds the target of position t
                                 (already aligned: do NOT shift); ``lm_labels != -100`` marks the G tokens
    spans         int32 [B, 4]   (Lq, Ld, Lp, Lg) per sample
    cu_seqlens    int32 [B + 1]  sample b holds tokens [cu_seqlens[b], cu_seqlens[b+1])
    kv_start      int32 [T]      row i reads keys [kv_start[i], kv_end[i]) of its own sample
    kv_end        int32 [T]      (relative to the sample start) -- ugd_ops.row_intervals(spans, mask)
    max_seqlen    int            the longest sample (a python int, not a tensor)
    labels        int64 [B]      class labels, -100 where absent
    cls_index     int64 [B, 3]   absolute token index of the query [CLS] (V_Q), the document [CLS] (V_D)
                                 and the prompt's final [CLS] (V_s); -1 where that span is empty

All tensors are on the CPU; move them with the model (``max_seqlen`` stays an int).
"""

from __future__ import annotations

import warnings
from typing import Sequence

from .. import paradigms
from ..paradigms import Paradigm
from .layout import (EncodedSample, LayoutConfig, encode_sample, prompt_ids, record_label, record_texts,
                     special_token_ids)
from .length_limits import TruncationNotice
from .packing import pack


class UGDCollator:
    """Records -> packed batches for one training paradigm (docs/spec.md sections 6 and 8).

    A record is a mapping ``{"query": str, "document": str, "label": int (optional at inference),
    "reason": str (optional)}``.

    ``paradigm``: a registered name or the ``ugd.paradigms.Paradigm`` itself (``collator.paradigm`` is the
    object). ``__call__`` asks the paradigm (``Paradigm.collate``), whose default is
    ``pack_records``: ``pack(samples, mask)`` of the paradigm's ``parts`` and ``mask`` -- for
    ``ugd-ttm`` parts Q D P G, TTM mask; ``ugd-stm`` Q D P G, STM mask; ``shared-ttm`` Q D, TTM mask;
    ``stm`` Q D P, STM mask. For parts ``"q|d"`` (the two-backbone ``ttm`` baseline) it returns
    ``{"query": pack(lone queries, "bidirectional"), "document": pack(lone documents, "bidirectional"),
    "labels": int64 [B]}``: sample b of both packs is record b. A paradigm may add fields.

    ``model_config``: the model's ``UGDConfig``, for paradigms whose batches depend on their options
    (the embedding paradigms read ``collator.model_config``).

    ``max_tokens``: an optional token budget per packed batch. The collator only warns when a batch
    exceeds it; a batch sampler enforces it with ``budget_batches(collator.lengths(records), max_tokens)``.

    The tokenizer must already hold the UGD special tokens (``ugd.data.layout.add_special_tokens``).
    """

    def __init__(self, tokenizer, *, paradigm: str | Paradigm = "ugd-ttm", layout: LayoutConfig | None = None,
                 max_tokens: int | None = None, model_config=None):
        # a registered name is looked up once here; the object is what every later step reads
        self.paradigm = paradigm if isinstance(paradigm, Paradigm) else paradigms.get(paradigm)
        self.parts, self.mask = self.paradigm.parts, self.paradigm.mask
        # the model's UGDConfig, for paradigms whose batches depend on their options (ullme, flipped-kd);
        # ugd.train passes it
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.layout = layout if layout is not None else LayoutConfig()
        if not isinstance(self.layout, LayoutConfig):
            raise ValueError(f"layout must be a LayoutConfig, got {type(self.layout).__name__}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.ids = special_token_ids(tokenizer)
        self._prompt = prompt_ids(tokenizer, self.ids, self.layout) if "p" in self.parts else None

        self._truncation = TruncationNotice(self.layout)  # texts cut to the layout's limits: warned once

    # -- encoding ------------------------------------------------------------------------------

    @staticmethod
    def _fields(record, i: int):
        query, document = record_texts(record, i, "{'query', 'document', 'label', 'reason'?}")
        reason = record.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise ValueError(f"record {i}: 'reason' must be a string or absent, got {type(reason).__name__}")
        return query, document, reason, record_label(record, i)

    def _encode(self, record, i: int, parts: str) -> EncodedSample:
        query, document, reason, label = self._fields(record, i)
        sample = encode_sample(self.tokenizer, self.ids, query, document, reason, label,
                               config=self.layout, parts=parts, _prompt=self._prompt)
        self._truncation(sample.truncated)
        return sample

    def encode(self, record, index: int = 0):
        """One record -> its ``EncodedSample`` (for ``ttm``: a pair (query sample, document sample))."""
        if self.mask is None:
            return self._encode(record, index, "q"), self._encode(record, index, "d")
        return self._encode(record, index, self.parts)

    def lengths(self, records: Sequence) -> list[int]:
        """Packed length of each record under this paradigm (for ``budget_batches``); for ``ttm``
        it is Lq + Ld, the tokens of both packs together."""
        out = []
        for i, r in enumerate(records):
            enc = self.encode(r, i)
            out.append(sum(len(e) for e in enc) if isinstance(enc, tuple) else len(enc))
        return out

    def __call__(self, records: Sequence) -> dict:
        if len(records) == 0:
            raise ValueError("UGDCollator got an empty list of records")
        return self.paradigm.collate(self, records)

    def pack_records(self, records: Sequence) -> dict:
        """The default batch of a paradigm: its ``parts`` packed with its ``mask`` (see the class docstring)."""
        if self.mask is None:  # ttm: two backbones, two separate packs
            pairs = [self.encode(r, i) for i, r in enumerate(records)]
            query = pack([q for q, _ in pairs], "bidirectional")
            document = pack([d for _, d in pairs], "bidirectional")
            self._check_budget(max(query["input_ids"].shape[1], document["input_ids"].shape[1]))
            return {"query": query, "document": document, "labels": query["labels"].clone()}
        batch = pack([self.encode(r, i) for i, r in enumerate(records)], self.mask)
        self._check_budget(batch["input_ids"].shape[1])
        return batch

    def _check_budget(self, T: int) -> None:
        if self.max_tokens is not None and T > self.max_tokens:
            warnings.warn(f"packed batch of {T} tokens exceeds max_tokens={self.max_tokens}", stacklevel=3)


__all__ = ["UGDCollator"]
