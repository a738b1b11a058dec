"""One SmolLM2-135M training step on e-SNLI batches, built by ugd's own pipeline (parse_args,
load_data, build_model, UGDCollator), for the bf16 profile and step benchmark (docs/performance.md).

    from smollm2_step import build, step
    model, batches = build(n_batches=3)           # batches of 16 records of the e-SNLI training split
    step(model, opt, batches[0], bf16=True)      # forward + backward + optimizer step

Not a pytest file: loading the 135M backbone takes seconds and the steps take seconds each, so the
figures come from ``benchmarks/bf16_step.py`` run once, not from CI.
"""

from __future__ import annotations

import os

import torch

ESNLI = os.environ.get("UGD_ESNLI_DIR", "/work/shared/data/esnli")


def build(n_batches: int = 3, batch_size: int = 16, paradigm: str = "ugd-ttm", attn: str = "ugd", seed: int = 0):
    """(model in train mode, fp32 weights; list of packed batches) with the study's lengths (query and
    document 64 tokens, reason 48)."""
    from ugd.data.collator import UGDCollator
    from ugd.data.layout import LayoutConfig
    from ugd.training.args import parse_args
    from ugd.training.build import build_model, load_data

    run = parse_args(["--model_name_or_path", "smollm2-135m", "--train_file", f"{ESNLI}/train.jsonl",
                      "--paradigm", paradigm, "--max_query_len", "64", "--max_document_len", "64",
                      "--max_reason_len", "48", "--output_dir", "/tmp/ugd-bf16-step", "--seed", str(seed),
                      "--attn_implementation", attn])
    train, _, _, num_labels = load_data(run, None)
    model, tokenizer = build_model(run, num_labels, train)
    layout = LayoutConfig(**model.config.layout) if model.config.layout else LayoutConfig()
    collator = UGDCollator(tokenizer, paradigm=model.paradigm, layout=layout, model_config=model.config)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g).tolist()
    batches = [collator([train[i] for i in order[b * batch_size:(b + 1) * batch_size]]) for b in range(n_batches)]
    model.train()
    return model, batches


def step(model, opt, batch, *, bf16: bool) -> float:
    """Forward (under CPU bf16 autocast when ``bf16``, as Trainer's --bf16 does), backward, optimizer
    step; returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())
