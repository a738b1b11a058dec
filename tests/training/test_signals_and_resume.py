"""What a scheduler and a hurried user do to a training run (ugd.training.signals, ugd.training.resume_check).

* kill -9 of a ``d2llm`` run (own teacher, and a separate frozen teacher checkpoint) and of an ``ullme``
  run (extra batch fields, GRL candidates drawn at random), then ``--resume_from_checkpoint true``:
  the logged losses after resuming and the final weights equal an uninterrupted run's, bit for bit;
* SIGTERM mid-step: a checkpoint of that step is saved, the process exits 143 with one line saying
  where to resume from, and the resumed run equals the uninterrupted one (``ugd.training.signals``);
* ``--resume_from_checkpoint`` at another paradigm's or another backbone's checkpoint, or ``true``
  without any checkpoint: one line naming the mismatch, exit 2, before any step (``ugd.training.resume_check``).

The interrupted runs are real processes (``subprocess``) killed by real signals, as in
``tests/test_train.py``'s SIGKILL test, whose approach this reuses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.cli_runs import one_error_line, run_cli, sigkill_once_written
from tests.tiny_checkpoints import TINY_BACKBONE

from ugd.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--backbone_config", json.dumps(TINY_BACKBONE), "--cpu_threads", "1",
    "--demo_train_size", "64", "--demo_eval_size", "32", "--per_device_train_batch_size", "8",
    "--max_query_len", "16", "--max_document_len", "40", "--max_reason_len", "16", "--kl_dim", "16",
    "--disable_tqdm", "true", "--report_to", "none", "--num_reasons", "0", "--eval_strategy", "no",
    "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1",
    "--max_steps", "10", "--save_strategy", "steps", "--save_steps", "5", "--lr_scheduler_type", "linear",
]

# keeps the run alive after checkpoint-5 until the test kills it (max_steps stays 10: same LR schedule)
HANG_AFTER_SAVE = textwrap.dedent("""
    import sys, time
    from transformers import TrainerCallback
    from ugd.train import main

    class HangAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 5:
                time.sleep(600)

    main(sys.argv[1:], callbacks=[HangAfterSave()])
""")

# SIGTERM arrives in the middle of step 7 (before its forward pass), as a scheduler's would
TERM_IN_STEP_7 = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from ugd.train import main

    class TermInStep7(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    main(sys.argv[1:], callbacks=[TermInStep7()])
""")


def args(out, *extra) -> list[str]:
    return [*TINY, "--output_dir", str(out), *map(str, extra)]


def logged(checkpoint) -> dict:
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return {e["step"]: e for e in json.load(f)["log_history"] if "loss" in e}


def weights(path) -> dict:
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "model.safetensors"))
    state.update({f"heads.{k}": v for k, v in load_file(os.path.join(path, "ugd_heads.safetensors")).items()})
    return state


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def assert_same_run(reference, resumed, first_step: int) -> None:
    """Every logged loss from ``first_step`` on, and every final weight, identical (no tolerance)."""
    ref, got = logged(reference / "checkpoint-10"), logged(resumed / "checkpoint-10")
    for step in range(first_step, 11):
        keys = sorted(k for k in ref[step] if k == "loss" or k.startswith("loss_"))
        assert keys and keys == sorted(k for k in got[step] if k == "loss" or k.startswith("loss_")), step
        for key in keys:
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])
    a, b = weights(reference), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A frozen ugd-ttm teacher sharing the demo run's tokenizer (built from the same demo records)."""
    from tests.tiny_checkpoints import save_tiny_checkpoint

    from ugd.data.demo import demo_splits

    train, dev = demo_splits(64, 32, seed=0)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "ugd-ttm", train + dev, "ugd-ttm", seed=3)


# ---------------------------------------------------------------------------------------------
# kill -9, then resume: bit-exact for the paradigms with their own state
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["d2llm", "d2llm-teacher", "ullme"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, paradigm, teacher):
    extra = ["--paradigm", paradigm.split("-")[0]]
    if paradigm == "d2llm-teacher":
        extra += ["--paradigm_options", json.dumps({"teacher": teacher})]
    main(args(tmp_path / "reference", *extra))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", HANG_AFTER_SAVE, *args(killed, *extra)], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_once_written(proc, killed / "checkpoint-5" / "trainer_state.json")
    assert not (killed / "checkpoint-10").exists()

    main(args(killed, *extra, "--resume_from_checkpoint", "true"))
    assert_same_run(tmp_path / "reference", killed, first_step=6)


