"""Issue 35 in ``python -m ugd.train``: the run-folder lock (a second trainer into one --output_dir is
refused in one line; the lock dies with its process, kill -9 included), seeds checked up front, a failed
final evaluation is a non-zero exit with the model saved, and errors printed by rank 0 only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tests.test_train import TINY

import ugd.train as train_module
from ugd.train import cli
from ugd.training.run_lock import LOCK_NAME, run_lock, run_lock_holder

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp_path, capsys, *extra, out="out"):
    code = cli([*TINY, "--max_steps", "1", "--output_dir", str(tmp_path / out), *extra])
    return code, capsys.readouterr().err


def test_a_second_trainer_into_a_locked_folder_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    with run_lock(out):  # another trainer (another open file description: flock conflicts in one process too)
        assert run_lock_holder(out) is not None
        code, err = _train(tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"ugd.train: error: --output_dir {out} is locked by another ugd.train process")
    assert run_lock_holder(out) is None  # released with its block


def test_the_lock_dies_with_its_process_even_under_kill_9(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom ugd.training.run_lock import run_lock\n"
        f"with run_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert "is locked by another ugd.train process" in run_lock_holder(out)
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert run_lock_holder(out) is None  # the kernel dropped it: a rerun (or --resume_from_checkpoint) proceeds
    with run_lock(out):
        pass


def test_a_refused_run_leaves_no_folder_and_a_resume_takes_the_lock_again(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, "--train_file", str(tmp_path / "missing.jsonl"))
    assert code == 2 and not (tmp_path / "out").exists()
    code, err = _train(tmp_path, capsys, "--save_strategy", "steps", "--save_steps", "1")
    assert code == 0, err
    assert (tmp_path / "out" / LOCK_NAME).is_file() and run_lock_holder(tmp_path / "out") is None
    code, err = _train(tmp_path, capsys, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
                       "--resume_from_checkpoint", "true")
    assert code == 0, err
    assert json.load(open(tmp_path / "out" / "ugd_run_summary.json"))["global_step"] == 2


@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--seed", str(2 ** 32)), ("--data_seed", "-5")])
def test_negative_or_huge_seeds_are_refused_up_front(tmp_path, capsys, flag, value):
    code, err = _train(tmp_path, capsys, flag, value)
    assert code == 2 and err == f"ugd.train: error: {flag} {value}: seeds are integers in [0, 2**32)\n"
    assert not (tmp_path / "out").exists()


def test_errors_are_printed_by_rank_zero_only(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank meets the same refusal: one line, not one per rank."""
    monkeypatch.setenv("RANK", "1")
    code, err = _train(tmp_path, capsys, "--seed", "-1")
    assert code == 2 and err == ""
    monkeypatch.setenv("RANK", "0")
    code, err = _train(tmp_path, capsys, "--seed", "-1")
    assert code == 2 and err.count("ugd.train: error:") == 1


def test_a_failed_final_evaluation_exits_1_with_the_model_saved(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("query of pair 0 is empty")

    monkeypatch.setattr(train_module, "evaluate_model", broken)
    code, err = _train(tmp_path, capsys)  # TINY: the demo's dev split is the eval set
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("ugd.train: error:")]
    assert len(line) == 1 and "the final evaluation failed: query of pair 0 is empty" in line[0]
    assert f"the trained model is saved in {tmp_path / 'out'}" in line[0] and "Traceback" not in err
    summary = json.load(open(tmp_path / "out" / "ugd_run_summary.json"))
    assert summary["evaluation"] == {"error": "query of pair 0 is empty"}
    assert (tmp_path / "out" / "model.safetensors").is_file()
