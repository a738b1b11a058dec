"""Profile of one SmolLM2-135M training step under CPU bf16 autocast (docs/performance.md, "bf16
training on the CPU"): top ops by self time, and which ops run in which dtype.

    PYTHONPATH=. python benchmarks/profile_bf16_step.py [--steps 2] [--fp32] [--optim adamw|adamw-fused]

Two passes over the same batches after one warm-up step: torch.profiler for the times (self CPU time
per aten op, summed over the profiled steps), then a TorchDispatchMode for the dtypes each op saw (the
input floating dtypes of every call and its element count), so "what still runs in fp32" is read
from the ops themselves, not guessed.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2_step import build, step  # noqa: E402


def cpu_line() -> str:
    """CPU model and its matrix/bf16 flags, from lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    keep = [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx512_vnni", "avx_vnni",
                                               "avx512_fp16"))]
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, flags: {' '.join(sorted(keep))}"


class DtypeLog(TorchDispatchMode):
    """Per aten op: calls and input elements by the set of floating dtypes among its tensor inputs."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.elems = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ts = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        dts = sorted({str(t.dtype).replace("torch.", "") for t in ts if t.is_floating_point()})
        key = (str(func.overloadpacket.__name__), "+".join(dts) or "-")
        self.calls[key] += 1
        self.elems[key] += sum(t.numel() for t in ts if t.is_floating_point())
        return func(*args, **(kwargs or {}))


def make_opt(model, kind: str):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw-fused":
        return torch.optim.AdamW(params, lr=3e-5, fused=True)
    return torch.optim.AdamW(params, lr=3e-5)  # transformers' adamw_torch: foreach on the CPU


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="profile the fp32 step instead")
    ap.add_argument("--optim", default="adamw", choices=["adamw", "adamw-fused"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--shapes", default="", help="comma-separated ops to list by input shape, e.g. aten::copy_")
    a = ap.parse_args()
    bf16 = not a.fp32
    print(f"# {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}; bf16 autocast: {bf16}; optimizer {a.optim}")
    model, batches = build(n_batches=a.steps + 1)
    opt = make_opt(model, a.optim)
    T = [int(b["input_ids"].numel()) for b in batches]
    print(f"# batches of 16 e-SNLI records, packed tokens per batch: {T}")
    step(model, opt, batches[0], bf16=bf16)  # warm-up (oneDNN kernels, optimizer state)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=bool(a.shapes)) as prof:
        for b in batches[1:]:
            step(model, opt, b, bf16=bf16)
    wall = time.perf_counter() - t0
    ev = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in ev)
    print(f"# {a.steps} steps under the profiler: {wall:.2f} s wall, {total / 1e6:.2f} s self CPU time summed\n")
    print("| op | self CPU ms / step | share | calls / step |")
    print("|---|---:|---:|---:|")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:a.top]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / a.steps:.1f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count // a.steps} |")
    for op in filter(None, a.shapes.split(",")):
        by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == op]
        print(f"\n| `{op}` input shapes | self CPU ms / step | calls / step |")
        print("|---|---:|---:|")
        for e in sorted(by_shape, key=lambda e: -e.self_cpu_time_total)[:12]:
            print(f"| {e.input_shapes} | {e.self_cpu_time_total / 1e3 / a.steps:.1f} | {e.count // a.steps} |")
    log = DtypeLog()
    with log:
        step(model, opt, batches[1], bf16=bf16)
    print("\n| op | input dtypes | calls | input elements (M) |")
    print("|---|---|---:|---:|")
    for key, n in sorted(log.elems.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"| `{key[0]}` | {key[1]} | {log.calls[key]} | {n / 1e6:.1f} |")


if __name__ == "__main__":
    main()
