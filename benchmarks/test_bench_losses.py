"""Benchmarks of the two losses of SPEC section 5: detached_kl and linear_cross_entropy, against eager
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
  GPU timing uses the CUDA-event clock of attention_peers (the event time of the timed work alone),
  an L2 flush before every round, UGD_BENCH_WARMUP discarded rounds and UGD_BENCH_ROUNDS kept ones.
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


def _time_gpu(benchmark, target, setup):
    if not hasattr(benchmark, "_timer"):
        pytest.fail("this pytest-benchmark has no BenchmarkFixture._timer; the CUDA-event clock cannot be installed")
    benchmark._timer = ap.CudaEventClock()
    benchmark.pedantic(target, setup=setup, rounds=GPU_ROUNDS, warmup_rounds=GPU_WARMUP, iterations=1)


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


@pytest.fixture(scope="module")
def flush():
    return ap.L2Flush("cuda")


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
def test_detached_kl_gpu(benchmark, bench_record, bench_finish, ugd_backend, flush, impl, classes, dtype):
    rows = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn((rows, classes), generator=gen, device="cuda").to(dtype).requires_grad_(True)
    q = torch.randn((rows, classes), generator=gen, device="cuda").to(dtype)
    fn = _kl_impl(impl)
    torch.testing.assert_close(fn(p, q, 2.0).float(), kl_ugd(p, q, 2.0).float(), rtol=1e-3, atol=1e-4)
    benchmark.group = f"losses-gpu-detached_kl-{rows}x{classes}-{_dtype_name(dtype)}-fwd+bwd"
    bench_record("cuda", impl=impl, backend=ugd_backend("detached_kl_fwd", "cuda") if impl == "ugd" else impl,
                 op="detached_kl", mode="fwd+bwd", shape=[rows, classes], dtype=_dtype_name(dtype), temperature=2.0,
                 reduction="batchmean", timer="cuda events", warmup_rounds=GPU_WARMUP)

    def setup():
        p.grad = None
        flush()
        return (), {}

    def clear():
        p.grad = None

    _time_gpu(benchmark, lambda: fn(p, q, 2.0).backward(), setup)
    benchmark.extra_info.update(_peak_memory(lambda: fn(p, q, 2.0).backward(), clear, 2 * p.numel() * p.element_size()))
    bench_finish()


CE_GPU_SHAPE = dict(tokens=4096, vocab=151_936, hidden=1536)  # Qwen2.5-1.5B's LM head


@requires_cuda
@pytest.mark.parametrize("impl", ["ugd", "eager", "liger"])
def test_linear_cross_entropy_gpu(benchmark, bench_record, bench_finish, flush, impl):
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
                 else None, timer="cuda events", warmup_rounds=GPU_WARMUP,
                 matmul_flops=3 * 2 * N * V * H,  # logits, grad_hidden, grad_weight
                 **CE_GPU_SHAPE)

    def run():
        fn(hidden, weight, targets).backward()

    def clear():
        hidden.grad = None
        weight.grad = None

    def setup():
        clear()
        flush()
        return (), {}

    inputs_bytes = (hidden.numel() + weight.numel()) * 2
    benchmark.extra_info.update(_peak_memory(run, clear, inputs_bytes))
    _time_gpu(benchmark, run, setup)
    bench_finish()
