"""CPU self-check of the benchmark peers' layout code (not benchmarks: ``--benchmark-only`` skips them).

The GPU benchmarks cannot run without a GPU, but most of what could be wrong in a peer is layout
code: padding and masks (SDPA), the mask_mod (FlexAttention, forward only: it has no CPU backward),
and the four-call split with its gathers and un-permute (run here with a plain-PyTorch stand-in of
the varlen kernel). These tests run that code on a CPU against ugd_ops.reference, and show that
``check_peer`` rejects a peer with a wrong mask.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attention_peers as ap
from ugd_ops.workloads import Workload, make_spans

HEADS = [(4, 2, 16), (4, 4, 16)]


def _layouts():
    # Small enough for a 2-core machine; the second layout still crosses 128-row tiles.
    tiny = ap.check_layouts()[0]
    return [tiny, make_spans(Workload("selfcheck", 2, 12, 130, 40), seed=3)]


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "Hq{}-Hkv{}-D{}".format(*h))
@pytest.mark.parametrize("peer", ["ugd", "sdpa", "flex", "four_call_emulated"])
def test_peer_matches_reference_on_cpu(peer, heads):
    backward = True
    if peer == "flex":
        p, backward = ap.FlexPeer(compiled=False), False
    elif peer == "four_call_emulated":
        p = ap.FourCallPeer("four_call_emulated", ap.emulated_varlen, lambda device: None)
    else:
        p = ap.PEERS[peer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's "called without torch.compile" notice
        ap.check_peer(p, heads, torch.float32, "cpu", layouts=_layouts(), backward=backward)


def test_check_rejects_top_left_causal():
    """A four-call peer whose G call aligns causal top-left (a classic varlen mistake) must fail the check."""

    def top_left(lens_q, lens_k, causal, device, scale):
        right = ap.emulated_varlen(lens_q, lens_k, causal, device, scale)
        if not causal:
            return right
        # Top-left causal: query r reads keys [0, r] instead of [0, r + Lk - Lq].
        return ap.emulated_varlen(lens_q, lens_q, True, device, scale)

    wrong = ap.FourCallPeer("top_left", top_left, lambda device: None)
    with pytest.raises(AssertionError, match="disagrees"):
        ap.check_peer(wrong, (4, 2, 16), torch.float32, "cpu", layouts=_layouts())


def test_check_rejects_off_by_one_interval():
    """A peer whose D rows miss their last key (their [CLS]) must fail the check."""

    class OffByOne(ap.UgdPeer):
        name = "off_by_one"

        def prepare(self, x, spans, dout):
            ke = x.kv_end.clone()
            s = spans.to(torch.int64)
            rows_d = ap._rows(x.cu_seqlens.to(torch.int64)[:-1], s[:, 0], s[:, 1])
            ke[rows_d] -= 1
            ke = torch.maximum(ke, x.kv_start + 1)
            return super().prepare(ap.AttentionInputs(x.q, x.k, x.v, x.cu_seqlens, x.kv_start, ke, x.max_seqlen),
                                   spans, dout)

    with pytest.raises(AssertionError, match="disagrees"):
        ap.check_peer(OffByOne(), (4, 2, 16), torch.float32, "cpu", layouts=_layouts())
