"""Benchmarks of the two losses of docs/spec.md section 5: detached_kl and linear_cross_entropy, against eager
PyTorch (and torch.compile / Liger-Kernel on the GPU).

    pytest benchmarks/test_bench_losses.py --benchmark-only
    pytest benchmarks/test_bench_losses.py --benchmark-only --benchmark-json=losses.json

CPU (small shapes, a few rounds; seconds in all):
  - detached_kl forward+backward on [8192, 4] and [1024, 256] fp32: ugd vs eager (log_softmax + F.kl_div);
  - linear_cross_entropy forward+backward, 1024 tokens x 8192 vocab x hidden 128 fp32: ugd (chunked)
    vs eager (full logits + F.cross_entropy).
GPU (skipped without CUDA), the targets of the issue:
  - detached_kl forward+backward at N = 8192 rows, C = 4 and C = 1024, bf16 and fp32: ugd vs eager vs
    torch.compile(eager);
  - linear_cross_entropy forward+backward at 4096 tokens x 151,936 vocab (Qwen2.5) x hidden 1536, bf16:
    ugd vs eager (logits upcast to fp32, as Hugging Face does) vs Liger-Kernel's fused linear
    cross-entropy when it can be imported. Besides the time, each records the peak memory of one
    forward+backward above what the inputs hold (``torch.cuda.max_memory_allocated``).
  GPU timing measures the kernels, not the launches: UGD_BENCH_GRAPH_REPS (default 20) forward+backward
  calls are captured in one CUDA graph, each round replays it between two CUDA events, and the clock
  divides by the repetitions (one call of these losses is a few microseconds of GPU work, far less
  than the ~0.5 ms Python and autograd take to launch it: an event pair around a single eager call
  measured that launch overhead, alike for every implementation). Where capture fails (a peer that
  synchronises), the same repetitions run as an eager loop and ``timing`` says "eager-loop".
  UGD_BENCH_WARMUP discarded rounds, UGD_BENCH_ROUNDS kept ones. No L2 flush: inputs this small stay
  in L2 in a real step too (the previous layer just wrote them).
Every peer is checked against ugd_ops before it is timed; a peer that disagrees gives no figure.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import attention_peers as ap
import ugd_ops
from ugd_ops import chunked_ce

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="GPU benchmarks need a CUDA device")
GPU_ROUNDS = int(os.environ.get("UGD_BENCH_ROUNDS", "50"))
GPU_WARMUP = int(os.environ.get("UGD_BENCH_WARMUP", "5"))
GRAPH_REPS = int(os.environ.get("UGD_BENCH_GRAPH_REPS", "20"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# the peers
# ---------------------------------------------------------------------------------------------


def kl_ugd(p, q, temperature):
    return ugd_ops.detached_kl(p, q, temperature=temperature, reduction="batchmean")


def kl_eager(p, q, temperature):
    """What one writes without ugd_ops: F.kl_div(input, target) is KL(target || input), so P is the target."""
    log_p = F.log_softmax(p.float() / temperature, dim=-1)
    log_q = F.log_softmax(q.detach().float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def ce_ugd(hidden, weight, targets, chunk_size=None):
    return ugd_ops.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)


def ce_eager(hidden, weight, targets, chunk_size=None):
    """Full [N, V] logits, upcast to fp32 (as Hugging Face's causal-LM loss does), then F.cross_entropy."""
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def _liger_ce():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # not installed, or no Triton for this GPU
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    return lambda hidden, weight, targets, chunk_size=None: loss(weight, hidden, targets)


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------

KL_CPU = {"ugd": kl_ugd, "eager": kl_eager}
CE_CPU = {"ugd": ce_ugd, "eager": ce_eager}


@pytest.mark.parametrize("rows,classes", [(8192, 4), (1024, 256)], ids=["8192x4", "1024x256"])
@pytest.mark.parametrize("impl", list(KL_CPU))
def test_detached_kl_vs_eager_cpu(benchmark, bench_record, bench_finish, ugd_backend, impl, rows, classes):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn((rows, classes), generator=gen).requires_grad_(True)
    q = torch.randn((rows, classes), generator=gen)
    fn = KL_CPU[impl]
    torch.testing.assert_close(fn(p, q, 2.0), kl_ugd(p, q, 2.0), rtol=1e-5, atol=1e-6)
    benchmark.group = f"losses-cpu-detached_kl-{rows}x{classes}-fwd+bwd"
    bench_record("cpu", impl=impl, backend=ugd_backend("detached_kl_fwd", "cpu") if impl == "ugd" else "eager",
                 op="detached_kl", mode="fwd+bwd", shape=[rows, classes], dtype="float32", temperature=2.0,
                 reduction="batchmean")

    def clear():
        p.grad = None

    benchmark.pedantic(lambda: fn(p, q, 2.0).backward(), setup=clear, rounds=20, warmup_rounds=2, iterations=1)
    bench_finish()


@pytest.mark.parametrize("impl", list(CE_CPU))
def test_linear_cross_entropy_vs_eager_cpu(benchmark, bench_record, bench_finish, impl):
    N, H, V, chunk = 1024, 128, 8192, 256
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn((N, H), generator=gen).requires_grad_(True)
    weight = (torch.randn((V, H), generator=gen) / H**0.5).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::7] = -100
    fn = CE_CPU[impl]
    torch.testing.assert_close(fn(hidden, weight, targets, chunk), ce_ugd(hidden, weight, targets, chunk),
                               rtol=1e-5, atol=1e-5)
    benchmark.group = f"losses-cpu-linear_cross_entropy-{N}x{V}x{H}-fwd+bwd"
    bench_record("cpu", impl=impl, backend="python (chunked PyTorch)" if impl == "ugd" else "eager",
                 op="linear_cross_entropy", mode="fwd+bwd", tokens=N, vocab=V, hidden=H, dtype="float32",
                 chunk_size=chunk if impl == "ugd" else None,
                 largest_logits_block_mib=(chunk if impl == "ugd" else N) * V * 4 / 2**20)

    def clear():
        hidden.grad = None
        weight.grad = None

    benchmark.pedantic(lambda: fn(hidden, weight, targets, chunk).backward(), setup=clear, rounds=5,
                       warmup_rounds=1, iterations=1)
    bench_finish()


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


