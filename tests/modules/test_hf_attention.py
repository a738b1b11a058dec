"""attn_implementation="ugd" in transformers models (ugd/modules/attention.py), on the CPU with tiny random models.

Packed path: equal to eager attention with the same layout as an explicit dense 4D mask (logits and
every parameter gradient), equal to each sample run alone, no T x T tensor anywhere. Without packing
metadata: equal to "sdpa" (padding masks, generate). Registration, save/load, errors.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ugd_ops
from tests.numerics import assert_close, magnitude, tol

transformers = pytest.importorskip("transformers", minversion="4.53")  # AttentionMaskInterface

from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import ugd.modules.attention as ua  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda **kw: LlamaConfig(**{**TINY, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**TINY, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**TINY, "head_dim": 16, **kw}),
    # Mistral keeps its default sliding_window (4096): longer than any sequence here, so a no-op.
    "mistral": lambda **kw: MistralConfig(**{**TINY, **kw}),
}
# Three samples (Lq, Ld, Lp, Lg); T = 39, so T*T = 1521 divides the size of no other tensor here.
SPANS = [[3, 5, 3, 4], [2, 4, 3, 2], [5, 2, 3, 3]]
# float32 models with attn_implementation="ugd" and "eager" (or "sdpa"): the same math, another order
TOL = dict(atol=tol(torch.float32, "agreement"), rtol=tol(torch.float32, "agreement"))


def assert_close_scaled(actual, expected, what=""):
    """max |actual - expected| <= tol * max(1, max |expected|) (no relative part): float32 sums over
    many terms (an embedding gradient adds up every token's) differ by rounding relative to the
    tensor's scale."""
    assert actual.dtype == expected.dtype
    assert_close(actual, expected, tol(torch.float32, "agreement"), rtol=0.0,
                 scale=magnitude(expected, at_least=1.0), what=what)


def make_models(family, *impls, seed=0, **config_kw):
    """One random model per attention implementation, all with the same weights (float32, eval).

    Each model gets its own config copy: from_config(cfg, attn_implementation=...) stores the
    implementation in the config object it is given, which would otherwise be shared.
    """
    cfg = FAMILIES[family](**config_kw)
    models = []
    for impl in impls:
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
        if models:
            m.load_state_dict(models[0].state_dict())
        assert m.config._attn_implementation == impl
        models.append(m)
    return models


def restart_positions(spans):
    """docs/spec.md section 4, position_mode="restart": Q 0..Lq-1, D 0..Ld-1, P and G continue from Lq+Ld."""
    pos = []
    for lq, ld, lp, lg in spans:
        pos += list(range(lq)) + list(range(ld)) + list(range(lq + ld, lq + ld + lp + lg))
    return torch.tensor(pos)[None]


def packed_batch(spans, mask_kind, seed=1):
    cu, ks, ke = ugd_ops.row_intervals(torch.tensor(spans, dtype=torch.int32), mask_kind)
    T = int(cu[-1])
    ids = torch.randint(3, 100, (1, T), generator=torch.Generator().manual_seed(seed))
    lengths = [sum(s) for s in spans]
    return dict(input_ids=ids, position_ids=restart_positions(spans), cu_seqlens=cu, kv_start=ks, kv_end=ke,
                max_seqlen=max(lengths))


def dense_additive_mask(batch, dtype=torch.float32):
    allowed = ugd_ops.dense_mask(batch["cu_seqlens"], batch["kv_start"], batch["kv_end"])
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # [1, 1, T, T]: 0 where allowed, finfo.min where masked


def ugd_kwargs(batch):
    return {k: batch[k] for k in ("input_ids", "position_ids", "cu_seqlens", "kv_start", "kv_end", "max_seqlen")}


def loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(use_cache=False, **kwargs).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of ugd_ops.partitioned_attention (proves the packed path ran)."""
    calls = []
    real = ugd_ops.partitioned_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ugd_ops, "partitioned_attention", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# packed path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["ttm", "stm"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_equals_eager_with_dense_mask(family, mask_kind, kernel_calls):
    ugd_model, eager = make_models(family, "ugd", "eager")
    batch = packed_batch(SPANS, mask_kind)
    logits, grads = loss_and_grads(ugd_model, **ugd_kwargs(batch))
    assert len(kernel_calls) == ugd_model.config.num_hidden_layers  # the metadata reached every layer
    T = batch["input_ids"].shape[1]
    assert kernel_calls[0] == (T, ugd_model.config.num_attention_heads, ugd_model.model.layers[0].self_attn.head_dim)

    ref_logits, ref_grads = loss_and_grads(eager, input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                           attention_mask=dense_additive_mask(batch))
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(ugd_model.parameters()))
    for name in ref_grads:
        assert_close_scaled(grads[name], ref_grads[name], what=f"grad of {name}")


@pytest.mark.parametrize("mask_kind", ["ttm", "stm"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packing_is_independence(family, mask_kind):
    (model,) = make_models(family, "ugd")
    batch = packed_batch(SPANS, mask_kind)
    with torch.no_grad():
        packed = model(**ugd_kwargs(batch), use_cache=False).logits[0]
        cu = batch["cu_seqlens"].tolist()
        for b, spans in enumerate(SPANS):
            lo, hi = cu[b], cu[b + 1]
            c1, ks1, ke1 = ugd_ops.row_intervals(torch.tensor([spans], dtype=torch.int32), mask_kind)
            alone = model(input_ids=batch["input_ids"][:, lo:hi], position_ids=restart_positions([spans]),
                          cu_seqlens=c1, kv_start=ks1, kv_end=ke1, use_cache=False).logits[0]
            torch.testing.assert_close(packed[lo:hi], alone, **TOL, msg=lambda m: f"sample {b}: {m}")


def test_packed_through_the_base_model_with_cache():
    """get_decoder()(...) (as ugd.model does) and the default use_cache=True (a prefill into a
    DynamicCache) give the same hidden states; the metadata may be int64 or [1, T]."""
    (model,) = make_models("llama", "ugd")
    batch = packed_batch(SPANS, "stm")
    with torch.no_grad():
        ref = model.get_decoder()(**ugd_kwargs(batch), use_cache=False).last_hidden_state
        out = model.get_decoder()(**ugd_kwargs(batch)).last_hidden_state  # use_cache from config: True
        alt = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  cu_seqlens=batch["cu_seqlens"].long(), kv_start=batch["kv_start"][None].long(),
                                  kv_end=batch["kv_end"][None], use_cache=False).last_hidden_state
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(alt, ref, atol=0, rtol=0)


class _SquareWatch(TorchDispatchMode):
    """Records every op output whose element count is a multiple of T*T (a T x T tensor, or a
    [B, H, T, T] one)."""

    def __init__(self, T):
        super().__init__()
        self.T2 = T * T
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.T2 and t.numel() % self.T2 == 0:
                self.hits.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_t_squared_tensor_on_packed_path(family, use_cache):
    ugd_model, sdpa = make_models(family, "ugd", "sdpa")
    batch = packed_batch(SPANS, "ttm")
    T = batch["input_ids"].shape[1]
    ugd_model.train()  # (dropout is 0) a training step: forward and backward
    with _SquareWatch(T) as watch:
        logits = ugd_model(**ugd_kwargs(batch), use_cache=use_cache).logits
        logits.square().mean().backward()
    assert watch.hits == [], f"T x T tensors on the packed path: {watch.hits}"

    # The watch does see one: sdpa builds a [1, 1, T, T] mask for restarting position ids.
    with torch.no_grad(), _SquareWatch(T) as watch:
        sdpa(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    assert any(shape[-2:] == (T, T) for _, shape in watch.hits)


def test_mask_function_defers_until_needed():
    import inspect

    from transformers.masking_utils import sdpa_mask

    def sizes(q_length, kv_length, q_offset=0):
        if "q_length" in inspect.signature(sdpa_mask).parameters:  # transformers 5
            return dict(q_length=q_length, kv_length=kv_length, q_offset=q_offset)
        return dict(cache_position=torch.arange(q_offset, q_offset + q_length), kv_length=kv_length)  # 4.x

    common = dict(dtype=torch.float32, config=FAMILIES["llama"](), allow_is_causal_skip=False, device="cpu")
    pad1 = torch.ones(1, 9, dtype=torch.bool)
    pad1[0, 0] = False
    deferred = ua.ugd_mask(batch_size=1, attention_mask=pad1, **sizes(9, 9), **common)
    assert isinstance(deferred, ua.DeferredMask) and not deferred.is_materialized
    expected = sdpa_mask(batch_size=1, attention_mask=pad1, **sizes(9, 9), **common)
    assert expected.shape == (1, 1, 9, 9)
    assert torch.equal(deferred.materialize(), expected) and deferred.materialize() is deferred.materialize()
    # batch > 1 or a decode step: no packed path possible, the sdpa mask directly
    pad2 = torch.ones(2, 9, dtype=torch.bool)
    assert torch.equal(ua.ugd_mask(batch_size=2, attention_mask=pad2, **sizes(9, 9), **common),
                       sdpa_mask(batch_size=2, attention_mask=pad2, **sizes(9, 9), **common))
    step = dict(sizes(1, 9, q_offset=8), **common)
    assert torch.equal(ua.ugd_mask(batch_size=1, **step), sdpa_mask(batch_size=1, **step))


# ---------------------------------------------------------------------------------------------
# without packing metadata: "sdpa"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_metadata_equals_sdpa_with_padding(family, kernel_calls):
    ugd_model, sdpa = make_models(family, "ugd", "sdpa")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        for kw in (dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids[:1], attention_mask=mask[:1]),
                   dict(input_ids=ids[2:]), dict(input_ids=ids, attention_mask=mask, use_cache=False)):
            torch.testing.assert_close(ugd_model(**kw).logits, sdpa(**kw).logits, atol=0, rtol=0)
    assert kernel_calls == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_equals_sdpa(family):
    ugd_model, sdpa = make_models(family, "ugd", "sdpa")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # a left-padded batch
    for kw in (dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids[:1])):
        out = ugd_model.generate(**kw, max_new_tokens=5, do_sample=False)
        ref = sdpa.generate(**kw, max_new_tokens=5, do_sample=False)
        assert out.shape[1] > kw["input_ids"].shape[1]
        assert torch.equal(out, ref)


def test_decode_after_packed_prefill():
    """Prefill one sample (STM layout) into a cache through the packed path, then greedy decode steps
    without metadata: the same logits as eager attention with the dense mask over the whole sequence."""
    ugd_model, eager = make_models("qwen2", "ugd", "eager")
    spans = [[3, 4, 3, 1]]  # G = [Start]; decoding extends it
    batch = packed_batch(spans, "stm")
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = ugd_model(**ugd_kwargs(batch), use_cache=True)
        cache, ids, pos = out.past_key_values, batch["input_ids"], batch["position_ids"]
        step_logits = [out.logits[:, -1]]
        for _ in range(3):
            nxt = step_logits[-1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            out = ugd_model(input_ids=nxt, position_ids=pos[:, -1:], past_key_values=cache, use_cache=True)
            step_logits.append(out.logits[:, -1])
        full_spans = [[3, 4, 3, 1 + 3]]
        full = packed_batch(full_spans, "stm")
        ref = eager(input_ids=ids, position_ids=pos, attention_mask=dense_additive_mask(full), use_cache=False).logits
    torch.testing.assert_close(torch.stack(step_logits, 1), ref[:, L - 1:], **TOL)


# ---------------------------------------------------------------------------------------------
# registration and storage
# ---------------------------------------------------------------------------------------------


def test_register_is_idempotent():
    ua.register()
    ua.register()
    assert AttentionInterface._global_mapping["ugd"] is ua.ugd_attention_forward
    assert AttentionMaskInterface._global_mapping["ugd"] is ua.ugd_mask
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["ugd"] is ua.ugd_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["ugd"] is ua.ugd_mask


def test_save_and_from_pretrained(tmp_path):
    (model,) = make_models("qwen3", "ugd")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ugd").eval()
    assert loaded.config._attn_implementation == "ugd"
    batch = packed_batch(SPANS, "ttm")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ugd_kwargs(batch), use_cache=False).logits,
                                   model(**ugd_kwargs(batch), use_cache=False).logits, atol=0, rtol=0)
    # switching an existing model over, as ugd.model does
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    if hasattr(plain, "set_attn_implementation"):  # not in transformers 4.53
        plain.set_attn_implementation("ugd")
        assert plain.config._attn_implementation == "ugd"


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return make_models("llama", "ugd")[0]


@pytest.mark.parametrize("drop, missing", [(("kv_start", "kv_end", "max_seqlen"), "kv_start, kv_end"),
                                           (("kv_end",), "kv_end"), (("cu_seqlens",), "cu_seqlens"),
                                           (("cu_seqlens", "kv_start", "kv_end"), "max_seqlen was given")])
def test_partial_metadata(llama, drop, missing):
    kw = ugd_kwargs(packed_batch(SPANS, "ttm"))
    for name in drop:
        del kw[name]
    if "max_seqlen" not in drop:
        kw["max_seqlen"] = kw.get("max_seqlen", 15)
    with pytest.raises(ValueError, match=missing):
        llama(**kw, use_cache=False)


def test_batch_size_above_one(llama):
    kw = ugd_kwargs(packed_batch(SPANS, "ttm"))
    kw["input_ids"] = kw["input_ids"].expand(2, -1)
    kw["position_ids"] = kw["position_ids"].expand(2, -1)
    with pytest.raises(ValueError, match="batch size 1"):
        llama(**kw, use_cache=False)


def test_metadata_with_a_filled_cache(llama):
    batch = packed_batch([[3, 4, 3, 1]], "stm")
    with torch.no_grad():
        cache = llama(input_ids=batch["input_ids"], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="KV cache"):
            llama(**ugd_kwargs(batch), past_key_values=cache, use_cache=True)


def test_metadata_and_a_4d_mask(llama):
    batch = packed_batch(SPANS, "ttm")
    with pytest.raises(ValueError, match="one or the other"):
        llama(**ugd_kwargs(batch), attention_mask=dense_additive_mask(batch), use_cache=False)


def test_wrong_metadata_lengths_and_intervals(llama):
    kw = ugd_kwargs(packed_batch(SPANS, "ttm"))
    with pytest.raises(ValueError, match="one entry per token"):
        llama(**{**kw, "kv_end": kw["kv_end"][:-1]}, use_cache=False)
    bad = kw["kv_end"].clone()
    bad[0] = 99
    with pytest.raises((ValueError, RuntimeError), match="outside its sequence"):
        llama(**{**kw, "kv_end": bad}, use_cache=False)
    with pytest.raises(TypeError, match="integer"):
        llama(**{**kw, "kv_end": kw["kv_end"].float()}, use_cache=False)


def test_dropout_in_training():
    (model,) = make_models("llama", "ugd", attention_dropout=0.1)
    kw = ugd_kwargs(packed_batch(SPANS, "ttm"))
    model.eval()
    model(**kw, use_cache=False)  # eval: dropout is 0
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(**kw, use_cache=False)


def test_sliding_window_shorter_than_a_sequence():
    (model,) = make_models("mistral", "ugd", sliding_window=8)
    kw = ugd_kwargs(packed_batch(SPANS, "ttm"))  # sequences of 15, 11 and 13 tokens
    with pytest.raises(NotImplementedError, match="sliding-window"):
        model(**kw, use_cache=False)
    kw.pop("max_seqlen")  # computed from cu_seqlens then
    with pytest.raises(NotImplementedError, match="sliding-window"):
        model(**kw, use_cache=False)
    (model,) = make_models("mistral", "ugd", sliding_window=15)  # every sequence fits: allowed
    model(**ugd_kwargs(packed_batch(SPANS, "ttm")), use_cache=False)


def test_softcap(llama):
    attn = llama.model.layers[0].self_attn
    batch = packed_batch(SPANS, "ttm")
    T = batch["input_ids"].shape[1]
    q, k = torch.randn(1, 4, T, 16), torch.randn(1, 2, T, 16)
    with pytest.raises(NotImplementedError, match="softcap"):
        ua.ugd_attention_forward(attn, q, k, k, None, scaling=0.25, softcap=30.0, cu_seqlens=batch["cu_seqlens"],
                                 kv_start=batch["kv_start"], kv_end=batch["kv_end"])
    out, weights = ua.ugd_attention_forward(attn, q, k, k, None, scaling=0.25, cu_seqlens=batch["cu_seqlens"],
                                            kv_start=batch["kv_start"], kv_end=batch["kv_end"])
    assert out.shape == (1, T, 4, 16) and weights is None
