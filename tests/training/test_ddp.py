"""Data-parallel training on the CPU (gloo): which parameters a step leaves without gradient (and that
UGDTrainer freezes them, so DDP needs no unused-parameter search), ``torchrun --nproc_per_node 2 -m
ugd.train`` end to end (identical replicas, checkpoints written once by rank 0, resumed by one
process), and the refusal of --fsdp where accelerate would not shard."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from ugd import paradigms
from ugd.data.collator import UGDCollator
from ugd.data.demo import build_tokenizer, demo_splits, tiny_backbone_config
from ugd.data.layout import LayoutConfig
from ugd.model import UGDConfig, UGDModel
from ugd.training.run_lock import LOCK_NAME
from ugd.training.trainer import freeze_unused_parameters, parameter_checksum, unused_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_BACKBONE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "num_key_value_heads": 2}
LAYOUT = LayoutConfig(max_query_len=16, max_document_len=40, max_reason_len=16)

# ---------------------------------------------------------------------------------------------
# one step, one process: every trainable parameter gets a gradient once the unused ones are frozen
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records():
    train, _ = demo_splits(8, 2, seed=0)
    return [dict(r, teacher_score=0.5) for r in train]  # flipped-kd: no teacher model needed


def make_model(records, paradigm, *, tied=True, lora=False, **overrides):
    torch.manual_seed(0)
    tok = build_tokenizer(records)
    cfg = tiny_backbone_config(len(tok) + 3, tie_word_embeddings=tied, max_position_embeddings=256, **TINY_BACKBONE)
    backbone = AutoModelForCausalLM.from_config(cfg, attn_implementation="ugd")
    model = UGDModel.from_backbone(backbone, tok, UGDConfig(paradigm=paradigm, num_labels=4, kl_dim=8,
                                                            layout=LAYOUT.to_dict(), **overrides))
    if lora:
        from ugd.training.args import ModelArguments
        from ugd.training.build import apply_lora

        apply_lora(model, ModelArguments(lora_r=4))
    collate = UGDCollator(tok, paradigm=paradigm, layout=LAYOUT, model_config=model.config)
    return model, collate(records)


def without_grad(model, batch) -> set:
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch).loss.backward()
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


CASES = ([(name, {}) for name in paradigms.names()]
         + [(name, {"tied": False}) for name in paradigms.names()]
         + [("ugd-ttm", {"detach": False}), ("ugd-ttm", {"mu": 0.0}), ("ugd-ttm", {"gamma": 0.0, "tied": False}),
            ("ugd-ttm", {"lora": True}), ("stm", {"lora": True}), ("flipped-kd", {"lora": True}),
            ("d2llm", {"lora": True})])


@pytest.mark.parametrize("paradigm,options", CASES, ids=[f"{p}-{'-'.join(map(str, o.items())) or 'default'}"
                                                         for p, o in CASES])
def test_unused_parameters_are_exact_and_frozen(one_thread, records, paradigm, options):
    model, batch = make_model(records, paradigm, **options)
    reported = set(unused_parameters(model))
    assert reported == without_grad(model, batch)  # exactly what a step leaves without gradient
    assert set(freeze_unused_parameters(model)) == reported
    assert unused_parameters(model) == []  # so DDP runs with find_unused_parameters=False
    assert without_grad(model, batch) == set()
    assert all(not dict(model.named_parameters())[n].requires_grad for n in reported)


def test_fc_s_kl_trains_only_without_the_detach(one_thread, records):
    # KL(T || sg(S)): the single-tower projection is the teacher, behind the stop-gradient (paper eq. 5)
    detached, _ = make_model(records, "ugd-ttm")
    assert set(unused_parameters(detached)) == {"heads.fc_s_kl.weight", "heads.fc_s_kl.bias"}
    both, _ = make_model(records, "ugd-ttm", detach=False)
    assert unused_parameters(both) == []


# ---------------------------------------------------------------------------------------------
# torchrun: two processes on the CPU with gloo
# ---------------------------------------------------------------------------------------------

TRAIN = ["--backbone_config", json.dumps(TINY_BACKBONE), "--demo_train_size", "32", "--demo_eval_size", "16",
         "--num_reasons", "0", "--eval_strategy", "no", "--report_to", "none", "--cpu_threads", "1",
         "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--logging_steps", "1"]

# Imported first by every process of the runs below (PYTHONPATH): an audit hook that records each file
# a process opens for writing and each rename, with its rank -- what rank 1 writes into a checkpoint.
WRITE_AUDIT = textwrap.dedent("""
    import os, sys
    _log = os.environ.get("UGD_TEST_WRITE_LOG")
    if _log:
        _fd = os.open(f"{_log}.{os.environ.get('RANK', '0')}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
        def _hook(event, args):
            if event == "open" and isinstance(args[0], (str, os.PathLike)):
                mode, flags = args[1], args[2]
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE):
                    os.write(_fd, f"open\\t{os.fspath(args[0])}\\n".encode())
            elif event == "os.rename":
                os.write(_fd, f"rename\\t{os.fspath(args[0])}\\t{os.fspath(args[1])}\\n".encode())
        sys.addaudithook(_hook)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, tmp_path, tag="run", timeout=240):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(WRITE_AUDIT)
    env = dict(os.environ, OMP_NUM_THREADS="1", UGD_TEST_WRITE_LOG=str(tmp_path / f"writes-{tag}"),
               PYTHONPATH=os.pathsep.join([str(hooks), ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def audit(tmp_path, rank, tag="run") -> list[list[str]]:
    path = tmp_path / f"writes-{tag}.{rank}"
    return [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []


def checkpoints(out) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name))


gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """``torchrun --nproc_per_node 2 -m ugd.train`` for 3 steps, a checkpoint every 2: (process, tmp dir)."""
    tmp = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ugd.train", *TRAIN,
           "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(tmp / "out")]
    return run(cmd, tmp), tmp


@pytest.mark.slow
@gloo
def test_torchrun_two_processes_train_identical_replicas(ddp_run):
    proc, tmp = ddp_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Expected to have finished reduction" not in proc.stderr
    summary = json.loads((tmp / "out" / "ugd_run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    # each process computed the checksum of its replica; rank 0 compared them (ReplicaCheckCallback)
    found = re.findall(r"parameters identical on all 2 processes \(checksum ([0-9a-f]+)\)", proc.stdout)
    assert len(found) == 1, proc.stdout[-3000:]
    # ... and the final model and the step-3 checkpoint, written by rank 0, are that replica
    assert parameter_checksum(UGDModel.from_pretrained(str(tmp / "out"))) == found[0]
    assert parameter_checksum(UGDModel.from_pretrained(str(tmp / "out" / "checkpoint-3"))) == found[0]
    assert parameter_checksum(UGDModel.from_pretrained(str(tmp / "out" / "checkpoint-2"))) != found[0]


@pytest.mark.slow
@gloo
def test_torchrun_checkpoints_are_written_once_by_rank_zero(ddp_run):
    from ugd.checkpoint import check_checkpoint_files

    proc, tmp = ddp_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp / "out"
    assert checkpoints(out) == [2, 3]
    # no staging, no leftovers: only the run-folder lock, which rank 0 alone took (ugd.training.run_lock)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK_NAME]
    for step in (2, 3):
        ckpt = out / f"checkpoint-{step}"
        check_checkpoint_files(str(ckpt), document_backbone=False)
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= set(os.listdir(ckpt))
    # Rank 0 writes each checkpoint once, into the staging folder, and renames it into place once; rank 1
    # writes none of it (only its rng_state_1.pth, through torch.save's C++ writer, which the audit hook does
    # not see -- nor safetensors' Rust one: the JSON files written from Python stand for the checkpoint).
    rank0, rank1 = audit(tmp, 0), audit(tmp, 1)
    assert not [e for e in rank1 if str(out) in e[-1]], rank1
    staged = [e[1] for e in rank0 if e[0] == "open" and os.path.basename(e[1]) in ("ugd_config.json",
                                                                                 "trainer_state.json")]
    assert sorted(os.path.relpath(f, out) for f in staged) == [
        f".ugd-staging/checkpoint-{n}/{f}" for n in (2, 3) for f in ("trainer_state.json", "ugd_config.json")
    ] + ["ugd_config.json"]  # the final model
    renames = [os.path.relpath(e[2], out) for e in rank0 if e[0] == "rename" and str(out) in e[2]]
    assert renames == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.slow
@gloo
def test_resume_two_process_checkpoint_in_one_process(ddp_run):
    proc, tmp = ddp_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    cmd = [sys.executable, "-m", "ugd.train", *TRAIN, "--max_steps", "4", "--save_strategy", "steps",
           "--save_steps", "2", "--output_dir", str(tmp / "resumed"),
           "--resume_from_checkpoint", str(tmp / "out" / "checkpoint-2")]
    resumed = run(cmd, tmp, tag="resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    summary = json.loads((tmp / "resumed" / "ugd_run_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["global_step"] == 4
    assert checkpoints(tmp / "resumed") == [4]
    # it went on from step 2: the losses of steps 1-2 are the two-process run's (a fresh one-process run
    # would have seen 8 samples a step, not 16), steps 3-4 were trained here
    before = json.loads((tmp / "out" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    after = json.loads((tmp / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    losses = {e["step"]: e["loss"] for e in after if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4]
    assert [losses[1], losses[2]] == [e["loss"] for e in before if "loss" in e]


def test_fsdp_on_the_cpu_is_refused_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "ugd.train", *TRAIN, "--max_steps", "1", "--fsdp", "full_shard auto_wrap",
           "--output_dir", str(tmp_path / "out")]
    proc = run(cmd, tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ugd.train: error:")]
    assert len(errors) == 1 and "--fsdp needs GPUs" in errors[0] and "docs/scaling.md" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_fsdp_auto_wrap_finds_the_decoder_layers(records):
    # what accelerate's transformer auto-wrap (--fsdp "full_shard auto_wrap") reads from the model
    model, _ = make_model(records, "ttm")
    assert model._no_split_modules == ["Qwen2DecoderLayer"]


# ---------------------------------------------------------------------------------------------
# issue 35: one line from rank 0, and the run-folder lock taken once per job
# ---------------------------------------------------------------------------------------------


def _torchrun(tmp_path, *args, tag="run", timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ugd.train", *TRAIN, *args]
    return run(cmd, tmp_path, tag=tag, timeout=timeout)


@pytest.mark.slow
@gloo
def test_torchrun_refusals_are_one_line_from_rank_zero(tmp_path):
    """--fsdp on CPUs under torchrun: the refusal once, not once per rank (torchrun then adds its own
    ChildFailedError report, which ugd cannot silence: docs/scaling.md)."""
    proc = _torchrun(tmp_path, "--max_steps", "1", "--fsdp", "full_shard auto_wrap",
                     "--output_dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ugd.train: error:" in line]
    assert len(errors) == 1 and "--fsdp needs GPUs" in errors[0], proc.stderr[-3000:]


@pytest.mark.slow
@gloo
def test_a_second_torchrun_job_into_a_locked_folder_is_refused(tmp_path):
    from ugd.training.run_lock import run_lock

    out = tmp_path / "out"
    with run_lock(out):  # the first job, still training
        proc = _torchrun(tmp_path, "--max_steps", "1", "--output_dir", str(out), tag="second")
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ugd.train: error:" in line]
    assert len(errors) == 1 and "is locked by another ugd.train process" in errors[0], proc.stderr[-3000:]
    assert not (out / "ugd_run_summary.json").exists()