class PerCallClock(ap.CudaEventClock):
    """CUDA-event time of a round divided by the calls the round makes: pytest-benchmark's statistics
    are then per call."""

    __name__ = "cuda_event_clock_per_call"

    def __init__(self, calls: int):
        super().__init__()
        self.calls = calls

    def __call__(self) -> float:
        return super().__call__() / self.calls


def graphed(run, reps: int):
    """``reps`` calls of ``run`` captured in one CUDA graph (warmed up on a side stream, as CUDA graph
    capture requires), or None when capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                run()
    except Exception:  # noqa: BLE001  (a peer that syncs or allocates on the host cannot be captured)
        torch.cuda.synchronize()
        return None
    return graph


def _time_gpu(benchmark, run, clear, reps: int = GRAPH_REPS):
    """Kernel time per call of ``run`` (a forward+backward; ``clear`` drops the gradients)."""
    if not hasattr(benchmark, "_timer"):
        pytest.fail("this pytest-benchmark has no BenchmarkFixture._timer; the CUDA-event clock cannot be installed")
    clear()
    graph = graphed(run, reps)
    if graph is not None:
        target, timing = graph.replay, "cuda-graph"
    else:
        def target():
            for _ in range(reps):
                run()
        timing = "eager-loop"
    benchmark.extra_info.update(timing=timing, calls_per_round=reps)
    benchmark._timer = PerCallClock(reps)
    benchmark.pedantic(target, rounds=GPU_ROUNDS, warmup_rounds=GPU_WARMUP, iterations=1)
    clear()


def _peak_memory(run, clear, inputs_bytes: int) -> dict:
    """Peak memory of one call of ``run`` (a forward+backward) above what was allocated before it,
    after a warm-up call (so that cuBLAS workspaces and compiled code are not counted)."""
    run()
    clear()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    clear()
    return {"peak_memory_gib": peak / 2**30, "inputs_gib": inputs_bytes / 2**30}


_kl_compiled = {}


def _kl_impl(name):
    if name == "compiled":
        if "fn" not in _kl_compiled:
            _kl_compiled["fn"] = torch.compile(kl_eager, dynamic=False)
        return _kl_compiled["fn"]
    return {"ugd": kl_ugd, "eager": kl_eager}[name]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dtype_name)
@pytest.mark.parametrize("classes", [4, 1024])
@pytest.mark.parametrize("impl", ["ugd", "eager", "compiled"])
def test_detached_kl_gpu(benchmark, bench_record, bench_finish, ugd_backend, impl, classes, dtype):
    rows = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn((rows, classes), generator=gen, device="cuda").to(dtype).requires_grad_(True)
    q = torch.randn((rows, classes), generator=gen, device="cuda").to(dtype)
    fn = _kl_impl(impl)
    torch.testing.assert_close(fn(p, q, 2.0).float(), kl_ugd(p, q, 2.0).float(), rtol=1e-3, atol=1e-4)
    benchmark.group = f"losses-gpu-detached_kl-{rows}x{classes}-{_dtype_name(dtype)}-fwd+bwd"
    bench_record("cuda", impl=impl, backend=ugd_backend("detached_kl_fwd", "cuda") if impl == "ugd" else impl,
                 op="detached_kl", mode="fwd+bwd", shape=[rows, classes], dtype=_dtype_name(dtype), temperature=2.0,
                 reduction="batchmean", timer="cuda events per call", warmup_rounds=GPU_WARMUP)

    def clear():
        p.grad = None

    benchmark.extra_info.update(_peak_memory(lambda: fn(p, q, 2.0).backward(), clear, 2 * p.numel() * p.element_size()))
    _time_gpu(benchmark, lambda: fn(p, q, 2.0).backward(), clear)
    bench_finish()


CE_GPU_SHAPE = dict(tokens=4096, vocab=151_936, hidden=1536)  # Qwen2.5-1.5B's LM head


@requires_cuda
@pytest.mark.parametrize("impl", ["ugd", "eager", "liger"])
def test_linear_cross_entropy_gpu(benchmark, bench_record, bench_finish, impl):
    N, V, H = CE_GPU_SHAPE["tokens"], CE_GPU_SHAPE["vocab"], CE_GPU_SHAPE["hidden"]
    dtype = torch.bfloat16
    fn = {"ugd": ce_ugd, "eager": ce_eager, "liger": _liger_ce()}[impl]
    if fn is None:
        pytest.skip("liger_kernel is not importable")
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn((N, H), generator=gen, device="cuda").to(dtype).requires_grad_(True)
    weight = (torch.randn((V, H), generator=gen, device="cuda") / H**0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=gen, device="cuda")
    targets[::16] = -100
    chunk = chunked_ce.default_chunk_size(V)
    if impl != "ugd":  # the peer must agree with ugd_ops before it is timed
        torch.testing.assert_close(fn(hidden, weight, targets).float(), ce_ugd(hidden, weight, targets).float(),
                                   rtol=2e-2, atol=2e-2)
    benchmark.group = f"losses-gpu-linear_cross_entropy-{N}x{V}x{H}-bf16-fwd+bwd"
    bench_record("cuda", impl=impl, backend="python (chunked PyTorch)" if impl == "ugd" else impl,
                 op="linear_cross_entropy", mode="fwd+bwd", dtype=_dtype_name(dtype), chunk_size=chunk if impl == "ugd"
                 else None, timer="cuda events per call", warmup_rounds=GPU_WARMUP,
                 matmul_flops=3 * 2 * N * V * H,  # logits, grad_hidden, grad_weight
                 **CE_GPU_SHAPE)

    def run():
        fn(hidden, weight, targets).backward()

    def clear():
        hidden.grad = None
        weight.grad = None

    inputs_bytes = (hidden.numel() + weight.numel()) * 2
    benchmark.extra_info.update(_peak_memory(run, clear, inputs_bytes))
    _time_gpu(benchmark, run, clear, reps=1)  # milliseconds of matmuls per call: launches do not matter
    bench_finish()
