"""``python -m ugd.study``: the paper's comparisons (Table 2 paradigms, Table 3 ablations, the seed papers'
systems) as one resumable command: one model per (row, seed), trained by ``python -m ugd.train`` and
evaluated by ``python -m ugd.evaluate`` on one fixed data subset, tabulated with bootstrap intervals.

    python -m ugd.study --backbone smollm2-135m --train_file ../shared/data/esnli/train.jsonl \\
        --dev_file ../shared/data/esnli/dev.jsonl --test_file ../shared/data/esnli/test.jsonl \\
        --rows ugd-ttm shared-ttm ttm ugd-stm stm --seeds 0 --train_size 1000 --test_size 500 --epochs 1 \\
        --learning_rate 1e-4 --max_query_len 64 --max_document_len 64 --max_reason_len 48 \\
        --reason_samples 64 --out outputs/study-esnli  [-- more python -m ugd.train arguments]

Layout of ``--out``::

    study.json                    the settings (a rerun with other settings into this folder is refused)
    data/train-N.jsonl ...        the subsets every row and seed use (drawn once with --data_seed)
    runs/<row>/seed<k>/model/     the trained checkpoint (python -m ugd.train --output_dir)
    runs/<row>/seed<k>/report.json, preds.jsonl    python -m ugd.evaluate's report and per-record predictions
    runs/<row>/seed<k>/done.json  written last, atomically: a rerun skips this (row, seed)
    runs/<row>/seed<k>/failed.json  the failed stage and the tail of its stderr (retried on a rerun)
    results.json, table.md        the table (also printed): ACC/AUC per head, ROUGE-L, 95 % intervals

``python -m ugd.study --report_only --out DIR`` rebuilds results.json and table.md from what is on disk,
with the settings, rows and seeds of DIR/study.json (nothing else is needed; settings given as well must
match them). A folder without a study.json is refused.

Resuming: a (row, seed) with ``done.json`` is skipped; one whose training finished but whose evaluation
did not is only evaluated; an interrupted training restarts from its last Trainer checkpoint when
``--save_checkpoints`` wrote one, else from scratch. A failing (row, seed) is recorded and the study goes
on; the exit status is 1 when any failed, 2 for bad arguments (one line on stderr).

Child processes: each ``ugd.train`` / ``ugd.evaluate`` dies with the study (on Linux, even when the study
is killed with SIGKILL: the child gets SIGTERM, so a training saves its checkpoint and stops), and
``ugd.train`` locks its run folder while it trains, so a rerun never runs a second trainer into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from transformers.trainer_utils import get_last_checkpoint

from ._files import atomic_text_file
from ._output_paths import output_problems
from .training.child_process import die_with_parent
from .data.records import DataError, read_records, write_jsonl
from .training.metrics import accuracy, roc_auc
from .training.run_lock import run_lock_holder

PARADIGM_ROWS = ("ugd-ttm", "shared-ttm", "ttm", "ugd-stm", "stm")
RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
HEADS = ("two-tower", "single-tower")


class StudyError(ValueError):
    """Bad arguments, data or a settings change: one line for the user, exit status 2."""


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    paradigm: str
    args: tuple = ()  # python -m ugd.train arguments of this row
    options: dict = field(default_factory=dict)  # --paradigm_options ({data}: the study's data folder)
    teacher_row: str | None = None  # the row whose model of the same seed is this row's frozen teacher
    always_lora: bool = False  # the method itself is LoRA fine-tuning (flipped-kd)
    note: str = ""


ROWS = {r.name: r for r in (
    Row("ugd-ttm", "ugd-ttm", note="paper Table 2"),
    Row("shared-ttm", "shared-ttm", note="paper Table 2"),
    Row("ttm", "ttm", note="paper Table 2"),
    Row("ugd-stm", "ugd-stm", note="paper Table 2"),
    Row("stm", "stm", note="paper Table 2"),
    Row("ugd-ttm:lam=mu=0", "ugd-ttm", ("--lam", "0", "--mu", "0"), note="Table 3: no KL terms"),
    Row("ugd-ttm:no-detach", "ugd-ttm", ("--detach", "false"), note="Table 3: KL without detach"),
    Row("ugd-ttm:gamma=0", "ugd-ttm", ("--gamma", "0"), note="Table 3: no generation loss"),
    Row("ugd-ttm:mu=0", "ugd-ttm", ("--mu", "0"), note="Table 3: no embedding KL"),
    # the levers on the teacher side (docs/paradigms.md, "Levers on the teacher")
    Row("ugd-ttm:gate=margin", "ugd-ttm", options={"kl_gate": "margin"},
        note="lever: distil only where the single tower gives the gold label more probability"),
    Row("ugd-ttm:gate=correct", "ugd-ttm", options={"kl_gate": "correct"},
        note="lever: distil only where the single tower is right"),
    Row("ugd-ttm:warmup", "ugd-ttm", options={"kl_warmup_steps": 150},
        note="lever: KL weights ramped from 0 over 150 steps"),
    Row("ugd-ttm:reread", "ugd-ttm", ("--interaction_positions", "32", "--interaction_fill", "query"),
        note="lever: the query re-read after the document (32 positions) for the single tower"),
    Row("ugd-ttm:slots", "ugd-ttm", ("--interaction_positions", "16", "--interaction_fill", "gmask"),
        note="lever: 16 [gMask] slots for the single tower"),
    Row("ugd-ttm:reread+margin", "ugd-ttm", ("--interaction_positions", "32", "--interaction_fill", "query"),
        options={"kl_gate": "margin"}, note="levers: query re-read and the margin gate"),
    Row("ugd-ttm:ahead", "ugd-ttm", options={"kl_switch": "teacher_ahead"},
        note="lever: distil only while the single tower's running ACC is above the two tower's"),
    Row("ugd-ttm:ahead+margin", "ugd-ttm", options={"kl_switch": "teacher_ahead", "kl_gate": "margin"},
        note="levers: the teacher-ahead switch and the margin gate"),
    # 0.05: about 2-3 standard errors of the difference of the two running accuracies at chance, batch 16 and
    # window 50 (docs/paradigms.md), so that noise alone does not switch the KL on
    Row("ugd-ttm:ahead+lead", "ugd-ttm", options={"kl_switch": "teacher_ahead", "kl_switch_lead": 0.05},
        note="lever: distil only while the single tower's running ACC leads the two tower's by more than 0.05"),
    # a teacher with the full interaction of a cross-encoder: the own single tower under the STM mask (a second
    # pass), or the stm row's trained model of the same seed, frozen (docs/paradigms.md, "Levers on the teacher")
    Row("ugd-ttm:teacher-mask=stm", "ugd-ttm", options={"teacher_mask": "stm"},
        note="lever: the own single tower reads Q and D under the STM mask (a second pass)"),
    Row("ugd-ttm:teacher=stm", "ugd-ttm", teacher_row="stm",
        note="lever: the KL targets of the stm row's model (same seed), frozen"),
    # D2LLM distils a fine-tuned cross-encoder: the plain single tower (the stm row) of the same seed, frozen,
    # with the CI/RI weights of D2LLM's code against a trained teacher (docs/paradigms.md)
    Row("d2llm", "d2llm", options={"ci_weight": 1.0, "ri_weight": 1.0}, teacher_row="stm",
        note="teacher: the stm row's model (same seed), frozen"),
    Row("ullme", "ullme", note="seed paper"),
    # the MiniLM teacher scores each training pair once; the cache file shares them across seeds
    Row("flipped-kd", "flipped-kd", options={"teacher_cache": "{data}/flipped-kd-teacher-scores.jsonl"},
        always_lora=True, note="LoRA (r 8 unless --lora_r), teacher all-MiniLM-L6-v2"),
)}


def resolve_rows(names: list[str]) -> list[str]:
    """The rows to run, in the given order, each teacher row moved or added before the rows that need it."""
    if any(n == "all" for n in names):
        names = list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise StudyError(f"unknown row(s) {', '.join(unknown)}; the rows are: all {' '.join(ROWS)}")
    order: list[str] = []
    for n in dict.fromkeys(names):
        teacher = ROWS[n].teacher_row
        if teacher and teacher not in order:
            order.append(teacher)
        if n not in order:
            order.append(n)
    return order


def row_dir(name: str) -> str:
    """The folder name of a row under ``runs/`` (a colon is not portable in file names)."""
    return name.replace(":", "_")


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything that changes a result; saved in ``study.json`` and compared on a rerun."""

    backbone: str
    train_file: str
    dev_file: str | None
    test_file: str | None
    files_sha256: dict
    eval_on: str
    train_size: int | None
    dev_size: int
    test_size: int | None
    data_seed: int
    num_labels: int
    epochs: float
    max_steps: int | None
    lora_r: int
    learning_rate: float | None
    batch_size: int | None
    max_query_len: int | None
    max_document_len: int | None
    max_reason_len: int | None
    reason_samples: int
    max_new_tokens: int
    save_checkpoints: bool
    train_args: list


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_settings(out: str, settings: Settings) -> None:
    """Refuses (StudyError naming what changed) when ``out`` holds a study with other settings."""
    path = os.path.join(out, "study.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f).get("settings", {})
    now = dataclasses.asdict(settings)
    changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    if changed:
        raise StudyError(f"{out} holds a study with other settings ({'; '.join(changed)}); use another --out "
                         "so that results never mix")


def save_study(out: str, settings: Settings, rows: list[str], seeds: list[int]) -> dict:
    """study.json: the settings and every row and seed asked for so far (those the table shows)."""
    path = os.path.join(out, "study.json")
    asked_rows, asked_seeds = [], []
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        asked_rows, asked_seeds = old.get("rows", []), old.get("seeds", [])
    study = {"settings": dataclasses.asdict(settings),
             "rows": [r for r in ROWS if r in set(asked_rows) | set(rows)],
             "seeds": sorted(set(asked_seeds) | set(seeds))}
    write_json(study, path)
    return study


def write_json(obj, path: str) -> None:
    """``obj`` as JSON at ``path``, atomically (``ugd._files.atomic_text_file``)."""
    with atomic_text_file(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _read(path: str, flag: str):
    if not os.path.isfile(path):
        raise StudyError(f"{flag} {path}: {'a folder, not a data file' if os.path.isdir(path) else 'no such file'}")
    try:
        records, _ = read_records(path)
    except DataError as e:
        raise StudyError(f"{flag}: {e}") from None
    if not records:
        raise StudyError(f"{flag} {path}: no records")
    return records


def subset(records: list, size: int | None, data_seed: int, stream: int) -> list:
    """The first ``size`` records of one fixed permutation (``data_seed``, ``stream`` per split): a smaller
    subset is a prefix of a larger one, and every row and seed reads the same records."""
    order = np.random.default_rng([data_seed, stream]).permutation(len(records))
    return [records[i] for i in order[: len(records) if size is None else min(size, len(records))]]


def prepare_data(out: str, s: Settings) -> dict:
    """Writes the subsets once into ``<out>/data/``; returns {"train", "dev" (or None), "eval"} paths."""
    folder = os.path.join(out, "data")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    eval_file, eval_flag = (s.test_file, "--test_file") if s.eval_on == "test" else (s.dev_file, "--dev_file")
    wanted = [("train", s.train_file, "--train_file", s.train_size, 0)]
    if s.dev_size > 0:
        wanted.append(("dev", s.dev_file, "--dev_file", s.dev_size, 1))
    # an evaluation on dev draws from the dev permutation, so it is the same records as the training-time dev set
    wanted.append(("eval", eval_file, eval_flag, s.test_size, 2 if s.eval_on == "test" else 1))
    for key, src, flag, size, stream in wanted:
        prefix = {"train": "train", "dev": "dev", "eval": s.eval_on}[key]
        read = _read(src, flag)
        records = subset(read, size, s.data_seed, stream)
        if size is not None and size > len(read):  # the whole file, which is fewer than asked: say so
            print(f"[study] --{key if key != 'eval' else ('test' if s.eval_on == 'test' else 'dev')}_size {size}: "
                  f"{flag} {src} holds {len(read)} records; all {len(read)} are used", flush=True)
        path = os.path.join(folder, f"{prefix}-{len(records)}.jsonl")
        if not os.path.isfile(path):
            write_jsonl(records, path)
        paths[key] = path
    paths.setdefault("dev", None)
    paths["counts"] = {k: _count_lines(paths[k]) for k in ("train", "dev", "eval") if paths[k]}
    return paths


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def train_command(row: Row, seed: int, s: Settings, data: dict, model_dir: str, *, data_dir: str,
                  teacher_dir: str | None = None, cpu_threads: int | None = None, resume: bool = False) -> list[str]:
    """The ``python -m ugd.train`` command line of one (row, seed)."""
    cmd = [sys.executable, "-m", "ugd.train", "--paradigm", row.paradigm, *row.args,
           "--train_file", data["train"], "--num_labels", str(s.num_labels), "--output_dir", model_dir,
           "--seed", str(seed), "--num_train_epochs", str(s.epochs), "--report_to", "none", "--num_reasons", "0",
           "--disable_tqdm", "true", "--logging_steps", "50"]
    if s.backbone != "none":
        cmd += ["--model_name_or_path", s.backbone]
    if s.max_steps is not None:
        cmd += ["--max_steps", str(s.max_steps)]
    # flipped-kd is LoRA fine-tuning by method: its own default rank unless the study sets one
    if not row.always_lora or s.lora_r > 0:
        cmd += ["--lora_r", str(s.lora_r)]
    for flag, value in (("--learning_rate", s.learning_rate), ("--per_device_train_batch_size", s.batch_size),
                        ("--max_query_len", s.max_query_len), ("--max_document_len", s.max_document_len),
                        ("--max_reason_len", s.max_reason_len), ("--cpu_threads", cpu_threads)):
        if value is not None:
            cmd += [flag, str(value)]
    if data.get("dev"):
        cmd += ["--eval_file", data["dev"], "--eval_strategy", "epoch"]
    else:
        cmd += ["--eval_strategy", "no"]
    if s.save_checkpoints:
        cmd += ["--save_strategy", "epoch", "--save_total_limit", "1"]
    else:
        cmd += ["--save_strategy", "no"]
    options = {k: v.replace("{data}", data_dir) if isinstance(v, str) else v for k, v in row.options.items()}
    if row.teacher_row:
        options["teacher"] = teacher_dir
    if options:
        cmd += ["--paradigm_options", json.dumps(options)]
    if resume:
        cmd += ["--resume_from_checkpoint", "true"]
    return cmd + list(s.train_args)


def eval_command(s: Settings, data: dict, model_dir: str, run_dir: str, *, cpu_threads: int | None = None,
                 batch_size: int | None = None) -> list[str]:
    """The ``python -m ugd.evaluate`` command line of one (row, seed)."""
    cmd = [sys.executable, "-m", "ugd.evaluate", "--model", model_dir, "--input", data["eval"],
           "--output", os.path.join(run_dir, "report.json"), "--predictions", os.path.join(run_dir, "preds.jsonl"),
           "--reason_samples", str(s.reason_samples), "--max_new_tokens", str(s.max_new_tokens), "--no_progress"]
    if cpu_threads is not None:
        cmd += ["--cpu_threads", str(cpu_threads)]
    if batch_size is not None:
        cmd += ["--batch_size", str(batch_size)]
    return cmd


def run_subprocess(cmd: list[str], stdout_path: str, stderr_path: str) -> int:
    """The default executor: ``cmd`` with its output in two log files; returns the exit status. The child
    dies with this process, even under SIGKILL (``ugd.training.child_process.die_with_parent``): an orphaned
    trainer would go on writing into a run folder that a rerun trains into again."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        return subprocess.run(cmd, stdout=out, stderr=err, env=env, preexec_fn=die_with_parent()).returncode


def _tail(path: str, chars: int = 3000) -> str:
    if not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _last_checkpoint(model_dir: str) -> str | None:
    if not os.path.isdir(model_dir):
        return None

    return get_last_checkpoint(model_dir)


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------


@dataclass
class Study:
    out: str
    settings: Settings
    data: dict
    cpu_threads: int | None = None
    eval_batch_size: int | None = None
    execute: Callable[[list, str, str], int] = run_subprocess  # injected by tests: no model
    log: Callable[[str], None] = field(default=lambda text: print(text, flush=True))

    def run_dir(self, row: str, seed: int) -> str:
        return os.path.join(self.out, "runs", row_dir(row), f"seed{seed}")

    def run(self, rows: list[str], seeds: list[int]) -> bool:
        """Every (row, seed) not done yet; True when all of them are done."""
        ok = True
        for name in rows:
            for seed in seeds:
                ok &= self.run_one(ROWS[name], seed)
        return ok

    def run_one(self, row: Row, seed: int) -> bool:
        run_dir = self.run_dir(row.name, seed)
        done_path = os.path.join(run_dir, "done.json")
        tag = f"[study] {row.name} seed {seed}"
        if os.path.isfile(done_path):
            self.log(f"{tag}: done earlier, skipped")
            return True
        os.makedirs(run_dir, exist_ok=True)
        model_dir = os.path.join(run_dir, "model")
        teacher_dir = None
        if row.teacher_row:
            teacher_dir = os.path.join(self.run_dir(row.teacher_row, seed), "model")
            if not os.path.isfile(os.path.join(self.run_dir(row.teacher_row, seed), "done.json")):
                return self._fail(run_dir, row, seed, "teacher", None, f"its teacher, row {row.teacher_row} seed "
                                  f"{seed}, did not finish; run that row first")
        summary_path = os.path.join(model_dir, "ugd_run_summary.json")
        train_wall = None
        if os.path.isfile(summary_path):
            self.log(f"{tag}: trained earlier, evaluating")
        else:
            holder = run_lock_holder(model_dir)
            if holder:  # a trainer of an earlier study process still runs in it: never train twice into one folder
                return self._fail(run_dir, row, seed, "train", None, holder)
            checkpoint = _last_checkpoint(model_dir)
            if checkpoint is None and os.path.isdir(model_dir):
                shutil.rmtree(model_dir)  # an interrupted training without a checkpoint: redone from scratch
            cmd = train_command(row, seed, self.settings, self.data, model_dir, data_dir=os.path.join(self.out, "data"),
                                teacher_dir=teacher_dir, cpu_threads=self.cpu_threads, resume=checkpoint is not None)
            self.log(f"{tag}: training{' (resuming ' + os.path.basename(checkpoint) + ')' if checkpoint else ''}, "
                     f"log {os.path.join(run_dir, 'train.err')}")
            t0 = time.time()
            rc = self.execute(cmd, os.path.join(run_dir, "train.out"), os.path.join(run_dir, "train.err"))
            train_wall = time.time() - t0
            if rc != 0 or not os.path.isfile(summary_path):
                return self._fail(run_dir, row, seed, "train", cmd, _tail(os.path.join(run_dir, "train.err")), rc)
        for name in ("report.json", "preds.jsonl"):  # never read a stale evaluation
            if os.path.isfile(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        cmd = eval_command(self.settings, self.data, model_dir, run_dir, cpu_threads=self.cpu_threads,
                           batch_size=self.eval_batch_size)
        self.log(f"{tag}: evaluating on {self.data['counts']['eval']} {self.settings.eval_on} records")
        t0 = time.time()
        rc = self.execute(cmd, os.path.join(run_dir, "eval.out"), os.path.join(run_dir, "eval.err"))
        eval_wall = time.time() - t0
        report_path = os.path.join(run_dir, "report.json")
        if rc != 0 or not os.path.isfile(report_path) or not os.path.isfile(os.path.join(run_dir, "preds.jsonl")):
            return self._fail(run_dir, row, seed, "evaluate", cmd, _tail(os.path.join(run_dir, "eval.err")), rc)
        with open(report_path) as f:
            report = json.load(f)
        with open(summary_path) as f:
            summary = json.load(f)
        done = {"row": row.name, "seed": seed, "paradigm": row.paradigm, "report": report,
                "train_seconds": summary.get("train_seconds"), "train_wall_seconds": train_wall,
                "eval_wall_seconds": eval_wall, "global_step": summary.get("global_step"),
                "train_versions": summary.get("versions"), "host": host_line(),
                "train_log": summary.get("log_history"),
                "date": _now()}
        write_json(done, os.path.join(run_dir, "done.json"))
        if os.path.isfile(os.path.join(run_dir, "failed.json")):
            os.remove(os.path.join(run_dir, "failed.json"))
        modes = report.get("modes", {})
        self.log(f"{tag}: " + "  ".join(f"{m} ACC {_num(modes[m].get('acc'))}" for m in HEADS if m in modes)
                 + (f"  ROUGE-L {_num(modes['reason'].get('rouge_l'))}" if "reason" in modes else ""))
        return True

    def _fail(self, run_dir, row, seed, stage, cmd, tail, rc=None) -> bool:
        write_json({"row": row.name, "seed": seed, "stage": stage, "returncode": rc, "stderr_tail": tail,
                    "command": cmd, "date": _now()}, os.path.join(run_dir, "failed.json"))
        last = [line for line in (tail or "").splitlines() if line.strip()]
        self.log(f"[study] {row.name} seed {seed}: FAILED in {stage}: {last[-1] if last else 'exit ' + str(rc)}"
                 f" (see {os.path.join(run_dir, 'failed.json')})")
        return False


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def host_line() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node() or 'host'}: {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------


def bootstrap(per_seed: list, n: int, metric: Callable, *, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
              level: float = LEVEL) -> dict:
    """Percentile bootstrap over ``n`` evaluation records of the mean over seeds of ``metric(data, idx)``.

    ``per_seed``: one item per seed, each read by ``metric`` at record indices ``idx``. Every seed was
    evaluated on the same records, so each resample draws one set of record indices for all seeds (a paired
    bootstrap): the interval is that of the seed mean under record sampling. Returns ``{"value"`` (the seed
    mean on all records), ``"low", "high", "per_seed", "seed_sd"`` (None with one seed)``, "resamples"}``."""
    full = np.arange(n)
    values = [metric(d, full) for d in per_seed]
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for b in range(resamples):
        idx = rng.integers(0, n, n)
        with np.errstate(all="ignore"):
            stats[b] = np.nanmean([metric(d, idx) for d in per_seed]) if per_seed else np.nan
    tail = (1 - level) / 2 * 100
    finite = stats[np.isfinite(stats)]  # a resample may miss a class (no AUC): left out
    low, high = (np.percentile(finite, [tail, 100 - tail]) if finite.size else (np.nan, np.nan))
    clean = [v for v in values if v is not None and np.isfinite(v)]
    return {"value": float(np.mean(clean)) if clean else None, "low": _f(low), "high": _f(high),
            "per_seed": [_f(v) for v in values], "seed_sd": float(np.std(clean, ddof=1)) if len(clean) > 1 else None,
            "resamples": resamples}


def _f(x):
    return None if x is None or not np.isfinite(x) else float(x)


def _acc(d, idx):
    return accuracy(d[0][idx], d[1][idx])


def _auc(d, idx):
    return roc_auc(d[0][idx], d[1][idx])


def _mean(d, idx):
    return float(np.mean(d[idx]))


def read_predictions(path: str) -> dict:
    """preds.jsonl -> {"labels": [N], head: log-probabilities [N, C] per scoring head, "rouge_l": [M] of the
    records with a scored reason}."""
    labels, probs, rouge = [], {}, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            p = json.loads(line)
            labels.append(int(p["label"]))
            for head, row in (p.get("probs") or {}).items():
                probs.setdefault(head, []).append(row)
            if p.get("rouge_l") is not None:
                rouge.append(float(p["rouge_l"]))
    out = {"labels": np.asarray(labels, dtype=np.int64), "rouge_l": np.asarray(rouge, dtype=np.float64)}
    with np.errstate(divide="ignore"):  # a probability of exactly 0 is -inf: softmax maps it back to 0
        for head, rows in probs.items():
            out[head] = np.log(np.asarray(rows, dtype=np.float64))
    return out


def row_metrics(pred_files: list[str], **kw) -> dict:
    """{head: {"acc": interval, "auc": interval}, "reason": {"rouge_l": interval}} over the seeds' predictions."""
    preds = [read_predictions(p) for p in pred_files]
    out = {}
    for head in HEADS:
        have = [p for p in preds if head in p]
        if have and len({len(p["labels"]) for p in have}) == 1:
            data = [(p[head], p["labels"]) for p in have]
            n = len(have[0]["labels"])
            out[head] = {"acc": bootstrap(data, n, _acc, **kw), "auc": bootstrap(data, n, _auc, **kw), "records": n}
    rouge = [p["rouge_l"] for p in preds if p["rouge_l"].size]
    if rouge and len({r.size for r in rouge}) == 1:
        out["reason"] = {"rouge_l": bootstrap(rouge, rouge[0].size, _mean, **kw), "samples": int(rouge[0].size)}
    return out


#: The rows every other ugd-ttm row is compared with, paired (``difference_pairs``): the paper's settings (is
#: a lever better?), no KL terms (does the distillation help or hurt the two tower?) and Shared TTM (does UGD
#: TTM beat it, as the paper's Table 2 has?).
REFERENCES = ("ugd-ttm", "ugd-ttm:lam=mu=0", "shared-ttm")


def difference_pairs(rows: list[str]) -> list[tuple[str, str]]:
    """(row, against) for each ugd-ttm row of the study and each of REFERENCES the study holds; a pair
    already there the other way round is not repeated."""
    pairs = []
    for name in rows:
        if ROWS[name].paradigm != "ugd-ttm":
            continue
        pairs += [(name, ref) for ref in REFERENCES if ref in rows and ref != name and (ref, name) not in pairs]
    return pairs


def _diff(metric: Callable) -> Callable:
    return lambda pair, idx: metric(pair[0], idx) - metric(pair[1], idx)


def paired_difference(a: list, b: list, n: int, metric: Callable, **kw) -> dict:
    """The bootstrap interval (``bootstrap``) of mean over seeds of metric(a) - metric(b): seed k of ``a``
    is paired with seed k of ``b`` and every resample draws one set of records for both rows and all seeds,
    so what the two rows share (records, seeds) cancels out of the interval."""
    return bootstrap(list(zip(a, b)), n, _diff(metric), **kw)


#: Two-sided 95 % quantiles of Student's t with 1..10 degrees of freedom (beyond: the normal quantile with
#: the first Cornish-Fisher term, within 0.01 of t there).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t95(df: int) -> float:
    z = 1.959964
    return _T95[df - 1] if df <= len(_T95) else z + (z ** 3 + z) / (4 * df)


def seed_interval(per_seed: list) -> dict | None:
    """The 95 % t interval of the mean of ``per_seed`` (one value per training seed): what training
    randomness leaves uncertain, which the record bootstrap does not see. None under two seeds."""
    v = np.asarray([x for x in per_seed if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return None
    half = t95(v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return {"value": float(v.mean()), "low": float(v.mean() - half), "high": float(v.mean() + half)}


def collect_differences(out: str, results: dict, head: str = "two-tower") -> list[dict]:
    """results.json's "differences": per pair of ``difference_pairs`` the paired difference of ``head``'s ACC
    and AUC over the seeds both rows finished; a pair without such seeds (or whose predictions are not on
    the same records) is left out."""
    diffs = []
    for name, ref in difference_pairs(list(results)):
        seeds = [s for s in results[name]["seeds_done"] if s in results[ref]["seeds_done"]]
        if not seeds:
            continue
        pa, pb = ([read_predictions(os.path.join(out, "runs", row_dir(r), f"seed{s}", "preds.jsonl")) for s in seeds]
                  for r in (name, ref))
        if not all(head in x and head in y and np.array_equal(x["labels"], y["labels"]) for x, y in zip(pa, pb)):
            continue
        a, b = [(x[head], x["labels"]) for x in pa], [(y[head], y["labels"]) for y in pb]
        n = len(pa[0]["labels"])
        acc, auc = paired_difference(a, b, n, _acc), paired_difference(a, b, n, _auc)
        diffs.append({"row": name, "against": ref, "head": head, "seeds": seeds, "records": n, "acc": acc,
                      "auc": auc, "acc_over_seeds": seed_interval(acc["per_seed"]),
                      "auc_over_seeds": seed_interval(auc["per_seed"])})
    return diffs


# ---------------------------------------------------------------------------------------------
# results and the table
# ---------------------------------------------------------------------------------------------


def collect(out: str, rows: list[str], seeds: list[int]) -> dict:
    """results.json's content: per row its status, per-seed runs and the intervals of its finished seeds."""
    results = {}
    for name in rows:
        done, failed = [], []
        for seed in seeds:
            d = os.path.join(out, "runs", row_dir(name), f"seed{seed}")
            if os.path.isfile(os.path.join(d, "done.json")):
                with open(os.path.join(d, "done.json")) as f:
                    done.append((seed, d, json.load(f)))
            elif os.path.isfile(os.path.join(d, "failed.json")):
                with open(os.path.join(d, "failed.json")) as f:
                    failed.append(json.load(f))
        entry = {"row": name, "paradigm": ROWS[name].paradigm, "note": ROWS[name].note,
                 "seeds_done": [s for s, _, _ in done], "failed": failed}
        if done:
            entry["status"] = "done" if len(done) == len(seeds) else "partial"
            entry["metrics"] = row_metrics([os.path.join(d, "preds.jsonl") for _, d, _ in done])
            secs = [x["train_seconds"] for _, _, x in done if x.get("train_seconds") is not None]
            entry["train_seconds"] = float(np.mean(secs)) if secs else None
            entry["runs"] = {str(s): {k: x.get(k) for k in ("train_seconds", "train_wall_seconds", "eval_wall_seconds",
                                                           "global_step", "host", "date")}
                             | {"report_modes": x["report"].get("modes"), "versions": x["report"].get("versions"),
                                "device": x["report"].get("device")} for s, _, x in done}
        else:
            entry["status"] = "failed" if failed else "not run"
        results[name] = entry
    return results


def _cell(iv: dict | None, sign: str = "") -> str:
    if not iv or iv.get("value") is None:
        return "n/a"
    text = f"{iv['value']:{sign}.4f}"
    if iv.get("low") is not None:
        text += f" [{iv['low']:{sign}.3f}, {iv['high']:{sign}.3f}]"
    if iv.get("seed_sd") is not None:
        text += f" sd {iv['seed_sd']:.3f}"
    return text


def render_differences(diffs: list[dict]) -> list[str]:
    """The table of ``collect_differences`` (no lines when there is none)."""
    if not diffs:
        return []
    lines = ["", "Paired differences, two tower (row minus against, over the seeds both finished):", "",
             "| row | against | seeds | two-tower ACC difference | over seeds | two-tower AUC difference "
             "| over seeds |", "|" + "---|" * 7]
    for d in diffs:
        over = [("n/a" if iv is None else f"[{iv['low']:+.3f}, {iv['high']:+.3f}]")
                for iv in (d.get("acc_over_seeds"), d.get("auc_over_seeds"))]
        lines.append(f"| {d['row']} | {d['against']} | {', '.join(map(str, d['seeds']))} | {_cell(d['acc'], '+')} "
                     f"| {over[0]} | {_cell(d['auc'], '+')} | {over[1]} |")
    lines += ["", "Difference [95 % interval]: each bootstrap resample draws one set of evaluation records for both "
              "rows and all their seeds (seed k against seed k), so the interval covers record sampling; sd = the "
              "standard deviation across seeds of the per-seed difference. Over seeds: the 95 % t interval of the "
              "mean per-seed difference (training randomness; n/a under two seeds). A lever separates from its "
              "reference when both intervals exclude 0."]
    return lines


def render_table(results: dict, study: dict, data: dict | None = None, diffs: list[dict] | None = None) -> str:
    """The markdown table of ``results`` (rows not run say so), the paired differences ``diffs`` and the
    lines that say how it was made."""
    s = study["settings"]
    seeds = study["seeds"]
    head = ("| row | paradigm | seeds | two-tower ACC | two-tower AUC | single-tower ACC | single-tower AUC "
            "| reason ROUGE-L | train s |")
    lines = [head, "|" + "---|" * 9]
    for name, r in results.items():
        if r["status"] in ("not run", "failed"):
            why = "not run" if r["status"] == "not run" else \
                "failed: " + ", ".join(f"seed {f['seed']} in {f['stage']}" for f in r["failed"])
            lines.append(f"| {name} | {r['paradigm']} | 0/{len(seeds)} | {why} | | | | | |")
            continue
        m = r["metrics"]
        cells = []
        for h in HEADS:
            cells += [_cell(m[h]["acc"]), _cell(m[h]["auc"])] if h in m else ["–", "–"]
        cells.append(_cell(m["reason"]["rouge_l"]) if "reason" in m else "–")
        secs = "n/a" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
        seeds_cell = f"{len(r['seeds_done'])}/{len(seeds)}" + (" (some failed)" if r["failed"] else "")
        lines.append(f"| {name} | {r['paradigm']} | {seeds_cell} | " + " | ".join(cells) + f" | {secs} |")
    lines += render_differences(diffs or [])
    counts = (data or {}).get("counts", {})
    budget = f"{s['epochs']:g} epoch(s)" + (f", max {s['max_steps']} steps" if s.get("max_steps") else "")
    lines += [
        "",
        f"Backbone {s['backbone']}; train {counts.get('train', s['train_size'])} records of {s['train_file']} "
        f"(data seed {s['data_seed']}), {budget}, lr {s['learning_rate'] or 'default'}, batch "
        f"{s['batch_size'] or 'default'}, LoRA r {s['lora_r']}; evaluated on {counts.get('eval', s['test_size'])} "
        f"records of the {s['eval_on']} file ({s['test_file'] if s['eval_on'] == 'test' else s['dev_file']}); "
        f"reasons: the first {s['reason_samples']} of them with a gold reason, at most {s['max_new_tokens']} new "
        f"tokens; seeds {', '.join(map(str, seeds))}.",
        f"Cells: value [95 % interval]: percentile bootstrap over the evaluation records ({RESAMPLES} resamples, "
        f"RNG seed {BOOTSTRAP_SEED}; ACC/AUC/ROUGE-L recomputed per resample from preds.jsonl with ugd.training.metrics). "
        "With several seeds the value is the mean over seeds and the interval that of this mean, each resample "
        "drawing one set of records for all seeds; sd = the standard deviation across seeds. "
        "AUC: binary, or macro one-vs-rest with more than two classes. –: the row does not serve that head.",
        "train s: Trainer training time in seconds, mean over seeds.",
    ]
    versions = _versions_line(results)
    if versions:
        lines.append(versions)
    return "\n".join(lines)


def _versions_line(results: dict) -> str:
    for r in results.values():
        for run in (r.get("runs") or {}).values():
            v = run.get("versions") or {}
            parts = ", ".join(f"{k} {val}" for k, val in v.items() if val)
            return f"{run.get('date', '')}: {parts}; device {run.get('device')}; {run.get('host')}."
    return ""


def write_results(out: str, study: dict, data: dict | None) -> tuple[dict, str]:
    results = collect(out, study["rows"], study["seeds"])
    diffs = collect_differences(out, results)
    table = render_table(results, study, data, diffs)
    write_json({"settings": study["settings"], "seeds": study["seeds"], "data": data, "rows": results,
                "differences": diffs,
                "resamples": RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED, "level": LEVEL, "date": _now()},
               os.path.join(out, "results.json"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    return results, table


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _make_parser() -> argparse.ArgumentParser:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    rows = "\n".join(f"  {r.name:<20} {r.note}" for r in ROWS.values())
    p = argparse.ArgumentParser(prog="python -m ugd.study", formatter_class=Formatter,
                                description=__doc__, epilog=f"rows:\n{rows}\n  all                  every row")
    p.add_argument("--backbone", default=None,
                   help="What python -m ugd.train loads: a model folder, a .gguf file, a registered name "
                        "(smollm2-135m) or none (the tiny random-init backbone; size it with --backbone_config "
                        "after --).")
    p.add_argument("--train_file", default=None, help="Needed unless --report_only.")
    p.add_argument("--dev_file", default=None)
    p.add_argument("--test_file", default=None)
    p.add_argument("--eval_on", choices=("test", "dev"), default="test",
                   help="Evaluate on the test file, or on the dev file to tune (use another --out).")
    p.add_argument("--rows", nargs="+", default=list(PARADIGM_ROWS), metavar="ROW")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED")
    p.add_argument("--train_size", type=int, default=None, help="Training records (default: the whole file).")
    p.add_argument("--dev_size", type=int, default=0,
                   help="Dev records evaluated by the Trainer after each epoch (0: none).")
    p.add_argument("--test_size", type=int, default=None, help="Evaluation records (default: the whole file).")
    p.add_argument("--data_seed", type=int, default=0, help="Seed of the subsets' draw.")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--lora_r", type=int, default=0, help="LoRA rank (0: full fine-tuning; flipped-kd: its own 8).")
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=None, help="--per_device_train_batch_size of ugd.train.")
    p.add_argument("--max_query_len", type=int, default=None)
    p.add_argument("--max_document_len", type=int, default=None)
    p.add_argument("--max_reason_len", type=int, default=None)
    p.add_argument("--reason_samples", type=int, default=64, help="Reasons generated and scored per run (0: none).")
    p.add_argument("--max_new_tokens", type=int, default=48, help="Length limit of a generated reason.")
    p.add_argument("--save_checkpoints", action="store_true",
                   help="A Trainer checkpoint each epoch, so that an interrupted training resumes from it.")
    p.add_argument("--cpu_threads", type=int, default=None, help="Threads of each training and evaluation process.")
    p.add_argument("--eval_batch_size", type=int, default=None, help="--batch_size of ugd.evaluate.")
    p.add_argument("--report_only", action="store_true",
                   help="Only rebuild results.json and table.md, with the settings, rows and seeds of "
                        "OUT/study.json: --report_only --out DIR needs nothing else.")
    p.add_argument("--out", required=True, help="The study's folder.")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    """Arguments (what follows ``--`` goes to ugd.train) -> (namespace, Settings); StudyError on a bad one."""
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    else:
        train_args = []
    args = _make_parser().parse_args(argv)
    if args.report_only and args.backbone is None and args.train_file is None:
        return args, None  # the settings are those of OUT/study.json (main reads them)
    for flag in ("backbone", "train_file"):
        if getattr(args, flag) is None:
            raise StudyError(f"--{flag} is needed (only --report_only --out DIR rebuilds a table without it)")
    # numpy's generators and transformers.set_seed take seeds in [0, 2**32): a negative one would fail in
    # every training run, recorded as failed runs, instead of here
    for flag, values in (("--seeds", args.seeds), ("--data_seed", [args.data_seed])):
        bad = [v for v in values if not 0 <= v < 2 ** 32]
        if bad:
            raise StudyError(f"{flag} {bad[0]}: seeds are integers in [0, 2**32)")
    asked = args.rows
    args.rows = resolve_rows(args.rows)
    args.added = [r for r in args.rows if r not in asked and "all" not in asked]  # teacher rows
    for name in ("train_size", "test_size", "max_steps", "batch_size", "max_query_len", "max_document_len",
                 "max_reason_len", "cpu_threads", "eval_batch_size", "max_new_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise StudyError(f"--{name} must be >= 1, got {v}")
    for name in ("dev_size", "lora_r", "reason_samples"):
        if getattr(args, name) < 0:
            raise StudyError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.epochs <= 0:
        raise StudyError(f"--epochs must be > 0, got {args.epochs}")
    if args.eval_on == "test" and not args.test_file:
        raise StudyError("--test_file is needed (or --eval_on dev with --dev_file, to tune)")
    if (args.eval_on == "dev" or args.dev_size > 0) and not args.dev_file:
        raise StudyError("--dev_file is needed for --eval_on dev or --dev_size > 0")
    files = {k: os.path.abspath(getattr(args, k)) if getattr(args, k) else None
             for k in ("train_file", "dev_file", "test_file")}
    if args.eval_on == "dev":
        files["test_file"] = None  # tuning never reads the test file
    for k, path in files.items():
        if path and not os.path.isfile(path):
            raise StudyError(f"--{k} {path}: {'a folder, not a data file' if os.path.isdir(path) else 'no such file'}")
    train = _read(files["train_file"], "--train_file")
    num_labels = max(2, max(int(r["label"]) for r in train) + 1)
    backbone = args.backbone if args.backbone == "none" or not os.path.exists(args.backbone) \
        else os.path.abspath(args.backbone)
    settings = Settings(
        backbone=backbone, **files, files_sha256={k: _sha256(v) for k, v in files.items() if v},
        eval_on=args.eval_on, train_size=args.train_size, dev_size=args.dev_size, test_size=args.test_size,
        data_seed=args.data_seed, num_labels=num_labels, epochs=args.epochs, max_steps=args.max_steps,
        lora_r=args.lora_r, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_query_len=args.max_query_len, max_document_len=args.max_document_len,
        max_reason_len=args.max_reason_len, reason_samples=args.reason_samples,
        max_new_tokens=args.max_new_tokens, save_checkpoints=args.save_checkpoints, train_args=train_args)
    return args, settings


def main(argv: list[str] | None = None, *, execute=run_subprocess) -> int:
    """Runs the study; returns the exit status (0 all done, 1 some (row, seed) failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, settings = parse(argv)
    out = os.path.abspath(args.out)
    # docs/training.md, "Inputs and outputs": --out is a folder that is none of the inputs
    inputs = {} if settings is None else {
        "--train_file": settings.train_file, "--dev_file": settings.dev_file, "--test_file": settings.test_file,
        "--backbone": settings.backbone if os.path.exists(settings.backbone) else None}
    problems = output_problems({"--out": out}, inputs, folders=("--out",))
    if problems:
        raise StudyError(problems[0])
    if args.report_only:
        return report_only(out, settings)
    os.makedirs(out, exist_ok=True)
    check_settings(out, settings)
    study = save_study(out, settings, args.rows, args.seeds)
    data = prepare_data(out, settings)
    write_json({**study, "data": data}, os.path.join(out, "study.json"))  # --report_only reads the counts here
    print(f"[study] {len(args.rows)} row(s) x {len(args.seeds)} seed(s) into {out}: {' '.join(args.rows)}",
          flush=True)
    for name in args.added:
        needs = [r for r in args.rows if ROWS[r].teacher_row == name]
        print(f"[study] {name} added: the teacher of {', '.join(needs)} (runs before it)", flush=True)
    runner = Study(out, settings, data, cpu_threads=args.cpu_threads, eval_batch_size=args.eval_batch_size,
                   execute=execute)
    ok = runner.run(args.rows, args.seeds)
    return _report(out, study, data, ok)


def report_only(out: str, settings: Settings | None) -> int:
    """``--report_only``: the table of OUT/study.json's rows and seeds from what is on disk; StudyError for
    a folder without a study, or for settings (when given) other than the study's."""
    path = os.path.join(out, "study.json")
    if not os.path.isfile(path):
        raise StudyError(f"--out {out} holds no study (no study.json): --report_only rebuilds the table of a study "
                         "that ran there; run the study first, without --report_only")
    if settings is not None:
        check_settings(out, settings)
    try:
        with open(path) as f:
            study = json.load(f)
        study["settings"], study["rows"], study["seeds"]  # noqa: B018  (what the table needs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{path} is damaged ({type(e).__name__}: {e}); it cannot be reported") from None
    study["rows"] = [r for r in study["rows"] if r in ROWS]
    data = study.get("data")
    if data is None and os.path.isfile(os.path.join(out, "results.json")):  # a study written before "data" was kept
        with open(os.path.join(out, "results.json")) as f:
            data = json.load(f).get("data")
    return _report(out, study, data, True)


def _report(out: str, study: dict, data: dict | None, ok: bool) -> int:
    results, table = write_results(out, study, data)
    print("\n" + table + f"\n\n[study] {os.path.join(out, 'table.md')}, {os.path.join(out, 'results.json')}",
          flush=True)
    failed = [f"{name} seed {f['seed']}" for name, r in results.items() for f in r["failed"]]
    if failed:
        print(f"[study] failed: {', '.join(failed)} (a rerun retries them)", file=sys.stderr)
    return 0 if ok and not failed else 1


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except StudyError as e:
        print(f"ugd.study: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
