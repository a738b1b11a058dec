"""ugd: UGD text matching on Hugging Face causal LMs.

One decoder runs a two-tower matcher, a single-tower matcher and a reason generator, separated only
by a partitioned attention mask (docs/spec.md sections 1-6):

    ugd.layout     special tokens, LayoutConfig, encode_sample (spans, positions, reason labels)
    ugd.collator   UGDCollator: records -> one padding-free packed batch with its key intervals
    ugd.attention  attn_implementation="ugd" for transformers (registered on import of ugd)
    ugd.paradigms  the paradigm registry: the five UGD paradigms, d2llm, ullme, flipped-kd (docs/paradigms.md)
    ugd.model      UGDConfig, UGDModel: backbone + the paradigm's heads and losses, save/load
    ugd.inference  encode_queries/documents, predict, rank (two-tower and single-tower serving)
    ugd.doc_vectors DocumentVectors: stored document vectors (safetensors), found by text
    ugd.generate   batched reason generation: packed prefill, then a KV cache
    ugd.predict    python -m ugd.predict: JSONL in, JSONL out
    ugd.viz        python -m ugd.viz: a picture of the attention partition
"""

from . import attention  # noqa: F401  (registers attn_implementation="ugd" with transformers)
from .collator import UGDCollator
from .doc_vectors import DocumentVectors
from .layout import LayoutConfig, add_special_tokens
from .model import UGDConfig, UGDModel, UGDOutput

__all__ = ["DocumentVectors", "LayoutConfig", "UGDCollator", "UGDConfig", "UGDModel", "UGDOutput", "add_special_tokens"]
