"""GPU benchmarks of docs/spec.md section 9: partitioned attention against its peers, bf16.

    pytest benchmarks/test_bench_gpu.py --benchmark-only --benchmark-json=gpu.json

Workloads qlq / bq / nli / longdoc, both ATTENTION_SHAPES, mask "ttm"; modes fwd (with
autograd recording, as in training), bwd (the forward runs untimed before each round) and fwd+bwd.
Peers (see attention_peers.py): ugd, sdpa (dense boolean mask, padded batch), flex (compiled
FlexAttention, block mask over the packed batch; its build is timed on its own in
test_flex_block_mask_build), fa2_torch (FlashAttention-2 varlen of PyTorch's build, four calls),
flash_attn and xformers (four calls, when installed).

Timing: the pytest-benchmark timer of these tests is a CUDA-event clock (attention_peers.CudaEventClock),
so every round is the CUDA event time of the timed work alone. Each round takes the next of
UGD_BENCH_SETS input sets (different random q/k/v, same layout; built outside the timed region)
and flushes the L2 cache before the timed work; UGD_BENCH_WARMUP rounds are discarded, then
UGD_BENCH_ROUNDS rounds are kept and pytest-benchmark reports their median. Before a peer is
timed, it must match ugd_ops.reference on small inputs (attention_peers.check_peer), else the
test fails and no figure comes out.

The whole module is skipped without CUDA.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import attention_peers as ap
from ugd_ops.workloads import ATTENTION_SHAPES, WORKLOADS, make_attention_inputs, make_spans

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need a CUDA device")

DTYPE = torch.bfloat16
MASK = ap.MASK
ROUNDS = int(os.environ.get("UGD_BENCH_ROUNDS", "100"))
WARMUP = int(os.environ.get("UGD_BENCH_WARMUP", "10"))
SETS = int(os.environ.get("UGD_BENCH_SETS", "3"))
MODES = ["fwd", "bwd", "fwd+bwd"]

# (peer name, head shape) -> None when the peer passed its correctness check, else the error text.
_CHECKED: dict[tuple[str, tuple[int, int, int]], str | None] = {}


def _require_correct(peer: ap.Peer, heads: tuple[int, int, int]) -> None:
    key = (peer.name, heads)
    if key not in _CHECKED:
        try:
            ap.check_peer(peer, heads, DTYPE, "cuda")
            _CHECKED[key] = None
        except Exception as exc:  # a wrong or crashing peer gives no figure
            _CHECKED[key] = f"{type(exc).__name__}: {exc}"
        torch.cuda.synchronize()
    if _CHECKED[key] is not None:
        pytest.fail(f"{peer.name} failed its correctness check, not timed:\n{_CHECKED[key]}", pytrace=False)


def _input_sets(workload: str, heads):
    """SETS packed input sets with the same layout (spans of seed 0) and different values."""
    spans = make_spans(workload, seed=0)
    sets = []
    for s in range(SETS):
        x = make_attention_inputs(spans, MASK, heads=heads, dtype=DTYPE, device="cuda", seed=1000 + s)
        dout = torch.randn(x.q.shape, generator=torch.Generator().manual_seed(2000 + s)).to("cuda", DTYPE)
        sets.append((x, dout))
    return spans, sets


def _use_cuda_clock(benchmark) -> None:
    # pytest-benchmark has no public per-test timer option; its fixture reads ``_timer`` each round.
    if not hasattr(benchmark, "_timer"):
        pytest.fail("this pytest-benchmark has no BenchmarkFixture._timer; the CUDA-event clock cannot be installed")
    benchmark._timer = ap.CudaEventClock()


def _time_attention(benchmark, prepared: list[ap.Prepared], mode: str, flush: ap.L2Flush):
    turn = itertools.count()

    def pick():
        p = prepared[next(turn) % len(prepared)]
        p.clear_grads()  # the backward then writes .grad instead of adding to it
        return p

    if mode == "fwd":
        def setup():
            p = pick()
            flush()
            return (p,), {}

        def target(p):
            return p.run()
    elif mode == "bwd":
        def setup():
            p = pick()
            out = p.run()  # untimed forward
            flush()
            return (out, p.dout), {}

        def target(out, dout):
            out.backward(dout)
    else:
        def setup():
            p = pick()
            flush()
            return (p,), {}

        def target(p):
            p.run().backward(p.dout)

    _use_cuda_clock(benchmark)
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.fixture(scope="module")
def flush():
    return ap.L2Flush("cuda")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
@pytest.mark.parametrize("peer_name", list(ap.PEERS))
def test_attention_gpu(benchmark, bench_record, bench_finish, attention_info, flush, peer_name, shape,
                       workload, mode):
    peer = ap.PEERS[peer_name]
    reason = peer.unavailable(torch.device("cuda"))
    if reason:
        pytest.skip(f"{peer_name}: {reason}")
    heads = ATTENTION_SHAPES[shape]
    _require_correct(peer, heads)

    spans, sets = _input_sets(workload, heads)
    x0 = sets[0][0]
    benchmark.group = f"attention-{workload}-{shape}-{mode}"
    bench_record(
        "cuda", peer=peer_name,
        backend=_ugd_path(x0) if peer_name == "ugd" else peer_name,
        input_sets=SETS, warmup_rounds=WARMUP, l2_flush_mib=flush.buffer.numel() >> 20, timer="cuda events",
        forward_grad_mode="enabled (training forward)",
        **attention_info(workload, MASK, spans, x0.kv_start, x0.kv_end, heads, DTYPE, mode, shape_name=shape),
    )
    if peer_name == "ugd" and benchmark.extra_info["backend"] == "ugd_ops (reference)":
        benchmark.extra_info["warning"] = "no compiled CUDA kernel: this times the pure-PyTorch reference"
    prepared = [peer.prepare(x, spans, dout) for x, dout in sets]
    torch.cuda.synchronize()
    _time_attention(benchmark, prepared, mode, flush)
    bench_finish()


def _ugd_path(x) -> str:
    """Which path serves ugd_ops.partitioned_attention here: compiled kernel, flex or reference (named as
    ``ugd_backend`` names it for the model benchmarks)."""
    from ugd_ops.ops import attention_path

    return f"ugd_ops ({attention_path(x.q, x.k, x.v)})"


@pytest.mark.parametrize("builder", ["create_block_mask", "ugd_ops.flex"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_flex_block_mask_build(benchmark, bench_record, bench_finish, attention_info, flush, workload, builder):
    """The block mask over the packed batch, reported apart from the attention: FlexAttention's
    create_block_mask (compiled, what the flex peer uses) and ugd_ops.flex.build_block_mask (what the
    ugd path builds once per batch, from per-block interval bounds)."""
    peer = ap.PEERS["flex"]
    reason = peer.unavailable(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    heads = next(iter(ATTENTION_SHAPES.values()))  # the block mask does not depend on heads (B = H = None)
    spans, sets = _input_sets(workload, heads)
    x0 = sets[0][0]
    info = attention_info(workload, MASK, spans, x0.kv_start, x0.kv_end, heads, DTYPE, "fwd")
    for k in ("shape", "Hq", "Hkv", "head_dim", "mode", "flops", "flops_counting"):
        info.pop(k)
    benchmark.group = f"flex-block-mask-{workload}"
    bench_record("cuda", peer="flex" if builder == "create_block_mask" else "ugd", op=builder,
                 compiled=builder == "create_block_mask", input_sets=SETS, warmup_rounds=WARMUP,
                 timer="cuda events", **info)
    turn = itertools.count()

    def setup():
        x = sets[next(turn) % len(sets)][0]
        flush()
        return (x,), {}

    _use_cuda_clock(benchmark)
    if builder == "create_block_mask":
        def build(x):
            return ap.build_block_mask(x, compiled=True)
    else:
        from ugd_ops import flex

        def build(x):
            return flex.build_block_mask(x.cu_seqlens, x.kv_start, x.kv_end)

    block_mask = benchmark.pedantic(build, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    benchmark.extra_info["block_mask_sparsity_percent"] = float(block_mask.sparsity())
    bench_finish()