# ---------------------------------------------------------------------------------------------
# SIGTERM: checkpoint at the step boundary, exit 143 with one line, resume continues exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_resume_is_bit_exact(tmp_path):
    main(args(tmp_path / "reference"))
    stopped = tmp_path / "stopped"
    done = subprocess.run([sys.executable, "-c", TERM_IN_STEP_7, *args(stopped)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ugd.train:")]
    assert lines == [f"ugd.train: stopped by SIGTERM after step 7; checkpoint saved: {stopped / 'checkpoint-7'} "
                     "(resume with --resume_from_checkpoint true)"], done.stderr[-3000:]
    assert (stopped / "checkpoint-7" / "trainer_state.json").is_file()
    assert (stopped / "checkpoint-5" / "trainer_state.json").is_file()  # nothing saved before is lost
    assert not (stopped / "ugd_config.json").exists()  # no "final" model from a run that did not finish
    assert logged(stopped / "checkpoint-7").keys() == set(range(1, 8))  # step 6's and 7's losses are logged

    main(args(stopped, "--resume_from_checkpoint", "true"))
    assert_same_run(tmp_path / "reference", stopped, first_step=8)


def test_sigterm_in_process_raises_systemexit_143_and_restores_the_handler(tmp_path):
    from transformers import TrainerCallback

    from ugd.training.signals import EXIT_STATUS, TrainingInterrupted

    class TermInStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as caught:
        main(args(tmp_path / "run", "--save_strategy", "no"), callbacks=[TermInStep2()])
    assert caught.value.code == EXIT_STATUS == 143 and isinstance(caught.value, SystemExit)
    assert caught.value.checkpoint == str(tmp_path / "run" / "checkpoint-2")  # saved although save_strategy no
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_finished_run_leaves_the_sigterm_handler_as_it_was(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    main(args(tmp_path / "run", "--max_steps", "1", "--save_strategy", "no"))
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# resuming from a checkpoint that does not fit: one line, exit 2, before any step
# ---------------------------------------------------------------------------------------------


def train_cli(*argv):
    """``ugd.train.cli`` in-process: (exit status, stderr)."""
    from ugd.train import cli

    code, _, err = run_cli(cli, argv)
    return code, err


def one_line(err: str, *needles: str) -> str:
    return one_error_line(err, "ugd.train: error: ", *needles)


@pytest.fixture(scope="module")
def ttm_run(tmp_path_factory):
    """A ugd-ttm run with checkpoint-2 (the one the mismatched runs try to resume)."""
    out = tmp_path_factory.mktemp("ttm") / "run"
    main(args(out, "--max_steps", "2", "--save_steps", "2"))
    return out


def _steps_taken(out) -> list[str]:
    return sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))


@pytest.mark.parametrize("extra,needles", [
    (["--paradigm", "d2llm"], ["paradigm 'ugd-ttm'", "paradigm 'd2llm'"]),
    (["--paradigm", "ullme"], ["paradigm 'ugd-ttm'", "paradigm 'ullme'"]),
    (["--backbone_config", json.dumps(dict(TINY_BACKBONE, hidden_size=64))],
     ["another backbone", "hidden_size 32 there, 64"]),
    (["--backbone_config", json.dumps(dict(TINY_BACKBONE, num_hidden_layers=2))],
     ["another backbone", "num_hidden_layers 1 there, 2"]),
    (["--kl_dim", "8"], ["kl_dim 16", "kl_dim 8"]),
])
def test_resume_from_a_checkpoint_of_another_model_is_one_line(ttm_run, extra, needles):
    code, err = train_cli(*args(ttm_run, "--max_steps", "4", "--save_steps", "1", *extra,
                                "--resume_from_checkpoint", "true"))
    assert code == 2
    one_line(err, str(ttm_run / "checkpoint-2"), *needles)
    assert _steps_taken(ttm_run) == ["checkpoint-2"]  # not a step was trained (save_steps 1 would show it)


def test_resume_with_other_head_shapes_names_the_tensor(tmp_path):
    out = tmp_path / "run"
    main(args(out, "--paradigm", "d2llm", "--max_steps", "1", "--save_steps", "1"))
    code, err = train_cli(*args(out, "--paradigm", "d2llm", "--paradigm_options", '{"iem_hidden": 8}',
                                "--max_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-1")))
    assert code == 2
    one_line(err, "head weight iem.", "ugd_heads.safetensors", "in this run's model")


def test_resume_true_without_a_checkpoint_is_one_line(tmp_path):
    code, err = train_cli(*args(tmp_path / "empty", "--resume_from_checkpoint", "true"))
    assert code == 2
    one_line(err, "no complete checkpoint-N in", str(tmp_path / "empty"))
    code, err = train_cli(*args(tmp_path / "empty", "--resume_from_checkpoint", tmp_path / "nope"))
    assert code == 2
    one_line(err, str(tmp_path / "nope"), "no such checkpoint folder")


def test_mismatch_accepts_its_own_checkpoint(ttm_run):
    from ugd.model import UGDModel
    from ugd.training.resume_check import mismatch

    model = UGDModel.from_pretrained(str(ttm_run / "checkpoint-2"))
    assert mismatch(model, str(ttm_run / "checkpoint-2")) is None
