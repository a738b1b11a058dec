"""ugd: UGD text matching -- two-tower, single-tower and reason generation in one decoder LLM.

Modules (import them directly; this package imports nothing heavy on its own):

    ugd.layout    special tokens, LayoutConfig, encode_sample (SPEC sections 2 and 4)
    ugd.collator  packing into padding-free batches, UGDCollator, budget_batches
    ugd.viz       the attention partition of a real sample as a PNG (``python -m ugd.viz``)
    ugd.testing   offline test tokenizers
"""
