"""Helpers for tests and examples: tokenizers built offline, in-process (no hub download).

    tok = make_test_tokenizer()                      # a word-level tokenizer over a small built-in corpus
    tok = make_test_tokenizer(["my own words here"])  # ... plus the words of these texts

The tokenizer is a ``transformers.PreTrainedTokenizerFast`` with ``eos_token="</s>"``,
``pad_token="<pad>"`` and ``unk_token="<unk>"``, a whitespace/punctuation pre-tokenizer and no
normalizer (words are case-sensitive). It does *not* hold the UGD special tokens: call
``ugd.data.layout.add_special_tokens(tok)`` as for a real backbone.
"""

from __future__ import annotations

from typing import Iterable

from .data.demo import word_level_tokenizer
from .data.demo import EOS, PAD, UNK  # noqa: F401  (the builder lives in ugd.data.demo)

DEFAULT_TEXTS = (
    "how do I reset my online banking password",
    "what should I do if I forgot the password of my bank account",
    "the loan was approved yesterday and the money arrived today",
    "can I repay the credit card bill early without a fee",
    "A man is playing a guitar on the street.",
    "A person plays music outdoors.",
    "Both questions ask how to recover a forgotten password, so they match.",
    "The document talks about loans while the query asks about credit cards; they do not match.",
    "because the correlation score is high, the two texts are related",
    "query document reason label yes no 0 1 2 3 relevant irrelevant",
)


def make_test_tokenizer(texts: Iterable[str] | None = None):
    """A small word-level ``PreTrainedTokenizerFast`` trained in-process on ``DEFAULT_TEXTS`` + ``texts``.

    Every word and punctuation mark of the given texts is in the vocabulary (no ``<unk>`` for them).
    Ids: ``<pad>`` 0, ``<unk>`` 1, ``</s>`` 2, then the words.
    """
    return word_level_tokenizer(list(DEFAULT_TEXTS) + [t for t in (texts or ()) if t])
