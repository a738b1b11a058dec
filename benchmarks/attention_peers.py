"""The attention peers of docs/spec.md section 9, a correctness check for each, and a CUDA-event clock.

Every peer turns one packed input set (``ugd_ops.workloads.AttentionInputs``, mask "ttm") into
a ``Prepared``: its own leaf tensors (in the layout the peer wants, built here, outside any timed
region), a ``run()`` that is the timed forward, the output gradient in the peer's layout, and
converters back to the packed ``[T, H, D]`` layout for the correctness check.

Peers:
    ugd          ugd_ops.partitioned_attention on the packed batch.
    sdpa         torch SDPA with a dense boolean mask over a padded batch [B, H, Lmax, D], k/v heads
                 repeated as transformers' ``repeat_kv`` does (inside the timed region, as in a model).
    flex         FlexAttention (compiled) over the packed batch [1, H, T, D] with a block mask whose
                 mask_mod reads per-token sequence id, sequence start, kv_start and kv_end.
    fa2_torch    FlashAttention-2 varlen of PyTorch's own build (aten._flash_attention_forward, with
                 its autograd formula), four calls: Q rows on Q keys, D rows on D keys, P rows on the
                 first A = Lq + Ld + Lp keys, G rows on all keys with bottom-right causal; the gathers
                 of q/k/v rows and the final un-permute are inside the timed region.
    flash_attn   the same four calls through the flash_attn package (when importable).
    xformers     the same four calls through xformers' memory_efficient_attention (when importable).

``check_peer`` compares a peer's output and gradients against ``ugd_ops.reference`` (fp32) on
small layouts; the GPU benchmarks run it (once per peer and head shape) before timing anything.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import ugd_ops
from ugd_ops import reference
from ugd_ops.workloads import AttentionInputs, Workload, make_attention_inputs, make_spans

MASK = "ttm"


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


class CudaEventClock:
    """A pytest-benchmark timer that reads GPU time.

    Each call records a CUDA event on the current stream, waits for it, and returns the running
    sum (seconds, a Python float) of the event-to-event times so far. pytest-benchmark calls the
    timer right before and right after the target, so the difference of two readings is the CUDA
    event elapsed time of the work the target launched; whatever ``setup`` launched before is
    finished before the first event completes and is not counted. Pairwise ``elapsed_time`` keeps
    the float32 milliseconds of CUDA small, hence precise.
    """

    __name__ = "cuda_event_clock"

    def __init__(self):
        self._last = None
        self._total = 0.0

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        if self._last is not None:
            self._total += self._last.elapsed_time(event) / 1e3
        self._last = event
        return self._total


class L2Flush:
    """Writes a buffer larger than any GPU's L2 cache (call it outside the timed region)."""

    def __init__(self, device, mib: int = 256):
        self.buffer = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)

    def __call__(self):
        self.buffer.zero_()


# ---------------------------------------------------------------------------------------------
# layout helpers
# ---------------------------------------------------------------------------------------------


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _cu(lengths: torch.Tensor, device) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths.to(torch.int64), 0)
    return cu.to(device)


