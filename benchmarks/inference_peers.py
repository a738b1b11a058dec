"""The inference peers of benchmarks/test_bench_inference.py: the same model served by stock transformers.

The benchmark compares ugd's plug-and-play inference (docs/spec.md section 7: ``encode_documents``,
``predict`` in both modes, ``ugd.serving.generate.generate_reason_ids``) against one peer, "sdpa-padded"
(``PEER``): a deep copy of the same model (same weights, ``make_peer``), its backbone switched to
``attn_implementation="sdpa"``, served the way a plain transformers pipeline serves the UGD layout --
a padded ``[B, L]`` batch with a dense additive ``[B, 1, L, L]`` mask of the partition
(``padded_batch``, built from ``ugd_ops.row_intervals`` through ``ugd.data.packing.pack``: each span
sees what it sees in training; padding rows see only themselves so that no softmax row is empty).

Peers, one per figure:
    peer_encode        V_Q or V_D ``[N, H]`` of lone texts (text + ``[CLS]``): right-padded, each span
                       bidirectional within itself, read at its ``[CLS]``. Peer of
                       ``model.encode_documents`` / ``model.encode_queries``.
    peer_predict       class probabilities ``[N, C]`` (float32, CPU). ``two_tower``: the two encodings
                       above, then the model's own heads (``score_pairs``). ``single_tower``: right-padded
                       Q D P sequences under the paradigm's dense partition mask, V_s at the last
                       ``[CLS]``, then the same classifier. Peer of ``model.predict``.
    peer_prefill       left-padded Q D P prompts (``prompts``), one forward with the dense prefill
                       mask and ``use_cache=True``.
    peer_generate_ids  greedy reason token ids: ``peer_prefill``, then the very ``backbone.generate``
                       call the UGD path makes (prompts + ``[Start]``, a 2D padding mask) continuing
                       from that cache. Peer of ``ugd.serving.generate.generate_reason_ids``.

Why the comparison is fair: both sides run the same weights, the same tokenization and truncation
(``ugd.data.layout.encode_sample`` / ``ugd.serving.generate.prompt_samples``), inputs sorted by length, and the
same token budget per batch (``batch_tokens``; the peer counts its padding against it,
``padded_groups``); the decode loop is the same transformers ``generate`` on both sides. What differs
is only what the UGD path is about: packing without padding and the partitioned attention kernel,
against padding and SDPA with a dense mask. Scoring from stored vectors runs only the heads, so a
stock pipeline would run exactly the same code there: it has no peer.

``check_vectors``, ``check_predict`` and ``check_prefill`` compare a peer with the UGD path on the same
inputs (vectors, probabilities, prefill hidden states; within ``TOLERANCE`` of the dtype); the
benchmark runs them before any figure is taken, and fails without a figure when they disagree.
"""

from __future__ import annotations

import copy

import torch

PEER = "sdpa-padded: same weights, attn_implementation='sdpa', padded batch, dense [B,1,L,L] partition mask"
# agreement of the peer with the UGD path before anything is timed: (absolute tolerance on
# probabilities, relative error on hidden states) per dtype
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)}


def make_peer(model):
    """The sdpa-padded peer of a UGD model: a deep copy (same weights), its backbone on SDPA."""
    peer = copy.deepcopy(model)
    peer.backbone.set_attn_implementation("sdpa")
    return peer


def _layout_and_ids(model):
    from ugd.serving.inference import layout_of
    from ugd.data.layout import special_token_ids

    return layout_of(model), special_token_ids(model.tokenizer)


# ---------------------------------------------------------------------------------------------
# the peer: padded batches with a dense partition mask
# ---------------------------------------------------------------------------------------------


