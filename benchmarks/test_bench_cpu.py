"""CPU benchmarks: ugd_ops against its pure-PyTorch reference (small shapes, a 2-core budget).

    pytest benchmarks/test_bench_cpu.py --benchmark-only

Attention runs the docs/spec.md section 9 workloads ``bq`` and ``nli`` cut to 8 samples, mask "ttm",
Hq 4, Hkv 2, D 64, float32: forward (with autograd recording, as in training) and forward+backward.
detached_kl runs forward+backward on [8192, 4] and [1024, 256]; row_intervals the full ``qlq`` spans.
Rounds are few and fixed (``benchmark.pedantic``) so the whole file takes seconds, not minutes.

``test_attention_cpu_esnli`` is the CPU kernel's yardstick: SmolLM2-135M's attention shape (Hq 9, Hkv 3,
D 64, float32 and bfloat16) on e-SNLI-like ugd-ttm layouts (16 samples, span lengths drawn from the ranges seen
on real e-SNLI records), ugd_ops against torch SDPA over the padded batch with a dense mask (the
``sdpa`` peer of ``attention_peers``). Run it with a fixed thread count, e.g. ``OMP_NUM_THREADS=1``;
``cpu_threads`` is recorded with each figure.
"""

from __future__ import annotations

import pytest
import torch

import attention_peers as ap
import ugd_ops
from ugd_ops import reference
from ugd_ops.workloads import make_attention_inputs, make_spans

DEVICE = "cpu"
MASK = "ttm"
HEADS = (4, 2, 64)
BATCH = 8
DTYPE = torch.float32

ATTENTION = {
    "ugd": lambda q, k, v, x: ugd_ops.partitioned_attention(q, k, v, x.cu_seqlens, x.kv_start, x.kv_end,
                                                            max_seqlen=x.max_seqlen),
    "reference": lambda q, k, v, x: reference.partitioned_attention(q, k, v, x.cu_seqlens, x.kv_start, x.kv_end),
}

# (lowest, highest) of Lq, Ld, Lp, Lg on ugd-ttm layouts of e-SNLI records with SmolLM2's tokenizer.
ESNLI_SPAN_RANGES = ((20, 30), (10, 15), (9, 9), (15, 25))
SMOLLM2_HEADS = (9, 3, 64)  # SmolLM2-135M: Hq, Hkv, D
ESNLI_BATCH = 16

KL = {"ugd": ugd_ops.detached_kl, "reference": reference.detached_kl}
ROW_INTERVALS = {"ugd": ugd_ops.row_intervals, "reference": reference.row_intervals}


def _backend(impl: str, op: str, ugd_backend) -> str:
    return ugd_backend(op, DEVICE) if impl == "ugd" else "reference"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("workload", ["bq", "nli"])
@pytest.mark.parametrize("impl", list(ATTENTION))
def test_attention_cpu(benchmark, bench_record, bench_finish, attention_info, ugd_backend, impl, workload, mode):
    spans = make_spans(workload, batch=BATCH, seed=0)
    x = make_attention_inputs(spans, MASK, heads=HEADS, dtype=DTYPE, device=DEVICE, seed=0, requires_grad=True)
    dout = torch.randn(x.q.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    fn = ATTENTION[impl]
    benchmark.group = f"attention-cpu-{workload}-{mode}"
    bench_record(DEVICE, impl=impl, backend=_backend(impl, "partitioned_attention_fwd", ugd_backend),
                 **attention_info(workload, MASK, spans, x.kv_start, x.kv_end, HEADS, DTYPE, mode))

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


def esnli_like_spans(batch: int, seed: int) -> torch.Tensor:
    """Span lengths int32 [batch, 4], each drawn uniformly from ESNLI_SPAN_RANGES (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    spans = torch.empty((batch, 4), dtype=torch.int32)
    for col, (lo, hi) in enumerate(ESNLI_SPAN_RANGES):
        spans[:, col] = torch.randint(lo, hi + 1, (batch,), generator=gen, dtype=torch.int32)
    return spans


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("peer", ["ugd", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_cpu_esnli(benchmark, bench_record, bench_finish, attention_info, ugd_backend, peer, mode, dtype):
    """bf16: ugd's bf16 path (the CPU's bf16 units where it has them, csrc/cpu/bf16_gemm.h) against SDPA
    in bf16; benchmarks/bf16_attention.py gives the interleaved comparison of docs/performance.md."""
    spans = esnli_like_spans(ESNLI_BATCH, seed=0)
    x = make_attention_inputs(spans, MASK, heads=SMOLLM2_HEADS, dtype=dtype, device=DEVICE, seed=0)
    dout = torch.randn(x.q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    p = ap.PEERS[peer].prepare(x, spans, dout)
    lengths = spans.sum(1)
    benchmark.group = f"attention-cpu-esnli-{mode}-{str(dtype).replace('torch.', '')}"
    backend = (_backend("ugd", "partitioned_attention_fwd", ugd_backend) if peer == "ugd"
               else "torch sdpa, padded batch, dense mask")
    bench_record(DEVICE, impl=peer, backend=backend, padded_rows=int(lengths.numel() * lengths.max()),
                 **attention_info("esnli-like", MASK, spans, x.kv_start, x.kv_end, SMOLLM2_HEADS, dtype, mode,
                                  shape_name="smollm2-135m"))

    if mode == "fwd":  # with autograd recording, as in training
        target = p.run
    else:
        def target():
            p.run().backward(p.dout)

    benchmark.pedantic(target, setup=p.clear_grads, rounds=10, warmup_rounds=1, iterations=1)
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
                 workload="qlq", mask=MASK, batch=int(spans.shape[0]), tokens=int(spans.sum()))
    cu, _, _ = benchmark.pedantic(fn, args=(spans, MASK), rounds=20, warmup_rounds=2, iterations=5)
    assert int(cu[-1]) == int(spans.sum())
    bench_finish()
