"""From records on disk to packed batches.

    records        read_records (UGD jsonl, LCQMC/BQ/ATEC, QQP, NLI, e-SNLI), RecordDataset, write_jsonl
    layout         special tokens, LayoutConfig, encode_sample (spans, positions, reason labels), load_tokenizer
    packing        pack: samples -> one padding-free packed batch with its key intervals; budget_batches
    collator       UGDCollator: records -> packed batches, as the paradigm lays them out
    length_limits  positions a layout needs, truncation notices, the backbone's position check
    demo           the generated demo data, its word-level tokenizer and tiny random-init backbone configs
    teachers       flipped-kd's sentence-embedding teacher and its score cache
"""