def padded_batch(samples, mask: str, device, dtype, *, left: bool = False) -> dict:
    """``samples`` (``EncodedSample``) as one padded ``[B, L]`` batch with the dense additive
    ``[B, 1, L, L]`` mask of ``mask`` (``ugd_ops.row_intervals``); padding rows see only themselves.

    Returns input_ids, position_ids, attention_mask, valid ``[B, L]`` (False on padding) and last
    ``[B]`` (the column of each sample's last token).
    """
    from ugd.data.packing import pack

    p = pack(samples, mask)  # the partition intervals of every token, relative to its sample
    lengths = p["spans"].to(torch.int64).sum(1)
    B, L = len(samples), int(lengths.max())
    offset = (L - lengths) if left else torch.zeros_like(lengths)
    sample = torch.repeat_interleave(torch.arange(B), lengths)
    local = torch.arange(int(lengths.sum())) - torch.repeat_interleave(p["cu_seqlens"][:-1].to(torch.int64), lengths)
    flat = sample * L + offset[sample] + local
    cols = torch.arange(L)
    ids = torch.zeros(B * L, dtype=torch.int64).index_copy_(0, flat, p["input_ids"][0])
    pos = torch.zeros(B * L, dtype=torch.int64).index_copy_(0, flat, p["position_ids"][0])
    ks = cols.repeat(B).index_copy_(0, flat, p["kv_start"].to(torch.int64) + offset[sample])
    ke = (cols + 1).repeat(B).index_copy_(0, flat, p["kv_end"].to(torch.int64) + offset[sample])
    valid = torch.zeros(B * L, dtype=torch.bool).index_fill_(0, flat, True)
    ks, ke = ks.view(B, L).to(device), ke.view(B, L).to(device)
    c = cols.to(device)
    allowed = (c[None, None, :] >= ks[..., None]) & (c[None, None, :] < ke[..., None])
    attn = torch.zeros((B, 1, L, L), dtype=dtype, device=device).masked_fill_(~allowed[:, None],
                                                                              torch.finfo(dtype).min)
    return {"input_ids": ids.view(B, L).to(device), "position_ids": pos.view(B, L).to(device), "attention_mask": attn,
            "valid": valid.view(B, L).to(device), "last": (offset + lengths - 1).to(device)}


def padded_groups(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Index batches, longest first, whose *padded* size (count x longest) fits ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


@torch.no_grad()
def peer_encode(peer, texts: list[str], side: str, batch_tokens: int) -> torch.Tensor:
    """V_Q or V_D ``[N, H]`` of lone texts: right-padded, each span bidirectional within itself."""
    from ugd.data.layout import encode_sample

    layout, ids = _layout_and_ids(peer)
    part = {"query": "q", "document": "d"}[side]
    samples = [encode_sample(peer.tokenizer, ids, t, t, None, None, config=layout, parts=part) for t in texts]
    w = peer.heads.classifier.weight
    out = torch.empty((len(texts), w.shape[1]), dtype=w.dtype, device=w.device)
    decoder = peer.backbone.get_decoder()
    for idx in padded_groups([len(s) for s in samples], batch_tokens):
        b = padded_batch([samples[i] for i in idx], "bidirectional", w.device, w.dtype)
        h = decoder(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                    use_cache=False).last_hidden_state
        out[torch.tensor(idx, device=w.device)] = h[torch.arange(len(idx), device=w.device), b["last"]]
    return out


@torch.no_grad()
def peer_predict(peer, pairs, mode: str, batch_tokens: int) -> torch.Tensor:
    """Class probabilities ``[N, C]`` (float32, CPU) of the padded peer, as ``model.predict``."""
    from ugd.data.layout import encode_sample, prompt_ids

    if mode == "two_tower":
        v_q = peer_encode(peer, [q for q, _ in pairs], "query", batch_tokens)
        v_d = peer_encode(peer, [d for _, d in pairs], "document", batch_tokens)
        return peer.score_pairs(v_q, v_d)
    layout, ids = _layout_and_ids(peer)
    prompt = prompt_ids(peer.tokenizer, ids, layout)
    samples = [encode_sample(peer.tokenizer, ids, q, d, None, None, config=layout, parts="qdp", _prompt=prompt)
               for q, d in pairs]
    mask = peer.paradigm.mask
    w = peer.heads.classifier.weight
    out = torch.empty((len(pairs), peer.config.num_labels), dtype=torch.float32)
    decoder = peer.backbone.get_decoder()
    for idx in padded_groups([len(s) for s in samples], batch_tokens):
        b = padded_batch([samples[i] for i in idx], mask, w.device, w.dtype)
        h = decoder(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                    use_cache=False).last_hidden_state
        v_s = h[torch.arange(len(idx), device=w.device), b["last"]]
        out[torch.tensor(idx)] = peer.heads.classifier(v_s).float().softmax(-1).cpu()
    return out


def prompts(model, pairs):
    """The Q D P prompt samples of ``pairs``, as ``ugd.serving.generate`` builds them."""
    from ugd.serving.generate import prompt_samples

    return prompt_samples(model, model.tokenizer, pairs)


@torch.no_grad()
def peer_prefill(peer, samples):
    """The peer's prefill of Q D P prompts: left-padded, dense partition mask, one forward with a cache."""
    from ugd import paradigms

    w = peer.heads.classifier.weight
    b = padded_batch(samples, paradigms.get(peer.config.paradigm).prefill_mask, w.device, w.dtype, left=True)
    out = peer.backbone.get_decoder()(input_ids=b["input_ids"], position_ids=b["position_ids"],
                                      attention_mask=b["attention_mask"], use_cache=True)
    return b, out


@torch.no_grad()
def peer_generate_ids(peer, pairs, *, max_new_tokens: int, batch_size: int, **generate_kwargs) -> list[list[int]]:
    """Reason token ids of the padded peer: dense-mask prefill, then the same ``generate`` call as
    ``ugd.serving.generate`` makes (left-padded prompts + ``[Start]``, a 2D padding mask from which ``generate``
    numbers the new tokens)."""
    from ugd.data.layout import special_token_ids

    tok = peer.tokenizer
    ids = special_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else ids["eos"]
    samples = prompts(peer, pairs)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    result: list[list[int]] = [[] for _ in samples]
    for lo in range(0, len(order), batch_size):
        chunk = order[lo: lo + batch_size]
        b, out = peer_prefill(peer, [samples[i] for i in chunk])
        valid, B = b["valid"], len(chunk)
        dev = valid.device
        input_ids = torch.cat([torch.where(valid, b["input_ids"], pad),
                               torch.full((B, 1), ids["start"], dtype=torch.int64, device=dev)], 1)
        attention_mask = torch.cat([valid, torch.ones((B, 1), dtype=torch.bool, device=dev)], 1).to(torch.long)
        gen = peer.backbone.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     past_key_values=out.past_key_values, max_new_tokens=max_new_tokens,
                                     eos_token_id=ids["eos"], pad_token_id=pad, do_sample=False, **generate_kwargs)
        for i, row in zip(chunk, gen[:, input_ids.shape[1]:].tolist()):
            result[i] = row[: row.index(ids["eos"])] if ids["eos"] in row else row
    return result


