"""Using a trained model: scores, rankings, reasons, stored document vectors.

    inference      encode_queries/documents, predict, rank (two-tower and single-tower serving)
    generate       batched reason generation: packed prefill, then a KV cache
    doc_vectors    DocumentVectors: stored document vectors (safetensors), found by text
    doc_shards     building a document store in parts (one per process) and merging them
    reason_scores  ROUGE-L and BLEU of generated reasons against the gold ones
"""
