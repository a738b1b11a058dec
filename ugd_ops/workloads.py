"""The speed workloads of docs/spec.md section 9, shared by the benchmarks and the tests.

A workload is a packed batch of UGD samples whose span lengths are drawn around the means of the
paper's Table 4 (query / document / reason tokens): ``qlq`` 31/230/146, ``bq`` 12/12/75,
``nli`` 16/9/58 (32 samples each), and ``longdoc`` (8 samples, document 4096, reason 256) for
scaling. Span lengths follow the layout of docs/spec.md section 2:

    Lq = query + 1 ([CLS]), Ld = document + 1 ([CLS]), Lp = PROMPT_TOKENS, Lg = reason + 1 ([Start])

FLOPs count only allowed (query, key) pairs: 4 * D per pair and head forward, 2.5x that backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# "because [gMask], the correlation score is [CLS]" is about eight tokens in common tokenizers.
PROMPT_TOKENS = 8


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    query: int
    document: int
    reason: int
    jitter: float = 0.5  # lengths drawn uniformly from mean * [1 - jitter, 1 + jitter]


WORKLOADS = {
    "qlq": Workload("qlq", 32, 31, 230, 146),
    "bq": Workload("bq", 32, 12, 12, 75),
    "nli": Workload("nli", 32, 16, 9, 58),
    "longdoc": Workload("longdoc", 8, 32, 4096, 256, jitter=0.0),
}

# (Hq, Hkv, D)
ATTENTION_SHAPES = {
    "qwen2.5-1.5b": (12, 2, 128),
    "mha16": (16, 16, 128),
}


def _draw(mean: int, jitter: float, n: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = max(1, round(mean * (1 - jitter))), max(1, round(mean * (1 + jitter)))
    return torch.randint(lo, hi + 1, (n,), generator=gen)


def make_spans(workload: str | Workload, *, seed: int = 0, batch: int | None = None, with_prompt: bool = True,
               with_reason: bool = True) -> torch.Tensor:
    """Span lengths int32 ``[B, 4]`` (Lq, Ld, Lp, Lg) of a workload, deterministic for a seed."""
    w = WORKLOADS[workload] if isinstance(workload, str) else workload
    n = w.batch if batch is None else batch
    gen = torch.Generator().manual_seed(seed)
    spans = torch.zeros((n, 4), dtype=torch.int32)
    spans[:, 0] = _draw(w.query, w.jitter, n, gen) + 1
    spans[:, 1] = _draw(w.document, w.jitter, n, gen) + 1
    spans[:, 2] = PROMPT_TOKENS if with_prompt else 0
    spans[:, 3] = (_draw(w.reason, w.jitter, n, gen) + 1) if with_reason else 0
    return spans


def random_spans(batch: int, *, seed: int, max_len: int = 40, allow_empty: bool = True) -> torch.Tensor:
    """Awkward random span lengths for tests: Lq, Ld >= 1; Lp and Lg may be 0 when ``allow_empty``."""
    gen = torch.Generator().manual_seed(seed)
    lo = 0 if allow_empty else 1
    spans = torch.randint(lo, max_len + 1, (batch, 4), generator=gen, dtype=torch.int32)
    spans[:, :2] = spans[:, :2].clamp(min=1)
    return spans


@dataclass
class AttentionInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    max_seqlen: int

    def args(self):
        return self.q, self.k, self.v, self.cu_seqlens, self.kv_start, self.kv_end


def make_attention_inputs(spans: torch.Tensor, mask: str, *, heads: tuple[int, int, int], dtype=torch.bfloat16,
                          device="cpu", seed: int = 0, requires_grad: bool = False) -> AttentionInputs:
    """Random q, k, v ``[T, H, D]`` with the layout of ``spans`` under ``mask``."""
    from .reference import row_intervals  # the reference: no dependence on which kernels were built

    cu, ks, ke = row_intervals(spans, mask)
    T = int(cu[-1])
    Hq, Hkv, D = heads
    gen = torch.Generator().manual_seed(seed)

    def rnd(h):
        return torch.randn((T, h, D), generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    lengths = cu[1:] - cu[:-1]
    return AttentionInputs(rnd(Hq), rnd(Hkv), rnd(Hkv), cu.to(device), ks.to(device), ke.to(device),
                           int(lengths.max()) if lengths.numel() else 0)


def allowed_pairs(kv_start: torch.Tensor, kv_end: torch.Tensor) -> int:
    """The number of allowed (query, key) pairs of a layout, per head."""
    return int((kv_end.to(torch.int64) - kv_start.to(torch.int64)).sum())


def attention_flops(pairs: int, heads: int, head_dim: int, mode: str = "fwd") -> float:
    """FLOPs of partitioned attention counting allowed pairs only (docs/spec.md section 9)."""
    fwd = 4.0 * head_dim * pairs * heads
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def padded_batch(batch: dict) -> dict:
    """A packed batch (``input_ids`` / ``position_ids`` ``[1, T]``, ``cu_seqlens``, ``kv_start``, ``kv_end``)
    as the padded ``[B, L]`` batch a stock model takes: ``input_ids``, ``position_ids``, ``allowed``
    (bool ``[B, L, L]``: the partition per sample; padding rows see only themselves, so that no softmax
    row is empty) and ``valid`` (bool ``[B, L]``, the real tokens). On the CPU: the peers of the
    benchmarks move it where they run."""
    batch = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    cu = batch["cu_seqlens"].tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    B, L = len(lengths), max(lengths)
    ids = torch.zeros(B, L, dtype=torch.int64)
    pos = torch.zeros(B, L, dtype=torch.int64)
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    cols = torch.arange(L)
    for b, (a, n) in enumerate(zip(cu[:-1], lengths)):
        ids[b, :n] = batch["input_ids"][0, a:a + n]
        pos[b, :n] = batch["position_ids"][0, a:a + n]
        ks, ke = batch["kv_start"][a:a + n].long(), batch["kv_end"][a:a + n].long()
        allowed[b, :n] = (cols[None] >= ks[:, None]) & (cols[None] < ke[:, None])
        allowed[b, n:, :] = torch.eye(L, dtype=torch.bool)[n:]
    valid = cols[None] < torch.tensor(lengths)[:, None]
    return {"input_ids": ids, "position_ids": pos, "allowed": allowed, "valid": valid}
