"""Tiny random-weight UGD checkpoints on disk, for the CLI tests (``test_predict_cli``, ``test_reliability``)."""

from __future__ import annotations

import torch

NUM_LABELS = 4  # the demo records' labels are 0..3
TINY_BACKBONE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "num_key_value_heads": 2}


def save_tiny_checkpoint(path, records, paradigm: str, seed: int) -> str:
    """A ``paradigm`` model with a one-layer random backbone (tokenizer built from ``records``) saved to ``path``."""
    from transformers import AutoModelForCausalLM

    from ugd.data.demo import build_tokenizer, tiny_backbone_config
    from ugd.data.layout import LayoutConfig
    from ugd.model import UGDConfig, UGDModel

    torch.manual_seed(seed)
    tok = build_tokenizer(records)
    layout = LayoutConfig(max_query_len=16, max_document_len=40, max_reason_len=16)
    bb = AutoModelForCausalLM.from_config(tiny_backbone_config(len(tok) + 3, initializer_range=0.3, **TINY_BACKBONE),
                                          attn_implementation="ugd")
    model = UGDModel.from_backbone(bb, tok, UGDConfig(paradigm=paradigm, num_labels=NUM_LABELS, kl_dim=8,
                                                      layout=layout.to_dict()))
    model.save_pretrained(str(path))
    return str(path)