def _rows(starts: torch.Tensor, offset: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Absolute packed rows [starts[b] + offset[b], + length[b]) of every sample b, concatenated (int64, CPU)."""
    length = length.to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(length.numel()), length)
    first = torch.cumsum(length, 0) - length  # where each sample's block starts in the output
    within = torch.arange(int(length.sum())) - first[seg]
    return (starts.to(torch.int64) + offset.to(torch.int64))[seg] + within


@dataclass
class Prepared:
    leaves: tuple[torch.Tensor, ...]  # q, k, v as the peer holds them; backward fills their .grad
    run: Callable[[], torch.Tensor]  # the timed forward
    dout: torch.Tensor  # gradient of run()'s output, in its layout
    to_packed: Callable[[torch.Tensor], torch.Tensor]  # run()'s output -> packed [T, Hq, D]
    grads_packed: Callable[[], tuple[torch.Tensor, ...]]  # leaves' grads -> packed dq, dk, dv

    def clear_grads(self):
        for t in self.leaves:
            t.grad = None


def _identity(t):
    return t


def _packed_prepared(x: AttentionInputs, dout: torch.Tensor, fn) -> Prepared:
    q, k, v = (_leaf(t) for t in (x.q, x.k, x.v))
    return Prepared((q, k, v), lambda: fn(q, k, v), dout, _identity, lambda: (q.grad, k.grad, v.grad))


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------


class Peer:
    name = "?"

    def unavailable(self, device) -> str | None:
        """Why this peer cannot run on ``device``, or None."""
        return None

    def prepare(self, x: AttentionInputs, spans: torch.Tensor, dout: torch.Tensor) -> Prepared:
        raise NotImplementedError


class UgdPeer(Peer):
    name = "ugd"

    def prepare(self, x, spans, dout):
        scale = x.q.shape[-1] ** -0.5
        cu, ks, ke, max_seqlen = x.cu_seqlens, x.kv_start, x.kv_end, x.max_seqlen
        return _packed_prepared(x, dout, lambda q, k, v: ugd_ops.partitioned_attention(
            q, k, v, cu, ks, ke, max_seqlen=max_seqlen, softmax_scale=scale))


def repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * group, L, D], head h reading kv head h // group (transformers' repeat_kv)."""
    if group == 1:
        return t
    B, H, L, D = t.shape
    return t[:, :, None].expand(B, H, group, L, D).reshape(B, H * group, L, D)


class SdpaDenseMaskPeer(Peer):
    """What a stock transformers model does with a 4D mask: padded batch, repeat_kv, boolean mask."""

    name = "sdpa"

    def prepare(self, x, spans, dout):
        device = x.q.device
        T, Hq, D = x.q.shape
        cu = x.cu_seqlens.to(torch.int64).cpu()
        lengths = cu[1:] - cu[:-1]
        B, Lmax = lengths.numel(), int(lengths.max())
        seg = torch.repeat_interleave(torch.arange(B), lengths)
        flat = (seg * Lmax + torch.arange(T) - cu[:-1][seg]).to(device)  # packed row -> padded row

        def pad(t):  # [T, H, D] -> [B, Lmax, H, D], zeros in the padding
            out = t.new_zeros((B * Lmax,) + tuple(t.shape[1:]))
            out[flat] = t.detach()
            return out.view((B, Lmax) + tuple(t.shape[1:]))

        # Rows in the padding read all keys of their sample (no fully masked row, hence no NaN;
        # transformers does the same); their output is discarded and their dout is zero.
        ks = torch.zeros(B * Lmax, dtype=torch.int64, device=device)
        ke = lengths.repeat_interleave(Lmax).to(device)
        ks[flat], ke[flat] = x.kv_start.to(torch.int64), x.kv_end.to(torch.int64)
        j = torch.arange(Lmax, device=device)
        mask = ((j >= ks.view(B, Lmax, 1)) & (j < ke.view(B, Lmax, 1)))[:, None]  # [B, 1, Lmax, Lmax]

        q, k, v = (_leaf(pad(t)) for t in (x.q, x.k, x.v))
        group = Hq // x.k.shape[1]
        scale = D**-0.5

        def run():
            qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, Lmax, D] views
            return F.scaled_dot_product_attention(qh, repeat_kv(kh, group), repeat_kv(vh, group), attn_mask=mask,
                                                  scale=scale)

        def to_packed(out):  # [B, Hq, Lmax, D] -> [T, Hq, D]
            return out.transpose(1, 2).reshape(B * Lmax, Hq, D)[flat]

        def grads_packed():
            return tuple(t.grad.reshape((B * Lmax,) + tuple(t.shape[2:]))[flat] for t in (q, k, v))

        return Prepared((q, k, v), run, pad(dout).transpose(1, 2), to_packed, grads_packed)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Every workload has its own T: allow the recompiles (one per shape and direction).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def flex_mask_mod(cu_seqlens: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor):
    """The partition as a FlexAttention mask_mod over the packed batch: per-token tensors only (built
    without a host sync: the training-step peer builds one every batch)."""
    cu = cu_seqlens.to(torch.int64)
    seq_id = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1],
                                     output_size=kv_start.shape[0])
    seq_start = cu[:-1][seq_id]
    kv_start, kv_end = kv_start.to(torch.int64), kv_end.to(torch.int64)

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - seq_start[q_idx]  # key position inside the query's sequence
        return (seq_id[q_idx] == seq_id[kv_idx]) & (rel >= kv_start[q_idx]) & (rel < kv_end[q_idx])

    return mask_mod


def build_block_mask(x: AttentionInputs, compiled: bool = True):
    from torch.nn.attention.flex_attention import create_block_mask

    T = x.q.shape[0]
    return create_block_mask(flex_mask_mod(x.cu_seqlens, x.kv_start, x.kv_end), None, None, T, T, device=x.q.device,
                             _compile=compiled)


class FlexPeer(Peer):
    name = "flex"

    def __init__(self, compiled: bool = True):
        self.compiled = compiled

    def unavailable(self, device):
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "torch.nn.attention.flex_attention is missing (torch < 2.5)"
        return None

    def prepare(self, x, spans, dout):
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = build_block_mask(x, self.compiled)  # timed on its own: test_flex_block_mask_build
        fn = compiled_flex_attention() if self.compiled else flex_attention
        scale = x.q.shape[-1] ** -0.5

        def attend(q, k, v):  # [T, H, D] -> [1, H, T, D] views, as a model's transpose(1, 2) gives
            return fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                      block_mask=block_mask, scale=scale, enable_gqa=True)

        p = _packed_prepared(x, dout.transpose(0, 1)[None], attend)
        p.to_packed = lambda out: out[0].transpose(0, 1)
        return p


