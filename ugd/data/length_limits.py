"""Length limits in training: every sequence inside the backbone's positions, truncation reported once.

A sequence is at most ``max_query_len + max_document_len + len(P) + max_reason_len`` tokens (the
spans' limits, each counting its special token), and its positions run up to that length in either
position mode. Training accepts positions beyond ``max_position_embeddings`` without complaint
(rotary embeddings have no table to overrun), but the model never learned them, and reason
generation refuses such a prompt: a run with the default layout on the 512-position demo backbone
trained for 200 000-character documents and then crashed when it showed its reasons. So
``python -m ugd.train`` checks the layout against the backbone before training
(``check_positions``): a random-init backbone is given the positions the layout needs
(``positions_needed``), a pretrained one that lacks them is a configuration error that says which
limit to lower.

``TruncationNotice`` reports, once per run, that texts were cut to the layout's limits (as
``ugd.predict`` does per call); ``UGDCollator`` calls it for every sample it lays out.
"""

from __future__ import annotations

import copy
import warnings

from .layout import SPECIAL_TOKENS, LayoutConfig, add_special_tokens, prompt_ids

_SPANS = {"q": ("queries", "max_query_len"), "d": ("documents", "max_document_len"), "g": ("reasons", "max_reason_len")}


def prompt_length(tokenizer, layout) -> int:
    """Tokens of the longest P span (interaction positions included); ``tokenizer`` need not hold the UGD
    special tokens yet (a copy gets them)."""
    vocab = tokenizer.get_vocab()
    if any(t not in vocab for t in SPECIAL_TOKENS.values()):
        tokenizer = copy.deepcopy(tokenizer)
    ids = add_special_tokens(tokenizer)
    return len(prompt_ids(tokenizer, ids, layout)) + getattr(layout, "interaction_positions", 0)


def positions_needed(layout, prompt_len: int, max_new_tokens: int = 0) -> int:
    """The longest sequence the layout allows: Q + D + P + G, where G is the longer of the training
    reason (``max_reason_len``, with ``[Start]``) and a generated one (``[Start]`` + ``max_new_tokens``)."""
    return layout.max_query_len + layout.max_document_len + prompt_len + max(layout.max_reason_len,
                                                                             1 + max_new_tokens)


def check_positions(backbone_config, layout, prompt_len: int, max_new_tokens: int = 0, *, error=ValueError) -> None:
    """Raises ``error`` when the layout's longest sequence runs past the backbone's positions."""
    text_config = backbone_config.get_text_config() if hasattr(backbone_config, "get_text_config") else backbone_config
    limit = getattr(text_config, "max_position_embeddings", None)
    need = positions_needed(layout, prompt_len, max_new_tokens)
    if limit is None or need <= limit:
        return
    room = limit - (need - layout.max_document_len)
    fix = (f"lower --max_document_len to {room}" if room >= 2 else
           "lower --max_query_len / --max_document_len / --max_reason_len")
    raise error(f"the layout's longest sequence is {need} tokens (max_query_len {layout.max_query_len} + "
                f"max_document_len {layout.max_document_len} + prompt {prompt_len} + reason "
                f"{max(layout.max_reason_len, 1 + max_new_tokens)} with max_reason_len {layout.max_reason_len} / "
                f"max_new_tokens {max_new_tokens}), beyond the backbone's max_position_embeddings={limit}; {fix}")


class TruncationNotice:
    """Warns the first time a text is cut to the layout's limits, and never again for this object (one
    per collator, so once per run; each DataLoader worker process holds its own copy)."""

    def __init__(self, layout, what: str = "UGDCollator"):
        self.layout = layout
        self.what = what
        self.shown = False

    def __call__(self, spans: str) -> None:
        if self.shown or not spans:
            return
        self.shown = True
        cut = ", ".join(f"{_SPANS[s][0]} longer than {_SPANS[s][1]}={getattr(self.layout, _SPANS[s][1])} tokens"
                        for s in "qdg" if s in spans)
        warnings.warn(f"{self.what}: {cut} are truncated (their beginning is kept; the same limits apply when the "
                      "model is served). Raise the limit to keep more; this is reported once per run.", stacklevel=2)


def check_model_positions(model, tokenizer, max_new_tokens: int = 0, *, error=ValueError) -> None:
    """``check_positions`` for a ``UGDModel`` and its layout (and its document backbone, if any)."""
    layout = LayoutConfig(**model.config.layout) if model.config.layout else LayoutConfig()
    n = prompt_length(tokenizer, layout)
    for backbone in (model.backbone, model.document_backbone):
        if backbone is not None:
            check_positions(backbone.config, layout, n, max_new_tokens, error=error)


__all__ = ["TruncationNotice", "check_model_positions", "check_positions", "positions_needed", "prompt_length"]
