"""Reason generation (docs/spec.md section 7, "Reason"): packed prefill under the partition mask, then batched
decoding with a KV cache through transformers' ``generate``.

    reasons = model.generate_reason([("query", "document"), ...], max_new_tokens=64)   # greedy
    ids = generate_reason_ids(model, tokenizer, records, do_sample=True, top_p=0.9)

Per batch of up to ``batch_size`` pairs (sorted by length first, so that little padding is decoded):

1. Prefill. Lay out Q D P for each pair (``ugd.data.layout`` parts ``"qdp"``) and pack them into one
   padding-free sequence with the mask the paradigm was trained with (the paradigm's ``prefill_mask``: ``ttm`` for
   ugd-ttm, where the query and the document see only themselves, ``stm`` for ugd-stm). One forward
   of the decoder (no LM head) with the packing metadata and ``use_cache=True`` fills a cache whose
   keys and values were computed under the partition mask.
2. Re-batch. The packed cache ``[1, Hkv, T, D]`` per layer is gathered into a left-padded batch
   ``[B, Hkv, A_max, D]`` (A = Lq + Ld + Lp per pair); nothing is recomputed.
3. Decode. ``backbone.generate`` continues from that cache: ``input_ids`` are the left-padded
   prompts followed by ``[Start]`` and ``attention_mask`` marks the padding (``generate`` numbers new
   tokens by the real tokens before them: ``[Start]`` gets position A, as in training). The cache holds all but the last column, so the first step runs only
   ``[Start]``; it and every later token see every earlier token of their pair, which is a G row's
   interval ``[0, i + 1)``. Greedy unless ``do_sample=True``; other ``generate`` keywords
   (``temperature``, ``top_p``, ``repetition_penalty``, ...) pass through. Decoding stops at the
   tokenizer's EOS or after ``max_new_tokens``.

``tests/serving/test_inference.py`` checks the batched, cached result against recomputing the whole sequence
Q D P ``[Start]`` g1..gk under the partition mask at every step, without a cache.
"""

from __future__ import annotations

import torch
import transformers
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..data.layout import LayoutConfig, encode_sample, special_token_ids
from ..data.packing import pack
from ..modules.packed import move_batch, packed_inputs
from .inference import as_pairs, check_count, eval_mode, layout_of, require, tqdm_disable, warn_truncated


#: ``generate`` keywords that would change the batch shape; the re-batched cache is made for one
#: sequence per pair.
_REFUSED = ("num_beams", "num_return_sequences", "past_key_values", "attention_mask", "position_ids",
            "input_ids", "assistant_model")


def check_generative(model) -> str:
    """The prefill mask of ``model``'s paradigm; a ValueError for paradigms without a reason generator."""
    require(model, "generate")
    return model.paradigm.prefill_mask


def prompt_samples(model, tokenizer, pairs, layout: LayoutConfig | None = None) -> list:
    """``EncodedSample``s of Q D P (no G span) for ``pairs`` of (query, document)."""
    layout = layout or layout_of(model)
    ids = special_token_ids(tokenizer)
    return [encode_sample(tokenizer, ids, q, d, None, None, config=layout, parts="qdp") for q, d in pairs]


def _kv_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError(f"reason generation needs transformers >= 5 (Cache.layers); this is {transformers.__version__}")
    return [(layer.keys, layer.values) for layer in layers]


def _left_padded_cache(backbone, packed_cache, index: torch.Tensor, valid: torch.Tensor):
    """The packed prefill cache re-batched: per layer ``[1, Hkv, T, D]`` -> ``[B, Hkv, A_max, D]``.

    ``index`` [B, A_max]: the packed token behind each slot (any token on padding slots); ``valid``
    [B, A_max]: False on padding slots, whose keys and values are zeroed (the mask hides them anyway).
    """
    cache = DynamicCache(config=backbone.config)
    keep = valid[:, None, :, None]
    for i, (k, v) in enumerate(_kv_layers(packed_cache)):
        k = k[0][:, index].transpose(0, 1) * keep.to(k.dtype)  # [Hkv, B, A, D] -> [B, Hkv, A, D]
        v = v[0][:, index].transpose(0, 1) * keep.to(v.dtype)
        cache.update(k.contiguous(), v.contiguous(), i)
    return cache


def _check_positions(backbone, longest_prompt: int, max_new_tokens: int) -> None:
    limit = getattr(backbone.config.get_text_config(), "max_position_embeddings", None)
    need = longest_prompt + 1 + max_new_tokens
    if limit is not None and need > limit:
        raise ValueError(
            f"a prompt of {longest_prompt} tokens plus [Start] plus max_new_tokens={max_new_tokens} reaches position "
            f"{need}, beyond the backbone's max_position_embeddings={limit}; lower max_new_tokens or the layout's "
            "max_query_len / max_document_len")