# A varlen kernel factory: (query lengths, key lengths, bottom-right causal, device, scale)
#   -> callable(q [Tq, Hq, D], k [Tk, Hkv, D], v) -> out [Tq, Hq, D], built outside the timed region.
VarlenFactory = Callable[[torch.Tensor, torch.Tensor, bool, torch.device, float], Callable]


def torch_flash_varlen(lens_q, lens_k, causal, device, scale):
    """FlashAttention-2 of PyTorch's build; its causal mask is bottom-right aligned (FA2 >= 2.1),
    which the correctness check verifies. GQA is native (Hq a multiple of Hkv)."""
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    max_q, max_k = int(lens_q.max()), int(lens_k.max())

    def call(q, k, v):
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                       scale=scale)[0]

    return call


def flash_attn_varlen(lens_q, lens_k, causal, device, scale):
    from flash_attn import flash_attn_varlen_func

    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    max_q, max_k = int(lens_q.max()), int(lens_k.max())

    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal)

    return call


def xformers_varlen(lens_q, lens_k, causal, device, scale):
    from xformers.ops import fmha

    cls = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else fmha.attn_bias.BlockDiagonalMask
    kwargs = dict(q_seqlen=lens_q.tolist(), kv_seqlen=lens_k.tolist())
    try:
        bias = cls.from_seqlens(**kwargs, device=device)
    except TypeError:  # older xformers: no device argument
        bias = cls.from_seqlens(**kwargs)

    def call(q, k, v):
        group = q.shape[1] // k.shape[1]  # expand GQA heads (the packed [1, T, H, D] form wants equal heads)
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]

    return call


def emulated_varlen(lens_q, lens_k, causal, device, scale):
    """A plain-PyTorch stand-in of a varlen kernel (bottom-right causal), to test FourCallPeer's
    gathers on a CPU; never timed."""
    cq, ck = _cu(lens_q, "cpu").tolist(), _cu(lens_k, "cpu").tolist()

    def call(q, k, v):
        group = q.shape[1] // k.shape[1]
        outs = []
        for b in range(len(cq) - 1):
            qb = q[cq[b]:cq[b + 1]].transpose(0, 1)
            kb = k[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(group, 0)
            vb = v[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(group, 0)
            Lq_, Lk_ = qb.shape[1], kb.shape[1]
            mask = None
            if causal:
                i, j = torch.arange(Lq_, device=q.device)[:, None], torch.arange(Lk_, device=q.device)
                mask = j <= i + (Lk_ - Lq_)
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale).transpose(0, 1))
        return torch.cat(outs)

    return call


class FourCallPeer(Peer):
    """The partition as four varlen calls (Q, D, P, G rows), gathers and un-permute timed."""

    def __init__(self, name: str, factory: VarlenFactory, unavailable: Callable[[torch.device], str | None]):
        self.name, self.factory, self._unavailable = name, factory, unavailable

    def unavailable(self, device):
        return self._unavailable(torch.device(device))

    def prepare(self, x, spans, dout):
        device = x.q.device
        s = spans.to(torch.int64).cpu()
        if (s <= 0).any():
            # Zero-length sequences inside a varlen call are untested here; the section 9 workloads have none.
            raise ValueError(f"{self.name}: every span must be non-empty, got spans {s.tolist()}")
        Lq, Ld, Lp, Lg = s.unbind(1)
        A = Lq + Ld + Lp
        starts = x.cu_seqlens.to(torch.int64).cpu()[:-1]
        zero = torch.zeros_like(Lq)
        rows_q, rows_d = _rows(starts, zero, Lq), _rows(starts, Lq, Ld)
        rows_p, rows_g, rows_a = _rows(starts, Lq + Ld, Lp), _rows(starts, A, Lg), _rows(starts, zero, A)
        scale = x.q.shape[-1] ** -0.5
        calls = [  # (query rows, key rows or None for all, kernel)
            (rows_q, rows_q, self.factory(Lq, Lq, False, device, scale)),
            (rows_d, rows_d, self.factory(Ld, Ld, False, device, scale)),
            (rows_p, rows_a, self.factory(Lp, A, False, device, scale)),
            (rows_g, None, self.factory(Lg, Lq + Ld + Lp + Lg, True, device, scale)),
        ]
        perm = torch.cat([rows_q, rows_d, rows_p, rows_g])
        assert torch.equal(perm.sort().values, torch.arange(x.q.shape[0])), "span rows must cover T exactly once"
        inverse = torch.argsort(perm).to(device)
        calls = [(qi.to(device), None if ki is None else ki.to(device), fn) for qi, ki, fn in calls]

        def attend(q, k, v):
            outs = []
            for qi, ki, fn in calls:
                kk, vv = (k, v) if ki is None else (k.index_select(0, ki), v.index_select(0, ki))
                outs.append(fn(q.index_select(0, qi), kk, vv))
            return torch.cat(outs).index_select(0, inverse)

        return _packed_prepared(x, dout, attend)


