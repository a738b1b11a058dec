"""Every contract violation of docs/spec.md section 3 raises a ValueError naming the argument, on the compiled
kernels and on the reference backend alike; nothing crashes or returns silently."""

import pytest
import torch

import ugd_ops
from ugd_ops import reference


def good(T_seq=(5, 7), Hq=4, Hkv=2, D=8, dtype=torch.float32):
    spans = torch.tensor([[2, 1, 1, T - 4] for T in T_seq], dtype=torch.int32)
    cu, ks, ke = ugd_ops.row_intervals(spans, "ttm")
    T = int(cu[-1])
    q, k, v = (torch.randn(T, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
    return dict(q=q, k=k, v=v, cu_seqlens=cu, kv_start=ks, kv_end=ke)


def _set(a, **kw):
    a = dict(a)
    a.update(kw)
    return a


def cases():
    a = good()
    T = a["q"].shape[0]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    ks, ke = a["kv_start"], a["kv_end"]
    return [
        ("cu not increasing", _set(a, cu_seqlens=i32([0, 7, 5, T])), "cu_seqlens must be non-decreasing"),
        ("cu not ending at T", _set(a, cu_seqlens=i32([0, 5, T - 1])), "cu_seqlens must end at T"),
        ("cu not starting at 0", _set(a, cu_seqlens=i32([1, 5, T])), "cu_seqlens must start at 0"),
        ("interval past its sequence", _set(a, kv_end=ke.clone().index_fill_(0, torch.tensor([3]), 6)),
         "lies outside its sequence"),
        ("negative start", _set(a, kv_start=ks.clone().index_fill_(0, torch.tensor([0]), -1)),
         "lies outside its sequence"),
        ("start > end", _set(a, kv_start=ks.clone().index_fill_(0, torch.tensor([1]), 2),
                             kv_end=ke.clone().index_fill_(0, torch.tensor([1]), 1)), "start > end"),
        ("dtype mismatch", _set(a, k=a["k"].double()), "k must have the dtype of q"),
        ("integer q", _set(a, q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), "q must be float32"),
        ("int64 layout", _set(a, kv_start=ks.long()), "kv_start must be int32"),
        ("head dim 0", _set(a, q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0]), "unsupported head dim 0"),
        ("head dim too large", _set(a, **{n: torch.randn(T, h, 2048) for n, h in (("q", 4), ("k", 2), ("v", 2))}),
         "unsupported head dim 2048"),
        ("head dims differ", _set(a, v=torch.randn(T, 2, 16)), "must share the head dim"),
        ("Hq not a multiple of Hkv", _set(a, k=torch.randn(T, 3, 8), v=torch.randn(T, 3, 8)),
         r"query heads \(4\) must be a positive multiple"),
        ("last dim not contiguous", _set(a, q=torch.randn(T, 4, 16)[..., ::2]), "contiguous in its last"),
        ("2-D q", _set(a, q=a["q"][:, 0]), r"q must be 3-D"),
        ("T mismatch", _set(a, k=a["k"][:-1], v=a["v"][:-1]), "k and v must have T"),
        ("kv_start length", _set(a, kv_start=ks[:-1]), "kv_start and kv_end must have T"),
    ]


CASES = cases()


@pytest.mark.parametrize("name,args,message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_forward_rejects(backend, name, args, message):
    with pytest.raises(ValueError, match=message):
        if backend == "compiled":
            ugd_ops.partitioned_attention(**args)
        else:
            reference.partitioned_attention_fwd(*args.values(), None, 0.5)


def test_device_mismatch_is_reported():
    a = good()
    meta = _set(a, k=a["k"].to("meta"))
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ugd_ops.partitioned_attention(**meta)


def test_max_seqlen_too_small():
    a = good()
    for fn in (lambda: ugd_ops.partitioned_attention(**a, max_seqlen=3),
               lambda: reference.partitioned_attention_fwd(*a.values(), 3, 0.5)):
        with pytest.raises(ValueError, match="max_seqlen = 3 is smaller"):
            fn()


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_backward_rejects_bad_lse(backend):
    a = good()
    out, lse = ugd_ops.partitioned_attention(**a, return_lse=True)
    bad = lse[:2]
    fn = torch.ops.ugd_ops.partitioned_attention_bwd if backend == "compiled" else reference.partitioned_attention_bwd
    with pytest.raises((ValueError, RuntimeError)):
        fn(torch.ones_like(out), a["q"], a["k"], a["v"], out, bad, None, a["cu_seqlens"], a["kv_start"],
           a["kv_end"], None, 0.5)


@pytest.mark.parametrize("impl", [ugd_ops.detached_kl, reference.detached_kl])
@pytest.mark.parametrize("p,q,message", [
    (torch.randn(4, 3), torch.randn(4, 4), "q_logits must have the shape"),
    (torch.randn(4, 3), torch.randn(4, 3).double(), "q_logits must have the dtype"),
    (torch.randn(3), torch.randn(3), r"p_logits must be \[N, C\]"),
    (torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64), "p_logits must be float32"),
])
def test_kl_rejects(impl, p, q, message):
    with pytest.raises(ValueError, match=message):
        impl(p, q)
