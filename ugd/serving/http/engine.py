"""The model side of the server: loading a checkpoint safely, what it serves, and the batched work.

    engine = ModelEngine(model)                     # ugd.serve loads the model (safetensors only)
    engine.run(("single_tower",), [(q, d), ...])   # what the batcher calls, in its worker thread

Heads (the batcher groups requests by these keys; each is one call of the library's own API, so a
served answer is the answer of ``model.predict`` / ``model.rank`` / ``model.generate_reason``):

    ("two_tower",)           (query, document) pairs -> [C] probabilities   model.predict(mode="two_tower")
    ("single_tower",)        (query, document) pairs -> [C] probabilities   model.predict(mode="single_tower")
    ("reason", n)            (query, document) pairs -> reason text          model.generate_reason(max_new_tokens=n)
    ("query_vectors",)       query texts -> V_Q rows                         encode_texts(..., "query")
    ("document_vectors",)    document texts -> V_D rows                      encode_texts(..., "document")
    ("retrieve",)            (query, k) -> the store's k best (ids, texts, scores) by the two tower  (model.rank)

Loading reads safetensors only: a checkpoint whose backbone weights are a pickle (``pytorch_model.bin``)
is refused before anything is read, and transformers is told ``use_safetensors=True``.
"""

from __future__ import annotations

import os

import torch

from ...checkpoint import DOCUMENT_BACKBONE_DIR, backbone_weight_files
from ...model import UGDModel
from ..generate import generate_reason
from ..inference import DEFAULT_BATCH_TOKENS, encode_texts, predict

#: request mode -> the ``MODE_NEEDS`` key that says whether the paradigm serves it
SCORE_MODES = ("two_tower", "single_tower")


class NotServable(ValueError):
    """The checkpoint's paradigm cannot serve what was asked (the paradigm's own one-line message)."""


def check_safetensors_only(path: str, two_backbones: bool) -> None:
    """Refuses a checkpoint whose weights are not all safetensors: a pickle can run code when it is read."""
    folders = [path] + ([os.path.join(path, DOCUMENT_BACKBONE_DIR)] if two_backbones else [])
    for folder in folders:
        if backbone_weight_files(folder) is None:
            raise ValueError(f"--model {path}: {folder} has no model.safetensors (nor a sharded safetensors index); "
                             "ugd serve loads safetensors only, never pickles: convert the weights (save_pretrained "
                             "with safe_serialization) and try again")


class ModelEngine:
    def __init__(self, model: UGDModel, *, store=None, batch_tokens: int = DEFAULT_BATCH_TOKENS, positive_label: int | None = None):
        self.model = model
        self.store = store  # a store.DocumentStore, or None (no --doc_vectors)
        self.config = model.config
        self.batch_tokens = batch_tokens
        c = model.config.num_labels
        # the last class: "match" in binary data, "exact" in graded data such as the demo's 0..3
        self.positive_label = c - 1 if positive_label is None else positive_label
        if not 0 <= self.positive_label < c:
            raise ValueError(f"--positive_label must be a class index in [0, {c}), got {positive_label}")
        impl = model.config.paradigm_impl
        self.modes = [m for m in impl.modes(model.config)]

    # ------------------------------------------------------------------ what it serves

    @property
    def paradigm(self) -> str:
        return self.config.paradigm

    def serves(self, mode: str) -> bool:
        return mode in self.modes

    def require(self, mode: str) -> None:
        """NotServable with the paradigm's message when the checkpoint cannot serve ``mode``
        (``two_tower``, ``single_tower``, ``reason`` or ``documents``)."""
        try:
            self.config.paradigm_impl.check_mode(self.config, mode)
        except ValueError as e:
            raise NotServable(str(e)) from None

    def default_rerank_mode(self) -> str:
        """The single tower (a cross-encoder, what rerankers are) where the checkpoint has one."""
        return "single_tower" if self.serves("single_tower") else "two_tower"

    # ------------------------------------------------------------------ the batched work

    def run(self, head: tuple, items: list) -> list:
        kind = head[0]
        model = self.model
        if kind in SCORE_MODES:
            probs = predict(model, items, mode=kind, batch_tokens=self.batch_tokens, show_progress=False)
            return list(probs)
        if kind == "reason":
            return generate_reason(model, model.tokenizer, items, max_new_tokens=head[1], batch_size=len(items))
        if kind in ("query_vectors", "document_vectors"):
            side = "query" if kind == "query_vectors" else "document"
            v = encode_texts(model, items, side, batch_tokens=self.batch_tokens, show_progress=False,
                             output_device="cpu")
            return list(v)
        if kind == "retrieve":
            v_q = encode_texts(model, [q for q, _ in items], "query", batch_tokens=self.batch_tokens,
                               show_progress=False, output_device=None)
            return self.store.top_k(model, v_q, [k for _, k in items], self.positive_label)
        raise ValueError(f"unknown head {head!r}")


__all__ = ["ModelEngine", "NotServable", "SCORE_MODES", "check_safetensors_only"]
