"""ugd: UGD text matching on Hugging Face causal LMs.

One decoder runs a two-tower matcher, a single-tower matcher and a reason generator, separated only
by a partitioned attention mask (docs/spec.md sections 1-6):

    ugd.model      UGDConfig, UGDModel: backbone + the paradigm's heads and losses, save/load
    ugd.checkpoint the UGD checkpoint format: file names, the one writer, the one reader, the checks
    ugd.paradigms  the paradigm registry: the five UGD paradigms, d2llm, ullme, flipped-kd (docs/paradigms.md)
    ugd.modules    building blocks: the attention function (attn_implementation="ugd", registered on import
                   of ugd), heads, losses, packed batches through a backbone
    ugd.data       records and readers, the layout (special tokens, LayoutConfig, encode_sample), UGDCollator,
                   length limits, demo data, flipped-kd's teacher
    ugd.training   UGDTrainer, metrics, presets, argument checks, SIGTERM handling, resume checks
    ugd.serving    encode/predict/rank, reason generation, DocumentVectors (stored document vectors)
    ugd.train      python -m ugd.train: the training job
    ugd.predict    python -m ugd.predict: JSONL in, JSONL out
    ugd.evaluate   python -m ugd.evaluate: a checkpoint's report on a labelled file
    ugd.study      python -m ugd.study: the paper's tables, several seeds
    ugd.viz        python -m ugd.viz: a picture of the attention partition
"""

from .modules import attention  # noqa: F401  (registers attn_implementation="ugd" with transformers)
from .data.collator import UGDCollator
from .serving.doc_vectors import DocumentVectors
from .data.layout import LayoutConfig, add_special_tokens
from .model import UGDConfig, UGDModel, UGDOutput

__all__ = ["DocumentVectors", "LayoutConfig", "UGDCollator", "UGDConfig", "UGDModel", "UGDOutput", "add_special_tokens"]
