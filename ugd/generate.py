"""Greedy reason generation for one query-document pair (SPEC section 7, "Reason").

    text = generate_reason(model, tokenizer, {"query": ..., "document": ...}, max_new_tokens=64)

How (see docs/transformers.md, "Decode after a packed prefill"):

1. Lay out Q D P ``[Start]`` for the one sample (``ugd.layout.encode_sample`` with parts "qdp", then
   ``[Start]`` appended as a G span of length 1) and pack it with the paradigm's mask: ``ttm`` for
   ugd-ttm (the query and the document see only themselves, as in training), ``stm`` for ugd-stm.
2. Prefill through ``model.backbone`` with the packing metadata and ``use_cache=True``: the KV cache
   then holds keys and values computed under the partition mask. Only the last position's logits
   are computed (``logits_to_keep=1``).
3. Decode token by token *without* metadata (a new G token sees every earlier token, which is its
   interval ``[0, i+1)``), ``position_ids`` continuing from the last one, greedy, until the
   tokenizer's EOS (``</s>`` for the demo tokenizer) or ``max_new_tokens``.

One sample at a time: batched decoding from packed prefills would need per-row caches merged with
left padding, which transformers' packed path does not offer. This is the small generator the demo
uses to show reasons; it is not a serving path.
"""

from __future__ import annotations

import torch

from .collator import pack
from .layout import LayoutConfig, encode_sample, special_token_ids

#: the mask a reason is prefilled with, per paradigm (those with a generative task)
PREFILL_MASK = {"ugd-ttm": "ttm", "ugd-stm": "stm"}


def _layout(model) -> LayoutConfig:
    return LayoutConfig(**model.config.layout) if model.config.layout else LayoutConfig()


def prefill_batch(model, tokenizer, record: dict, layout: LayoutConfig | None = None) -> dict:
    """The packed batch of Q D P ``[Start]`` for one record, with the paradigm's prefill mask."""
    paradigm = model.config.paradigm
    if paradigm not in PREFILL_MASK:
        raise ValueError(f"paradigm {paradigm!r} has no generative task; reasons need one of {sorted(PREFILL_MASK)}")
    layout = layout or _layout(model)
    ids = special_token_ids(tokenizer)
    s = encode_sample(tokenizer, ids, record["query"], record["document"], None, None, config=layout, parts="qdp")
    Lq, Ld, Lp, _ = s.spans
    s.input_ids.append(ids["start"])
    s.position_ids.append(s.position_ids[-1] + 1)
    s.lm_labels.append(-100)
    s.spans = (Lq, Ld, Lp, 1)
    return pack([s], PREFILL_MASK[paradigm])


@torch.no_grad()
def generate_reason_ids(model, tokenizer, record: dict, *, max_new_tokens: int = 64,
                        layout: LayoutConfig | None = None) -> list[int]:
    """Greedy token ids of the reason for ``record`` (EOS not included)."""
    if max_new_tokens < 1:
        return []
    backbone = model.backbone
    device = model.heads.classifier.weight.device
    was_training = model.training
    model.eval()
    try:
        batch = prefill_batch(model, tokenizer, record, layout)
        eos = special_token_ids(tokenizer)["eos"]
        kwargs = dict(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                      use_cache=True, logits_to_keep=1)
        if backbone.config._attn_implementation == "ugd":
            kwargs.update(cu_seqlens=batch["cu_seqlens"].to(device), kv_start=batch["kv_start"].to(device),
                          kv_end=batch["kv_end"].to(device), max_seqlen=batch["max_seqlen"])
        else:  # eager / sdpa: the same partition as a dense additive mask (reference path)
            import ugd_ops

            allowed = ugd_ops.dense_mask(batch["cu_seqlens"], batch["kv_start"], batch["kv_end"]).to(device)
            dtype = backbone.get_input_embeddings().weight.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            kwargs["attention_mask"] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
        out = backbone(**kwargs)
        cache = out.past_key_values
        position = int(batch["position_ids"][0, -1])
        generated: list[int] = []
        token = int(out.logits[0, -1].argmax())
        while token != eos and len(generated) < max_new_tokens:
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
            position += 1
            out = backbone(input_ids=torch.tensor([[token]], device=device),
                           position_ids=torch.tensor([[position]], device=device),
                           past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = int(out.logits[0, -1].argmax())
        return generated
    finally:
        model.train(was_training)


def generate_reason(model, tokenizer, record: dict, *, max_new_tokens: int = 64,
                    layout: LayoutConfig | None = None) -> str:
    """The greedy reason for ``record`` ({"query", "document", ...}) as text."""
    ids = generate_reason_ids(model, tokenizer, record, max_new_tokens=max_new_tokens, layout=layout)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


__all__ = ["PREFILL_MASK", "generate_reason", "generate_reason_ids", "prefill_batch"]
