"""row_intervals and dense_mask: the layout of docs/spec.md section 3, on every backend."""

import pytest
import torch
from tests.conftest import DEVICES
from tests.oracles import intervals_from_table, mask_from_intervals

import ugd_ops
from ugd_ops import reference
from ugd_ops.workloads import WORKLOADS, make_spans, random_spans

MASKS = ["ttm", "stm", "causal", "bidirectional"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("seed", range(4))
def test_row_intervals_match_spec_table(mask_kind, seed, device):
    spans = random_spans(7, seed=seed, max_len=23)  # includes Lp = 0 and Lg = 0
    spans[0, 2:] = 0  # a sample with neither prompt nor reason
    cu, ks, ke = intervals_from_table(spans, mask_kind)
    for impl in (ugd_ops.row_intervals, reference.row_intervals):
        got = impl(spans.to(device), mask_kind)
        assert all(t.dtype == torch.int32 and t.device.type == device for t in got)
        assert got[0].tolist() == cu
        assert got[1].tolist() == ks
        assert got[2].tolist() == ke


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_row_intervals_on_workloads(name):
    spans = make_spans(name)
    assert spans.shape == (WORKLOADS[name].batch, 4)
    for mask_kind in ("ttm", "stm"):
        a = ugd_ops.row_intervals(spans, mask_kind)
        b = reference.row_intervals(spans, mask_kind)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_row_intervals_take_lists():
    cu, ks, ke = ugd_ops.row_intervals([[2, 2, 1, 1]], "ttm")
    assert cu.tolist() == [0, 6]
    assert ks.tolist() == [0, 0, 2, 2, 0, 0]
    assert ke.tolist() == [2, 2, 4, 4, 5, 6]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_dense_mask(mask_kind, device):
    spans = random_spans(4, seed=3, max_len=9)
    cu, ks, ke = intervals_from_table(spans, mask_kind)
    expect = mask_from_intervals(cu, ks, ke)
    args = [torch.tensor(x, dtype=torch.int32, device=device) for x in (cu, ks, ke)]
    for impl in (ugd_ops.dense_mask, reference.dense_mask):
        got = impl(*args)
        assert got.dtype == torch.bool and got.shape == expect.shape
        assert torch.equal(got.cpu(), expect)


def test_dense_mask_empty_rows_and_sequences():
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)  # the middle sequence is empty
    ks = torch.tensor([0, 1, 2, 0, 1], dtype=torch.int32)
    ke = torch.tensor([0, 3, 2, 2, 1], dtype=torch.int32)
    expect = mask_from_intervals(cu.tolist(), ks.tolist(), ke.tolist())
    assert torch.equal(ugd_ops.dense_mask(cu, ks, ke), expect)
    assert torch.equal(reference.dense_mask(cu, ks, ke), expect)
    assert expect.sum(1).tolist() == [0, 2, 0, 2, 0]


BAD_SPANS = [
    (torch.tensor([[1, 1, 0, -1]], dtype=torch.int32), "ttm", "span lengths must be >= 0"),
    (torch.tensor([[0, 3, 1, 1]], dtype=torch.int32), "ttm", "needs Lq >= 1 and Ld >= 1"),
    (torch.tensor([[2, 0, 1, 1]], dtype=torch.int32), "stm", "needs Lq >= 1 and Ld >= 1"),
    (torch.tensor([[2, 2, 1, 1]], dtype=torch.int64), "ttm", "spans must be int32"),
    (torch.tensor([[2, 2, 1]], dtype=torch.int32), "ttm", r"spans must be \[B, 4\]"),
    (torch.tensor([[2, 2, 1, 1]], dtype=torch.int32), "two-tower", "unknown mask 'two-tower'"),
]


@pytest.mark.parametrize("spans,mask_kind,message", BAD_SPANS)
def test_row_intervals_errors(spans, mask_kind, message):
    for impl in (ugd_ops.row_intervals, reference.row_intervals):
        with pytest.raises(ValueError, match=message):
            impl(spans, mask_kind)


def test_causal_and_bidirectional_take_any_spans():
    spans = torch.tensor([[0, 0, 0, 3], [1, 0, 0, 0]], dtype=torch.int32)
    cu, ks, ke = ugd_ops.row_intervals(spans, "causal")
    assert ke.tolist() == [1, 2, 3, 1]
    cu, ks, ke = ugd_ops.row_intervals(spans, "bidirectional")
    assert ke.tolist() == [3, 3, 3, 1]
