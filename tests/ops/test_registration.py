"""The custom-op contract: torch.library.opcheck on every operator (schema, autograd registration,
fake tensors, AOT dispatch), and torch.compile(fullgraph=True) over code that calls them."""

import pytest
import torch
from tests.conftest import DEVICES

import ugd_ops
from ugd_ops.workloads import make_attention_inputs, random_spans

ops = torch.ops.ugd_ops


def attention_args(device, dtype=torch.float32, requires_grad=True):
    x = make_attention_inputs(random_spans(3, seed=1, max_len=20), "ttm", heads=(4, 2, 16), dtype=dtype,
                              device=device, requires_grad=requires_grad)
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_seqlen", [None, "given"])
def test_opcheck_attention_fwd(device, max_seqlen):
    x = attention_args(device)
    ms = x.max_seqlen if max_seqlen else None
    torch.library.opcheck(ops.partitioned_attention_fwd.default, (*x.args(), ms, 0.25))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_dlse", [False, True])
def test_opcheck_attention_bwd(device, with_dlse):
    x = attention_args(device, requires_grad=False)
    out, lse = ops.partitioned_attention_fwd(*x.args(), None, 0.25)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(ops.partitioned_attention_bwd.default,
                          (torch.randn_like(out), x.q, x.k, x.v, out, lse, dlse, x.cu_seqlens, x.kv_start,
                           x.kv_end, None, 0.25))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grads", [(True, False), (True, True), (False, False)])
def test_opcheck_detached_kl(device, grads):
    p = torch.randn(6, 5, device=device, requires_grad=True)
    q = torch.randn(6, 5, device=device, requires_grad=grads[1])
    torch.library.opcheck(ops.detached_kl_fwd.default, (p, q, 1.5, *grads))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_layout_ops(device):
    spans = random_spans(4, seed=2).to(device)
    # row_intervals has a data-dependent output size; its fake kernel allocates an unbacked size.
    torch.library.opcheck(ops.row_intervals.default, (spans, "stm"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    cu, ks, ke = ops.row_intervals(spans, "stm")
    torch.library.opcheck(ops.dense_mask.default, (cu, ks, ke))


def test_compile_fullgraph():
    """A training-step-like function calling both hot ops compiles as one graph and matches eager."""
    x = attention_args("cpu")
    head = torch.randn(16, 3, requires_grad=True)

    def step(q, k, v, cu, ks, ke, head):
        out = ugd_ops.partitioned_attention(q, k, v, cu, ks, ke, max_seqlen=64)
        feats = out.mean(dim=1)  # [T, D]
        logits_t, logits_s = feats[:4] @ head, feats[4:8] @ head
        kl = ugd_ops.detached_kl(logits_t, logits_s, temperature=2.0)
        return kl + out.square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_loss = step(*x.args(), head)
    eager_grads = torch.autograd.grad(eager_loss, (x.q, x.k, x.v, head))
    comp_loss = compiled(*x.args(), head)
    comp_grads = torch.autograd.grad(comp_loss, (x.q, x.k, x.v, head))
    torch.testing.assert_close(comp_loss, eager_loss)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_layout_ops_under_compile():
    spans = random_spans(3, seed=4)

    def f(spans):
        cu, ks, ke = ugd_ops.row_intervals(spans, "ttm")
        return (ke - ks).sum()

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager")(spans)
    assert int(got) == int(f(spans))