def _cuda_only(extra: Callable[[], str | None] = lambda: None):
    def unavailable(device):
        if device.type != "cuda":
            return "needs a CUDA device"
        return extra()

    return unavailable


def _torch_flash_unavailable():
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "this torch has no aten._flash_attention_forward"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch was built without FlashAttention"
    if torch.cuda.get_device_capability() < (8, 0):
        return "FlashAttention-2 needs sm80 or newer"
    return None


def _module_missing(name):
    return lambda: None if importlib.util.find_spec(name) is not None else f"{name} is not installed"


PEERS: dict[str, Peer] = {
    "ugd": UgdPeer(),
    "sdpa": SdpaDenseMaskPeer(),
    "flex": FlexPeer(),
    "fa2_torch": FourCallPeer("fa2_torch", torch_flash_varlen, _cuda_only(_torch_flash_unavailable)),
    "flash_attn": FourCallPeer("flash_attn", flash_attn_varlen, _cuda_only(_module_missing("flash_attn"))),
    "xformers": FourCallPeer("xformers", xformers_varlen, _cuda_only(_module_missing("xformers"))),
}


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------


def check_layouts() -> list[torch.Tensor]:
    """Span lengths [B, 4] the check runs on: tiny spans (an off-by-one moves outputs a lot) and
    longer ones (several 128-row tiles, uneven lengths)."""
    tiny = torch.tensor([[1, 1, 1, 1], [3, 5, 2, 4], [7, 2, 8, 9], [2, 9, 1, 3]], dtype=torch.int32)
    longer = make_spans(Workload("check", 3, 31, 300, 146), seed=7)
    return [tiny, longer]


def _mismatch(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    """None when |got - want| <= tol * (max|want| + |want|) everywhere (NaN fails)."""
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got = got.to(want.dtype)
    err = (got - want).abs()
    bound = tol * (want.abs().max() + want.abs())
    if bool((err <= bound).all()):
        return None
    bad = ~(err <= bound)
    worst = float(err.nan_to_num(float("inf")).max())
    return (f"{what}: {int(bad.sum())} of {bad.numel()} elements off (max |err| {worst:.3g}, "
            f"max |ref| {float(want.abs().max()):.3g}, tol {tol})")


def check_peer(peer: Peer, heads: tuple[int, int, int], dtype: torch.dtype, device, *, tol_out: float | None = None,
               tol_grad: float | None = None, layouts: list[torch.Tensor] | None = None, backward: bool = True) -> None:
    """Raises AssertionError unless ``peer`` matches ugd_ops.reference (fp32) in output and in dq, dk, dv
    (output only with ``backward=False``: FlexAttention has no CPU backward)."""
    low = dtype in (torch.bfloat16, torch.float16)
    tol_out = tol_out if tol_out is not None else (2e-2 if low else 1e-4)
    tol_grad = tol_grad if tol_grad is not None else (3e-2 if low else 1e-4)
    problems = []
    for n, spans in enumerate(layouts if layouts is not None else check_layouts()):
        x = make_attention_inputs(spans, MASK, heads=heads, dtype=dtype, device=device, seed=100 + n)
        dout = torch.randn(x.q.shape, generator=torch.Generator().manual_seed(200 + n)).to(device=device, dtype=dtype)
        qf, kf, vf = (t.detach().float().requires_grad_(backward) for t in (x.q, x.k, x.v))
        want = reference.partitioned_attention(qf, kf, vf, x.cu_seqlens, x.kv_start, x.kv_end)
        p = peer.prepare(x, spans, dout)
        tag = f"{peer.name} layout {n} ({dtype}, heads {heads})"
        if not backward:
            for t in p.leaves:
                t.requires_grad_(False)
            with torch.no_grad():
                problems.append(_mismatch(f"{tag} out", p.to_packed(p.run()), want, tol_out))
            continue
        want.backward(dout.float())
        out = p.run()
        out.backward(p.dout)
        got_out, got_grads = p.to_packed(out.detach()), p.grads_packed()
        problems.append(_mismatch(f"{tag} out", got_out, want.detach(), tol_out))
        for name, g, ref in zip(("dq", "dk", "dv"), got_grads, (qf.grad, kf.grad, vf.grad)):
            problems.append(f"{tag} {name}: no gradient" if g is None else _mismatch(f"{tag} {name}", g, ref, tol_grad))
    problems = [m for m in problems if m]
    if problems:
        raise AssertionError("peer disagrees with ugd_ops.reference:\n  " + "\n  ".join(problems))
