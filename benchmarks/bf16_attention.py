"""The CPU attention kernel in bf16 against fp32 and against SDPA bf16 on the e-SNLI layout
(SmolLM2-135M heads 9/3/64, 16 ugd-ttm samples), interleaved repetitions, medians
(docs/performance.md, "bf16 training on the CPU").

    PYTHONPATH=. python benchmarks/bf16_attention.py [--reps 15] [--threads 2]

Rows: ugd with each bf16 backend this CPU runs (UGD_CPU_BF16_GEMM: avx512bf16 / brgemm where it
packs / loop, today's fp32-converted loop), ugd fp32, SDPA over the padded batch with a dense mask
(the ``sdpa`` peer of attention_peers) in bf16 and fp32. Each repetition runs every row once, in
turn, so load on a shared machine hits all rows alike; medians and minima are printed, and the
ratios are of the minima (the closest reading of a kernel's own time when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_peers as ap  # noqa: E402
from profile_bf16_step import cpu_line  # noqa: E402
from test_bench_cpu import ESNLI_BATCH, MASK, SMOLLM2_HEADS, esnli_like_spans  # noqa: E402

from ugd_ops.workloads import make_attention_inputs  # noqa: E402


def main() -> None:
    ap_ = argparse.ArgumentParser()
    ap_.add_argument("--reps", type=int, default=15)
    ap_.add_argument("--threads", type=int, default=2)
    a = ap_.parse_args()
    torch.set_num_threads(a.threads)
    units = json.loads(torch.ops.ugd_ops.build_info())["cpu"].get("bf16_units", "none")
    spans = esnli_like_spans(ESNLI_BATCH, seed=0)
    rows = []  # (name, peer, dtype, env backend)
    for b in (["avx512bf16"] if units != "none" else []) + (["brgemm"] if units == "amx+brgemm" else []) + ["loop"]:
        rows.append((f"ugd bf16 ({b})", "ugd", torch.bfloat16, b))
    rows += [("ugd fp32", "ugd", torch.float32, None), ("sdpa bf16 (padded, dense mask)", "sdpa", torch.bfloat16, None),
             ("sdpa fp32 (padded, dense mask)", "sdpa", torch.float32, None)]
    prepared = {}
    for name, peer, dtype, _ in rows:
        x = make_attention_inputs(spans, MASK, heads=SMOLLM2_HEADS, dtype=dtype, device="cpu", seed=0)
        dout = torch.randn(x.q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        prepared[name] = ap.PEERS[peer].prepare(x, spans, dout)
    T = int(spans.sum())
    times = {(n, m): [] for n, *_ in rows for m in ("fwd", "fwd+bwd")}
    for rep in range(a.reps + 1):  # the first round warms up
        for name, _, _, backend in rows:
            if backend is None:
                os.environ.pop("UGD_CPU_BF16_GEMM", None)
            else:
                os.environ["UGD_CPU_BF16_GEMM"] = backend
            p = prepared[name]
            for mode in ("fwd", "fwd+bwd"):
                p.clear_grads()
                t0 = time.perf_counter()
                out = p.run()
                if mode == "fwd+bwd":
                    out.backward(p.dout)
                dt = time.perf_counter() - t0
                if rep:
                    times[(name, mode)].append(dt)
    os.environ.pop("UGD_CPU_BF16_GEMM", None)
    print(f"# {cpu_line()}; torch {torch.__version__}; {a.threads} threads; {time.strftime('%Y-%m-%d')}; "
          f"e-SNLI-like ugd-ttm layout, {ESNLI_BATCH} samples, T = {T}, heads {SMOLLM2_HEADS}; "
          f"median of {a.reps} interleaved repetitions (shared machine)")
    # the minimum as well: on a loaded machine it is the closest reading of the kernel's own time
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print("| kernel | fwd ms median (min) | fwd+bwd ms median (min) | fwd / ugd fp32 (of mins) | "
          "fwd+bwd / ugd fp32 (of mins) |")
    print("|---|---:|---:|---:|---:|")
    for name, *_ in rows:
        f, fb = (name, "fwd"), (name, "fwd+bwd")
        rf, rfb = low[f] / low[("ugd fp32", "fwd")], low[fb] / low[("ugd fp32", "fwd+bwd")]
        print(f"| {name} | {med[f] * 1e3:.2f} ({low[f] * 1e3:.2f}) | {med[fb] * 1e3:.2f} ({low[fb] * 1e3:.2f}) | "
              f"{rf:.2f} | {rfb:.2f} |")


if __name__ == "__main__":
    main()
