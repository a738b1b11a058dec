"""CPU training speed settings: --bf16 on a CPU without bf16 units prints one line that says it will be
slow and names the missing flags (the CPU probe, ugd.training.cpu_bf16.cpu_flags, is monkeypatched);
fused AdamW is the default optimizer."""

from __future__ import annotations

import pytest

from tests.test_train import run_args
from ugd.train import main
from ugd.training import cpu_bf16


def test_notice_names_the_missing_flags():
    line = cpu_bf16.bf16_slow_notice(frozenset({"avx2", "avx512f", "fma"}))
    assert "\n" not in line and "slow" in line
    assert "amx_bf16" in line and "avx512_bf16" in line


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, {"amx_bf16", "amx_tile"}])
def test_no_notice_with_bf16_units(flags):
    assert cpu_bf16.bf16_slow_notice(frozenset(flags)) is None


def test_no_notice_when_unknown():
    assert cpu_bf16.bf16_slow_notice(None) is None


def test_cpu_flags_reads_this_cpu():
    flags = cpu_bf16.cpu_flags()
    assert flags is None or isinstance(flags, frozenset)


@pytest.mark.parametrize("bf16", [True, False])
def test_train_prints_it_once_with_bf16_only(tmp_path, capsys, monkeypatch, one_thread, bf16):
    monkeypatch.setattr(cpu_bf16, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    main(run_args(tmp_path, "run", "--max_steps", "1", "--bf16", str(bf16).lower()))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "--bf16 on this CPU will be slow" in x]
    assert len(lines) == (1 if bf16 else 0), err[-2000:]


def test_fused_adamw_is_the_default_and_can_be_overridden(tmp_path):
    """One fused AdamW kernel per step whatever transformers' own default (it switched with torch 2.8)."""
    from ugd.training.args import parse_args

    assert str(parse_args(["--output_dir", str(tmp_path / "a")]).training.optim.value) == "adamw_torch_fused"
    run = parse_args(["--output_dir", str(tmp_path / "b"), "--optim", "adamw_torch"])
    assert str(run.training.optim.value) == "adamw_torch"