@torch.no_grad()
def _generate_batch(model, samples, mask: str, start_id: int, eos: int, pad: int, max_new_tokens: int,
                    generate_kwargs: dict) -> list[list[int]]:
    backbone = model.backbone
    device = model.head_device
    batch = move_batch(pack(samples, mask), device)
    # 1. prefill: the decoder alone (no LM head), into a cache without sliding-window layers (the
    #    packed sequence may be longer than a window that each pair fits in)
    prefill = backbone.get_decoder()(**packed_inputs(backbone, batch), use_cache=True, past_key_values=DynamicCache())

    # 2. re-batch, left-padded
    lengths = torch.tensor([len(s) for s in samples], device=device)
    width = int(lengths.max())
    B = len(samples)
    col = torch.arange(width, device=device)[None, :]
    pad_left = (width - lengths)[:, None]
    valid = col >= pad_left
    index = (batch["cu_seqlens"][:-1].to(torch.int64)[:, None] + col - pad_left).clamp_min(0)
    index = torch.where(valid, index, torch.zeros_like(index))
    cache = _left_padded_cache(backbone, prefill.past_key_values, index, valid)

    # 3. decode with generate(): prompts + [Start], the cache covers all but the last column
    ids = torch.where(valid, batch["input_ids"][0][index], torch.full_like(index, pad))
    # generate() numbers the new tokens from the padding mask (count of earlier real tokens): [Start]
    # gets A, as in training, because P and G positions continue from Lq + Ld in both position modes.
    last_pos = batch["position_ids"][0][batch["cu_seqlens"][1:].to(torch.int64) - 1]
    if not torch.equal(last_pos + 1, lengths):
        raise RuntimeError("the prompt positions do not end at A - 1; reason generation assumes the positions of "
                           "docs/spec.md section 4 (P and G continue from Lq + Ld)")
    start = torch.full((B, 1), start_id, dtype=ids.dtype, device=device)
    input_ids = torch.cat([ids, start], 1)
    attention_mask = torch.cat([valid, torch.ones((B, 1), dtype=torch.bool, device=device)], 1).to(torch.long)
    out = backbone.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                            max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **generate_kwargs)
    result = []
    for row in out[:, input_ids.shape[1]:].tolist():
        result.append(row[: row.index(eos)] if eos in row else row)
    return result


def generate_reason_ids(model, tokenizer, pairs, *, max_new_tokens: int = 64, do_sample: bool = False,
                        batch_size: int = 16, layout: LayoutConfig | None = None, show_progress: bool | None = False,
                        **generate_kwargs) -> list[list[int]]:
    """Token ids of the reason for each pair (EOS not included), in the order of ``pairs``.

    Args:
        pairs: (query, document) tuples or ``{"query", "document"}`` mappings (``ugd.serving.inference.as_pairs``).
        max_new_tokens: length limit of a reason (>= 0).
        do_sample: sample instead of greedy decoding (then ``temperature``, ``top_k``, ``top_p``, ... apply).
        batch_size: pairs decoded together (>= 1).
        layout: default, the model's own (``model.config.layout``): prompt text and max lengths.
        show_progress: a tqdm bar over pairs (None: only on a terminal).
        generate_kwargs: passed to ``transformers`` ``generate``; beams and several sequences per pair
            are refused.
    """
    mask = check_generative(model)
    pairs = as_pairs(pairs)
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    check_count("batch_size", batch_size, minimum=1)
    refused = [k for k in _REFUSED if k in generate_kwargs]
    if refused:
        raise ValueError(f"generate_reason does not take {refused}: it decodes one sequence per pair from its own "
                         "prefill (beam search and several sequences per pair are not supported)")
    if not pairs or max_new_tokens == 0:
        return [[] for _ in pairs]
    ids = special_token_ids(tokenizer)
    samples = prompt_samples(model, tokenizer, pairs, layout)
    warn_truncated(samples, "reason prompts")
    _check_positions(model.backbone, max(len(s) for s in samples), max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids["eos"]
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    result: list[list[int]] = [[] for _ in samples]
    with eval_mode(model), tqdm(total=len(samples), unit="pair", desc="reasons",
                                disable=tqdm_disable(show_progress)) as bar:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo: lo + batch_size]
            out = _generate_batch(model, [samples[i] for i in chunk], mask, ids["start"], ids["eos"], pad,
                                  max_new_tokens, dict(generate_kwargs, do_sample=do_sample))
            for i, r in zip(chunk, out):
                result[i] = r
            bar.update(len(chunk))
    return result


def generate_reason(model, tokenizer, pairs, **kwargs) -> list[str]:
    """The reasons for ``pairs`` as text (``generate_reason_ids``' arguments)."""
    ids = generate_reason_ids(model, tokenizer, pairs, **kwargs)
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]


__all__ = ["check_generative", "generate_reason", "generate_reason_ids", "prompt_samples"]
