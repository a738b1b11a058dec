"""Shared helpers of the ugd_ops benchmark suite (docs/spec.md section 9).

Run from the repository root::

    pytest benchmarks/ --benchmark-only                        # CPU suite; GPU suite too when CUDA is present
    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json

Every benchmark records in ``benchmark.extra_info`` what a published figure needs: workload,
mask, shape, dtype, device, allowed (query, key) pairs, FLOPs, torch / CUDA versions, GPU
name, date, and which ugd_ops backend served the operator. Attention benchmarks also record
``tflops_at_median`` (effective TFLOP/s: allowed-pair FLOPs of docs/spec.md section 9 over the median
time), which a summary at the end of the run prints next to the medians.

The helpers are reached through fixtures (``bench_record``, ``bench_finish``), the way pytest means a
conftest.py to be used, never by ``from conftest import ...``.
"""

from __future__ import annotations

import datetime
import platform

import pytest
import torch

import ugd_ops
from ugd_ops import _backend
from ugd_ops.workloads import allowed_pairs, attention_flops

# (name, median seconds, TFLOP/s) of the attention benchmarks of this run, for the summary.
_TFLOPS_ROWS: list[tuple[str, float, float]] = []


def environment_info(device: str | torch.device) -> dict:
    """Versions and hardware that name a figure: torch, CUDA, GPU, date, ugd_ops build."""
    device = torch.device(device)
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,  # the CUDA torch was built with (None on CPU-only builds)
        "python": platform.python_version(),
        "ugd_ops": ugd_ops.__version__,
        "ugd_ops_compiled": _backend.compiled,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu_name=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            driver_cuda=_driver_cuda_version(),
        )
    return info


def _driver_cuda_version():
    try:
        v = torch._C._cuda_getDriverVersion()  # e.g. 12040
        return f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:  # pragma: no cover - private API, informational only
        return None


def ugd_backend(op: str, device: str | torch.device, shape: dict | None = None) -> str:
    """'compiled' or 'reference' for a ugd_ops operator on a device type (see ``python -m ugd_ops.info``).

    With a model ``shape`` (``config``, ``device``, ``dtype``), partitioned attention is answered with the path
    ``ugd_ops.partitioned_attention`` takes for that model: 'ugd_ops (cpu|cuda-kernel|flex|reference)'. On CUDA
    the operator routes by dtype and head dim, so the operator's registration alone cannot say.
    """
    if shape is not None and op in _backend.ATTENTION_OPS:
        return f"ugd_ops ({_model_attention_path(shape)})"
    key = torch.device(device).type.upper()
    if not _backend.compiled or (op, key) in _backend.reference_fallbacks:
        return "reference"
    return "compiled"


def _model_attention_path(shape: dict) -> str:
    """``ugd_ops.ops.attention_path`` for the attention of a model shape (probe tensors of one token)."""
    from ugd_ops.ops import attention_path

    cfg = shape["config"]
    D = cfg["hidden_size"] // cfg["num_attention_heads"]
    q = torch.empty((1, cfg["num_attention_heads"], D), device=shape["device"], dtype=shape["dtype"])
    k = torch.empty((1, cfg["num_key_value_heads"], D), device=shape["device"], dtype=shape["dtype"])
    return attention_path(q, k, k)


def attention_info(workload: str, mask: str, spans: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                   heads: tuple[int, int, int], dtype: torch.dtype, mode: str, shape_name: str | None = None) -> dict:
    """What names an attention figure, with the allowed pairs and the FLOPs of ``mode``."""
    Hq, Hkv, D = heads
    pairs = allowed_pairs(kv_start, kv_end)
    lengths = spans.to(torch.int64).sum(1)
    return {
        "workload": workload,
        "mask": mask,
        "batch": int(spans.shape[0]),
        "tokens": int(lengths.sum()),
        "max_seqlen": int(lengths.max()),
        "shape": shape_name or f"Hq{Hq}-Hkv{Hkv}-D{D}",
        "Hq": Hq,
        "Hkv": Hkv,
        "head_dim": D,
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        "allowed_pairs_per_head": pairs,
        "flops": attention_flops(pairs, Hq, D, mode),
        "flops_counting": "allowed (query, key) pairs only: fwd 4*D*pairs*Hq, bwd 2.5x fwd (docs/spec.md section 9)",
    }


def tflops(flops: float, seconds: float) -> float:
    """Effective TFLOP/s of ``flops`` done in ``seconds``."""
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def median_seconds(benchmark) -> float | None:
    """The median of a finished pytest-benchmark run, or None when benchmarking is disabled."""
    stats = getattr(benchmark, "stats", None)
    if not stats:
        return None
    return float(stats.stats.median)


@pytest.fixture(name="attention_info")
def attention_info_fixture():
    """The ``attention_info`` helper (fixtures spare the test modules an import of this conftest)."""
    return attention_info


@pytest.fixture(name="ugd_backend")
def ugd_backend_fixture():
    """The ``ugd_backend`` helper: ``ugd_backend(op, device[, shape])`` -> 'compiled' or 'reference' (see there)."""
    return ugd_backend


@pytest.fixture
def bench_record(benchmark):
    """``bench_record(device, **fields)``: put the environment and ``fields`` into ``benchmark.extra_info``."""

    def record(device, **fields):
        benchmark.extra_info.update(environment_info(device))
        benchmark.extra_info.update(fields)
        return benchmark.extra_info

    return record


@pytest.fixture
def bench_finish(benchmark, request):
    """``bench_finish()`` after the timed run: adds ``median_s`` and, with ``flops`` recorded, ``tflops_at_median``."""

    def finish():
        med = median_seconds(benchmark)
        if med is None:
            return None
        benchmark.extra_info["median_s"] = med
        flops = benchmark.extra_info.get("flops")
        if flops:
            rate = tflops(flops, med)
            benchmark.extra_info["tflops_at_median"] = rate
            _TFLOPS_ROWS.append((request.node.name, med, rate))
            return rate
        return None

    return finish


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        machine_info["gpu_name"] = torch.cuda.get_device_name()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _TFLOPS_ROWS:
        return
    tr = terminalreporter
    tr.section("ugd_ops attention: effective TFLOP/s at the median (allowed-pair FLOPs, docs/spec.md section 9)")
    width = max(len(name) for name, _, _ in _TFLOPS_ROWS)
    for name, med, rate in _TFLOPS_ROWS:
        tr.write_line(f"{name:<{width}}  median {med * 1e3:10.3f} ms  {rate:10.4f} TFLOP/s")
