"""CPU benchmarks: ugd_ops against its pure-PyTorch reference (small shapes, a 2-core budget).

    pytest benchmarks/test_bench_cpu.py --benchmark-only

Attention runs the SPEC section 9 workloads ``bq`` and ``nli`` cut to 8 samples, paradigm "ttm",
Hq 4, Hkv 2, D 64, float32: forward (with autograd recording, as in training) and forward+backward.
detached_kl runs forward+backward on [8192, 4] and [1024, 256]; row_intervals the full ``qlq`` spans.
Rounds are few and fixed (``benchmark.pedantic``) so the whole file takes seconds, not minutes.
"""

from __future__ import annotations

import pytest
import torch

import ugd_ops
from ugd_ops import reference
from ugd_ops.workloads import make_attention_inputs, make_spans

DEVICE = "cpu"
PARADIGM = "ttm"
HEADS = (4, 2, 64)
BATCH = 8
DTYPE = torch.float32

ATTENTION = {
    "ugd": lambda q, k, v, x: ugd_ops.partitioned_attention(q, k, v, x.cu_seqlens, x.kv_start, x.kv_end,
                                                            max_seqlen=x.max_seqlen),
    "reference": lambda q, k, v, x: reference.partitioned_attention(q, k, v, x.cu_seqlens, x.kv_start, x.kv_end),
}

KL = {"ugd": ugd_ops.detached_kl, "reference": reference.detached_kl}
ROW_INTERVALS = {"ugd": ugd_ops.row_intervals, "reference": reference.row_intervals}


def _backend(impl: str, op: str, ugd_backend) -> str:
    return ugd_backend(op, DEVICE) if impl == "ugd" else "reference"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("workload", ["bq", "nli"])
@pytest.mark.parametrize("impl", list(ATTENTION))
def test_attention_cpu(benchmark, bench_record, bench_finish, attention_info, ugd_backend, impl, workload, mode):
    spans = make_spans(workload, batch=BATCH, seed=0)
    x = make_attention_inputs(spans, PARADIGM, heads=HEADS, dtype=DTYPE, device=DEVICE, seed=0, requires_grad=True)
    dout = torch.randn(x.q.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    fn = ATTENTION[impl]
    benchmark.group = f"attention-cpu-{workload}-{mode}"
    bench_record(DEVICE, impl=impl, backend=_backend(impl, "partitioned_attention_fwd", ugd_backend),
                 **attention_info(workload, PARADIGM, spans, x.kv_start, x.kv_end, HEADS, DTYPE, mode))

    def clear():
        for t in (x.q, x.k, x.v):
            t.grad = None

    if mode == "fwd":
        def target():
            return fn(x.q, x.k, x.v, x)
    else:
        def target():
            fn(x.q, x.k, x.v, x).backward(dout)

    benchmark.pedantic(target, setup=clear, rounds=8, warmup_rounds=1, iterations=1)
    bench_finish()


@pytest.mark.parametrize("rows,classes", [(8192, 4), (1024, 256)], ids=["8192x4", "1024x256"])
@pytest.mark.parametrize("impl", list(KL))
def test_detached_kl_cpu(benchmark, bench_record, bench_finish, impl, rows, classes, ugd_backend):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn((rows, classes), generator=gen, dtype=DTYPE).requires_grad_(True)
    q = torch.randn((rows, classes), generator=gen, dtype=DTYPE).requires_grad_(True)
    fn = KL[impl]
    kwargs = dict(temperature=2.0, reduction="batchmean", detach=True)
    benchmark.group = f"detached_kl-cpu-{rows}x{classes}-fwd+bwd"
    bench_record(DEVICE, impl=impl, backend=_backend(impl, "detached_kl_fwd", ugd_backend), op="detached_kl",
                 mode="fwd+bwd", shape=[rows, classes], dtype=str(DTYPE).removeprefix("torch."), **kwargs)

    def clear():
        p.grad = None
        q.grad = None

    def target():
        fn(p, q, **kwargs).backward()

    benchmark.pedantic(target, setup=clear, rounds=30, warmup_rounds=2, iterations=1)
    assert q.grad is None  # detach=True: the teacher gets no gradient
    bench_finish()


@pytest.mark.parametrize("impl", list(ROW_INTERVALS))
def test_row_intervals_cpu(benchmark, bench_record, bench_finish, impl, ugd_backend):
    spans = make_spans("qlq")
    fn = ROW_INTERVALS[impl]
    benchmark.group = "row_intervals-cpu-qlq"
    bench_record(DEVICE, impl=impl, backend=_backend(impl, "row_intervals", ugd_backend), op="row_intervals",
                 workload="qlq", paradigm=PARADIGM, batch=int(spans.shape[0]), tokens=int(spans.sum()))
    cu, _, _ = benchmark.pedantic(fn, args=(spans, PARADIGM), rounds=20, warmup_rounds=2, iterations=5)
    assert int(cu[-1]) == int(spans.sum())
    bench_finish()
