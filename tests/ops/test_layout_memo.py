"""ugd_ops.layout_memo: the once-per-layout memo and value check of the CUDA attention paths.

The check runs on any device; here on the CPU, where the device-side flags (``layout_broken``) must
agree with the detailed host check (``_checks.check_layout_values``) on valid and broken layouts.
"""

import pytest
import torch

import ugd_ops
from ugd_ops import _checks, layout_memo
from ugd_ops.workloads import random_spans


def _valid(seed, n=6, mask_kind="ttm"):
    spans = torch.as_tensor(random_spans(n, seed=seed, max_len=30), dtype=torch.int32)
    return ugd_ops.row_intervals(spans, mask_kind)


def _host_says_broken(cu, ks, ke, T) -> bool:
    try:
        _checks.check_layout_values(cu, ks, ke, T)
    except ValueError:
        return True
    return False


def _breakages(cu, ks, ke):
    """(name, cu, ks, ke, T) variants that each break one rule of docs/spec.md section 3."""
    T = int(cu[-1])
    i = T // 2
    out = []
    c = cu.clone(); c[0] = 1; out.append(("cu starts at 1", c, ks, ke, T))
    out.append(("cu ends before T", cu, ks, ke, T + 1))
    c = cu.clone(); c[1], c[2] = c[2] + 0, c[1] - 1  # not non-decreasing
    out.append(("cu decreasing", c, ks, ke, T))
    s = ks.clone(); s[i] = ke[i] + 1; out.append(("start > end", cu, s, ke, T))
    s = ks.clone(); s[i] = -1; out.append(("start < 0", cu, s, ke, T))
    e = ke.clone(); e[i] = T + 5; out.append(("end past the sequence", cu, ks, e, T))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mask_kind", ["ttm", "stm", "causal", "bidirectional"])
def test_device_flags_agree_with_the_host_check(seed, mask_kind):
    cu, ks, ke = _valid(seed, mask_kind=mask_kind)
    T = int(cu[-1])
    assert not bool(layout_memo.layout_broken(cu, ks, ke, T))
    assert not _host_says_broken(cu, ks, ke, T)
    for name, c, s, e, t in _breakages(cu, ks, ke):
        assert bool(layout_memo.layout_broken(c, s, e, t)) == _host_says_broken(c, s, e, t), name


def test_edge_layouts():
    empty = torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    assert not bool(layout_memo.layout_broken(*empty, 0))
    # empty sequences between others, and an empty interval
    cu = torch.tensor([0, 0, 3, 3, 4], dtype=torch.int32)
    ks = torch.tensor([0, 0, 2, 0], dtype=torch.int32)
    ke = torch.tensor([1, 3, 2, 1], dtype=torch.int32)
    assert not bool(layout_memo.layout_broken(cu, ks, ke, 4))
    ke2 = ke.clone(); ke2[3] = 2  # the last sequence has one token
    assert bool(layout_memo.layout_broken(cu, ks, ke2, 4))


def test_check_layout_raises_naming_the_argument_and_checks_once(monkeypatch):
    monkeypatch.delenv(layout_memo.CHECK_ENV, raising=False)
    cu, ks, ke = _valid(3)
    T = int(cu[-1])
    calls = []
    real = layout_memo.layout_broken
    monkeypatch.setattr(layout_memo, "layout_broken", lambda *a: calls.append(1) or real(*a))
    layout_memo._checked.clear()
    for _ in range(5):  # every layer of a forward, then the backward
        layout_memo.check_layout(cu, ks, ke, T)
    assert len(calls) == 1
    ke[0] += 0  # an in-place write bumps the version: checked again
    layout_memo.check_layout(cu, ks, ke, T)
    assert len(calls) == 2
    bad = ks.clone(); bad[T // 2] = -1
    with pytest.raises(ValueError, match="kv_start|interval"):
        layout_memo.check_layout(cu, bad, ke, T)
    with pytest.raises(ValueError, match="interval"):  # a broken layout is never remembered as checked
        layout_memo.check_layout(cu, bad, ke, T)


def test_check_can_be_switched_off(monkeypatch):
    cu, ks, ke = _valid(4)
    bad = ks.clone(); bad[0] = -1
    monkeypatch.setenv(layout_memo.CHECK_ENV, "0")
    layout_memo.check_layout(cu, bad, ke, int(cu[-1]))  # no error


def test_memo_most_recent_first_and_bounded():
    memo = layout_memo.LayoutMemo(size=2)
    layouts = [_valid(s) for s in range(3)]
    built = []
    for lay in layouts + layouts[-1:]:
        memo.get(lay, lambda lay=lay: built.append(lay) or len(built))
    assert len(built) == 3  # the repeated last layout was a hit
    memo.get(layouts[0], lambda: built.append("again"))  # evicted (size 2): built again
    assert built[-1] == "again"


def test_max_seqlen_below_the_longest_sequence_raises_without_another_read(monkeypatch):
    monkeypatch.delenv(layout_memo.CHECK_ENV, raising=False)
    cu, ks, ke = _valid(5)
    T, longest = int(cu[-1]), int((cu[1:] - cu[:-1]).max())
    layout_memo._checked.clear()
    layout_memo.check_layout(cu, ks, ke, T, longest)  # reads the values once
    layout_memo.check_layout(cu, ks, ke, T, None)
    monkeypatch.setattr(layout_memo, "layout_broken", lambda *a: pytest.fail("read the layout again"))
    with pytest.raises(ValueError, match="max_seqlen"):  # as the reference says it
        layout_memo.check_layout(cu, ks, ke, T, longest - 1)
    layout_memo.check_layout(cu, ks, ke, T, longest + 7)
