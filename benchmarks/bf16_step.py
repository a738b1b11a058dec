"""The SmolLM2-135M training step on e-SNLI batches of 16 (ugd-ttm): bf16 autocast against fp32, and
against stock transformers' bf16 step (the same model with its backbone under SDPA on a padded batch
with a dense boolean mask), interleaved repetitions, medians (docs/performance.md, "bf16 training on
the CPU").

    PYTHONPATH=. python benchmarks/bf16_step.py [--reps 5] [--threads 2]

One model and one optimizer (torch.optim.AdamW, fused where given) serve all rows: each repetition
runs one step of each row on the next batch, in turn, so load on a shared machine hits all rows
alike; the weights move a little between rows, which does not change the work of a step. Rows:
    ugd fp32          attn_implementation="ugd", fp32 (today's default)
    ugd bf16          the same under CPU bf16 autocast (--bf16)
    ugd bf16, loop    bf16 autocast with the attention kernel's bf16 products forced to the fp32 loop
                      (UGD_CPU_BF16_GEMM=loop): what this branch adds to the attention
    stock bf16        bf16 autocast, backbone under SDPA over the padded batch, dense mask
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch

from ugd_ops.workloads import padded_batch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_bf16_step import cpu_line, make_opt  # noqa: E402
from smollm2_step import build, step  # noqa: E402


def padded_bool_inputs(batch: dict) -> dict:
    """The packed batch as a padded [B, L] batch with a boolean [B, 1, L, L] mask (ugd_ops.workloads.padded_batch)."""
    p = padded_batch(batch)
    return {"input_ids": p["input_ids"], "position_ids": p["position_ids"], "attention_mask": p["allowed"][:, None],
            "valid": p["valid"]}


def stock_encode(self, pack, *, backbone=None):
    """UGDModel.encode as a plain transformers pipeline runs it: SDPA, padded batch, dense mask."""
    backbone = backbone or self.backbone
    p = self._padded
    hidden = backbone.get_decoder()(input_ids=p["input_ids"], position_ids=p["position_ids"],
                                    attention_mask=p["attention_mask"], use_cache=False).last_hidden_state
    return hidden[p["valid"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optim", default="adamw-fused", choices=["adamw", "adamw-fused"])
    ap.add_argument("--rows", default="ugd-fp32,ugd-bf16,ugd-bf16-loop,stock-bf16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, batches = build(n_batches=a.reps + 1)
    padded = [padded_bool_inputs(b) for b in batches]
    opt = make_opt(model, a.optim)
    own_encode = model.encode
    rows = a.rows.split(",")
    times = {r: [] for r in rows}
    for rep in range(a.reps + 1):  # the first round warms up
        for r in rows:
            b = batches[rep]
            if r == "stock-bf16":
                model.backbone.set_attn_implementation("sdpa")
                model._padded = padded[rep]
                model.encode = types.MethodType(stock_encode, model)
            if r == "ugd-bf16-loop":
                os.environ["UGD_CPU_BF16_GEMM"] = "loop"
            t0 = time.perf_counter()
            step(model, opt, b, bf16=r != "ugd-fp32")
            dt = time.perf_counter() - t0
            os.environ.pop("UGD_CPU_BF16_GEMM", None)
            if r == "stock-bf16":
                model.encode = own_encode
                model.backbone.set_attn_implementation("ugd")
            if rep:
                times[r].append(dt)
            print(f"rep {rep} {r}: {dt:.2f} s", file=sys.stderr, flush=True)
    tokens = [int(b["input_ids"].numel()) for b in batches[1:]]
    print(f"# {cpu_line()}; torch {torch.__version__}; {a.threads} threads; {time.strftime('%Y-%m-%d')}; "
          f"SmolLM2-135M ugd-ttm, e-SNLI batches of 16 ({min(tokens)}-{max(tokens)} packed tokens), "
          f"optimizer {a.optim}; median of {a.reps} interleaved repetitions (shared machine)")
    base = statistics.median(times[rows[0]])
    print("| step | median s | min s | speed-up over " + rows[0] + " |")
    print("|---|---:|---:|---:|")
    for r in rows:
        med = statistics.median(times[r])
        print(f"| {r} | {med:.2f} | {min(times[r]):.2f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