# ---------------------------------------------------------------------------------------------
# agreement of the peer with the UGD path (before any figure)
# ---------------------------------------------------------------------------------------------


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_vectors(model, peer, texts, side, batch_tokens):
    ours = (model.encode_documents if side == "document" else model.encode_queries)(
        texts, batch_tokens=batch_tokens, show_progress=False, output_device=None)
    theirs = peer_encode(peer, texts, side, batch_tokens)
    _, rel = TOLERANCE[ours.dtype]
    err = _rel_err(theirs, ours)
    assert err <= rel, f"the padded peer's {side} vectors differ from the UGD path's: relative error {err:.3g} > {rel}"


def check_predict(model, peer, pairs, mode, batch_tokens):
    ours = model.predict(pairs, mode=mode, batch_tokens=batch_tokens, show_progress=False)
    theirs = peer_predict(peer, pairs, mode, batch_tokens)
    atol, _ = TOLERANCE[model.heads.classifier.weight.dtype]
    err = float((ours - theirs).abs().max())
    assert err <= atol, f"the padded peer's {mode} probabilities differ from the UGD path's by {err:.3g} > {atol}"


@torch.no_grad()
def check_prefill(model, peer, pairs):
    """The peer's left-padded prefill states equal the UGD packed prefill's (``model.encode``)."""
    from ugd import paradigms
    from ugd.data.packing import pack
    from ugd.model import move_batch

    samples = prompts(model, pairs)
    device = model.heads.classifier.weight.device
    ours = model.encode(move_batch(pack(samples, paradigms.get(model.config.paradigm).prefill_mask), device))
    b, out = peer_prefill(peer, samples)
    theirs = out.last_hidden_state[b["valid"]]  # row-major: sample by sample, token by token, as packed
    _, rel = TOLERANCE[ours.dtype]
    err = _rel_err(theirs, ours)
    assert err <= rel, f"the padded peer's prefill differs from the packed prefill: relative error {err:.3g} > {rel}"

