"""SIGTERM during training: save a checkpoint at the next step boundary, then exit 143 with one line.

A scheduler (Slurm, Kubernetes, torchrun's agent) sends SIGTERM some seconds before SIGKILL. Python's
default would end the run at once and lose every step since the last ``--save_steps`` checkpoint.
``StopOnSignal`` (a ``TrainerCallback``, registered by ``python -m ugd.train``) only records the signal
in the handler; at the end of the current optimizer step it asks Trainer to log, save a checkpoint
(atomically, ``ugd.training.trainer``) and stop. When Trainer has finished (its other callbacks included:
TensorBoard closed, curves drawn), it prints

    ugd.train: stopped by SIGTERM after step 7; checkpoint saved: out/run/checkpoint-7 (resume with --resume_from_checkpoint true)

to stderr and raises ``TrainingInterrupted``, a ``SystemExit`` with status 143 (128 + SIGTERM, what a
process killed by SIGTERM reports, so a job chain does not take the partial run for a finished one and
a scheduler can requeue it). The final save, evaluation and reasons of a finished run are skipped.
Resuming from that checkpoint continues exactly as a run never stopped (tests/training/test_signals_and_resume.py).

Under DDP every process gets the signal (torchrun forwards it), maybe in different steps: the flag is
all-reduced at each step end so all processes save the same step and stop together. A second SIGTERM
while the checkpoint is being written ends the process at once (checkpoints are atomic: the last
complete one stays). Outside ``trainer.train()`` the previous handler is back in place.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

EXIT_STATUS = 128 + signal.SIGTERM  # 143


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal after saving a checkpoint; ``code`` is 143, ``checkpoint`` its folder."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(EXIT_STATUS)
        self.message = message
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return self.message


class StopOnSignal(TrainerCallback):
    """Turns ``signals`` (default SIGTERM) into "save a checkpoint and stop" at the next step boundary."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict = {}
        self._stopping = False

    # ------------------------------------------------------------------ the handler

    def _handle(self, signum, frame):
        if self.received is not None:  # asked twice: stop now, with the previous behaviour
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; keep the default there
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self._stopping = None, False
        self._install()

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_requested(args):
            self._stopping = True
            control.should_log = True  # the losses of the steps since the last log are not lost
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        if not self._stopping:
            return
        name = signal.Signals(self.received).name if self.received else "a signal"
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):  # e.g. save_only_model or another callback vetoed the save
            checkpoint = None
        where = (f"checkpoint saved: {checkpoint} (resume with --resume_from_checkpoint true)" if checkpoint
                 else "no checkpoint could be saved; the last complete checkpoint-N in "
                      f"{args.output_dir} is kept")
        message = f"ugd.train: stopped by {name} after step {state.global_step}; {where}"
        if state.is_world_process_zero:
            print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(message, checkpoint)

    def _stop_requested(self, args) -> bool:
        flag = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([int(flag)], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.received is None:
                self.received = signal.SIGTERM  # another process got it
        return flag


__all__ = ["EXIT_STATUS", "StopOnSignal", "TrainingInterrupted"]
