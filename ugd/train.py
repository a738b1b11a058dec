"""``python -m ugd.train``: the UGD training job, from a laptop demo to eight GPUs.

    python -m ugd.train                                   # the demo: generated data, tiny random-init Qwen2
    python -m ugd.train --model_name_or_path /ckpt --train_file train.jsonl --eval_file dev.jsonl \\
        --num_labels 4 --output_dir out/run1 --bf16
    python -m ugd.train --preset paper --model_name_or_path /ckpt --train_file ... # the paper's recipe
    python -m ugd.train --config run.yaml --learning_rate 1e-5   # any argument from a file; the command line wins
    torchrun --nproc_per_node 8 -m ugd.train --config run.yaml   # DDP (FSDP: --fsdp ... as in transformers)
    python -m ugd.train --config run.yaml --resume_from_checkpoint true   # the newest complete checkpoint

Arguments are four dataclasses parsed by ``transformers.HfArgumentParser`` (``ugd.training.args``):
``ModelArguments``, ``DataArguments``, ``UGDArguments``, and ``transformers.TrainingArguments`` (learning rate,
batch size, epochs, bf16, gradient accumulation, activation checkpointing, save/eval/logging steps,
report_to, resume_from_checkpoint, ddp/fsdp settings, ...). ``python -m ugd.train --help`` lists all.

Where a value comes from, lowest priority first: the defaults of ``ugd.training.args`` (report_to tensorboard
when it is installed, bf16 on a GPU that supports it, remove_unused_columns False, ...), the preset
(``--preset NAME``: ``ugd/training/presets/NAME.yaml``; the ``demo`` preset when no ``--train_file`` is
given and no preset is named; ``--preset none`` for none), the ``--config`` file (YAML or JSON,
keys are argument names), the command line.

Outputs in ``--output_dir``: the final UGD checkpoint (``UGDModel.from_pretrained(output_dir)``),
``checkpoint-N/`` folders (each a UGD checkpoint plus Trainer's optimizer/scheduler/RNG state),
``training_curves.png``, TensorBoard events under ``runs/``, ``ugd_run_summary.json``.

The job is built from ``ugd.training``: ``args`` (the arguments, ``parse_args``), ``build`` (the data and
the model), ``trainer`` (``UGDTrainer``); this module runs it (``main``), prints the report and is the
console entry (``cli``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time

import torch
import transformers
from transformers import set_seed
from transformers.trainer_utils import IntervalStrategy

import ugd_ops

from .checkpoint import CheckpointFileError
from .data.collator import UGDCollator
from .data.layout import LayoutConfig
from .data.length_limits import check_model_positions
from .data.records import DataError, RecordDataset
from .data.teachers import TeacherError
from .evaluate import evaluate_model, served_modes
from .modules import attention  # noqa: F401  registers attn_implementation="ugd"
from .serving.generate import generate_reason
from .serving.reason_scores import available
from .training import cpu_bf16
from .training.args import ConfigError, apply_paradigm_defaults, parse_args, resume_value
from .training.build import (apply_lora, build_model, enable_activation_checkpointing, load_data, paradigm_of,
                             peek_ugd_config)
from .training.curves import CURVES_NAME, CurvesCallback
from .training.run_lock import run_lock  # one trainer at a time in an --output_dir
from .training.resume_check import resolve_resume  # another paradigm's/backbone's checkpoint: one line, exit 2
from .training.signals import StopOnSignal  # SIGTERM: checkpoint, then exit 143 (docs/training.md)
from .training.trainer import NonFiniteLossError, UGDTrainer, fsdp_unsupported_reason

logger = logging.getLogger("ugd.train")

SUMMARY_NAME = "ugd_run_summary.json"


class FinalEvaluationError(RuntimeError):
    """The final evaluation failed after training; the trained model and the run summary are saved."""


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


def main(argv: list[str] | None = None, *, callbacks=()) -> dict:
    """Runs the training job; returns the run summary (also written to ``<output_dir>/ugd_run_summary.json``).

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (for programmatic use and tests).

    Raises ``FinalEvaluationError`` when the final evaluation fails: the model and the summary (with the
    error under ``"evaluation"``) are saved first.
    """
    t0 = time.time()
    run = parse_args(argv)
    targs = run.training
    fsdp_refusal = fsdp_unsupported_reason(targs)
    if fsdp_refusal:  # before any model is built (UGDTrainer refuses too)
        raise ConfigError(fsdp_refusal)
    # held until the run ends (the kernel drops it if the process dies): a second trainer into this
    # folder, e.g. a rerun of a study whose orphaned trainer still runs, is refused in one line
    with run_lock(targs.output_dir, enabled=targs.process_index == 0):
        summary = _run(run, t0, callbacks)
    error = summary.get("evaluation", {}).get("error") if isinstance(summary.get("evaluation"), dict) else None
    if error:  # after the model and the summary are saved: the run is kept, its exit status says it is incomplete
        raise FinalEvaluationError(f"the final evaluation failed: {error}; the trained model is saved in "
                                   f"{targs.output_dir} (evaluate it with python -m ugd.evaluate)")
    return summary


def _run(run, t0: float, callbacks) -> dict:
    """The job itself, under the run folder's lock."""
    targs = run.training
    if run.model.cpu_threads:
        torch.set_num_threads(run.model.cpu_threads)
    if targs.bf16 and (targs.use_cpu or not torch.cuda.is_available()):
        notice = cpu_bf16.bf16_slow_notice(cpu_bf16.cpu_flags())  # one line where the CPU lacks bf16 units
        if notice and int(os.environ.get("RANK", "0")) == 0:
            print(notice, file=sys.stderr, flush=True)
    set_seed(targs.seed)
    saved = peek_ugd_config(run.model.model_name_or_path)
    # a paradigm's own training defaults (flipped-kd: LoRA), unless the preset, config or command line set them
    apply_paradigm_defaults(run, paradigm_of(run, saved))
    num_labels = run.ugd.num_labels if "num_labels" in run.explicit else None
    if num_labels is None and saved is not None:
        num_labels = saved.get("num_labels")
    if num_labels is None and run.data.train_file is None:
        num_labels = 4
    if num_labels is not None and num_labels < 2:
        raise ConfigError(f"--num_labels must be >= 2, got {num_labels}")
    train, dev, data_info, num_labels = load_data(run, num_labels)
    for split, text in data_info.items():
        logger.warning("%s data: %s", split, text)

    model, tokenizer = build_model(run, num_labels, train + (dev or []))

    # every sequence (and the reasons shown at the end) inside the backbone's positions
    check_model_positions(model, tokenizer, run.data.max_new_tokens if run.data.num_reasons > 0 else 0,
                          error=ConfigError)
    lora = run.model.lora_r > 0
    if lora:
        apply_lora(model, run.model)
    # transformers >= 5.23 calls it activation_checkpointing; older 5.x (the GPU image's 5.17) gradient_checkpointing
    if getattr(targs, "activation_checkpointing", None) or getattr(targs, "gradient_checkpointing", False):
        enable_activation_checkpointing(model)
    if dev is None and str(getattr(targs.eval_strategy, "value", targs.eval_strategy)) != "no":
        logger.warning("no --eval_file: evaluation during training is off")
        targs.eval_strategy = IntervalStrategy.NO

    layout = LayoutConfig(**model.config.layout) if model.config.layout else LayoutConfig()
    # model_config: paradigms whose batches depend on their options (ullme, flipped-kd)
    collator = UGDCollator(tokenizer, paradigm=model.paradigm, layout=layout, model_config=model.config)
    trainer = UGDTrainer(model=model, args=targs, train_dataset=RecordDataset(train),
                         eval_dataset=RecordDataset(dev) if dev else None, data_collator=collator,
                         tokenizer=tokenizer, callbacks=[CurvesCallback(), StopOnSignal(), *callbacks])
    # counted after UGDTrainer froze the parameters no step of this config trains (freeze_unused_parameters)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    main_process = trainer.is_world_process_zero()
    if main_process:
        print(f"[ugd.train] paradigm {model.config.paradigm}, {num_labels} labels, {n_params / 1e6:.2f}M parameters "
              f"({n_train / 1e6:.2f}M trained{', LoRA r=%d' % run.model.lora_r if lora else ''}), device "
              f"{targs.device}, {targs.world_size} process(es), preset {run.preset or 'none'}, output {targs.output_dir}",
              flush=True)
    t_train = time.time()
    resume = resolve_resume(trainer, resume_value(targs.resume_from_checkpoint), ConfigError)
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t_train

    if lora:  # the final model is a plain UGD checkpoint with the adapters merged
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.backbone = model.backbone.merge_and_unload()
    trainer.save_model(targs.output_dir)

    metrics = _final_trainer_metrics(trainer) if dev else {}
    summary = {
        "output_dir": targs.output_dir,
        "paradigm": model.config.paradigm,
        "num_labels": num_labels,
        "data": data_info,
        "train": {k: v for k, v in result.metrics.items()},
        "global_step": trainer.state.global_step,
        "eval": metrics,
        "train_seconds": train_seconds,
        "versions": _versions(),
        "device": str(targs.device),
        "world_size": targs.world_size,
        # every logged step (loss terms, each head's training-batch accuracy, the KL gate and ramp): the
        # evidence of how teacher and student moved, kept when the checkpoint folders are not
        "log_history": trainer.state.log_history,
    }
    reasons = []
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    generates = "generate" in unwrapped.paradigm.serves(unwrapped.config)
    eval_preds = []
    if main_process and dev:
        # the final evaluation in every mode the model serves (ugd.evaluate: macro-F1, confusion matrix, and
        # ROUGE-L / BLEU of the first --num_reasons reasons, when rouge-score and sacrebleu are installed)
        modes = served_modes(unwrapped.paradigm, unwrapped.config)
        if "reason" in modes and (run.data.num_reasons == 0 or not available()):
            modes.remove("reason")  # the reasons below are still generated and shown, unscored
        try:
            summary["evaluation"], eval_preds = evaluate_model(
                unwrapped, tokenizer, dev, modes, reason_samples=run.data.num_reasons,
                max_new_tokens=run.data.max_new_tokens, batch_size=targs.per_device_eval_batch_size,
                layout=layout, show_progress=False)
        except ValueError as e:  # the trained model is saved: report the problem rather than lose the run
            logger.warning("final evaluation failed: %s", e)
            summary["evaluation"] = {"error": str(e)}
    if main_process and run.data.num_reasons > 0 and generates:
        shown = (dev or train)[: run.data.num_reasons]
        texts = [p["generated_reason"] for p in eval_preds if "generated_reason" in p]
        if len(texts) != len(shown):  # not generated by the evaluation (no eval file, or no score packages)
            texts = generate_reason(unwrapped, tokenizer, shown, max_new_tokens=run.data.max_new_tokens,
                                    layout=layout, show_progress=False)
        for record, text in zip(shown, texts):
            reasons.append({"query": record["query"], "document": record["document"], "label": record.get("label"),
                            "gold_reason": record.get("reason"), "generated_reason": text})
    summary["reasons"] = reasons
    summary["wall_seconds"] = time.time() - t0
    if main_process:
        os.makedirs(targs.output_dir, exist_ok=True)
        with open(os.path.join(targs.output_dir, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        _print_report(summary, metrics, reasons, os.path.join(targs.output_dir, CURVES_NAME))
    return summary


def _final_trainer_metrics(trainer) -> dict:
    """The Trainer's evaluation of the final model. When the run ended on an evaluation (eval_strategy
    "epoch"; "steps", which transformers 5 also runs after the last step) that is the final model's, so
    it is reused instead of evaluating the dev set once more; with eval_strategy "no", or after
    ``load_best_model_at_end`` (the final model is another one), the dev set is evaluated now."""
    state = trainer.state
    if not trainer.args.load_best_model_at_end:
        for entry in reversed(state.log_history):
            if entry.get("step") != state.global_step:
                break
            if "eval_loss" in entry:
                return {k: v for k, v in entry.items() if k != "step"}
    return trainer.evaluate()


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "ugd_ops": getattr(ugd_ops, "__version__", "?"), "cuda": torch.version.cuda}


def _print_report(summary, metrics, reasons, curves_path) -> None:
    lines = ["", f"[ugd.train] done in {summary['wall_seconds']:.1f} s (training {summary['train_seconds']:.1f} s, "
                 f"{summary['global_step']} steps); model saved to {summary['output_dir']}"]
    if metrics:
        n = summary["data"].get("eval", "")
        lines.append(f"evaluation ({n}):")
        modes = summary.get("evaluation", {}).get("modes", {})  # ugd.evaluate's report
        for head, name in (("t", "two-tower   "), ("s", "single-tower")):
            if f"eval_acc_{head}" in metrics:
                f1 = modes.get(name.strip(), {}).get("macro_f1")
                lines.append(f"  {name}  ACC {_fmt(metrics[f'eval_acc_{head}'])}   AUC {_fmt(metrics[f'eval_auc_{head}'])}"
                             + (f"   macro-F1 {_fmt(f1)}" if f1 is not None else ""))
        lines.append(f"  eval loss {_fmt(metrics.get('eval_loss'))}  (chance ACC = 1/{summary['num_labels']})")
        if "reason" in modes:
            r = modes["reason"]
            lines.append(f"  reasons       ROUGE-L {_fmt(r['rouge_l'])}   BLEU {_fmt(r['bleu'])}  on {r['samples']} "
                         f"samples" + (f" ({r['without_gold_reason']} without a gold reason)"
                                       if r["without_gold_reason"] else ""))
    for i, r in enumerate(reasons, 1):
        doc = r["document"] if len(r["document"]) <= 90 else r["document"][:87] + "..."
        lines += [f"reason {i}: query: {r['query']!r}", f"          document: {doc!r}",
                  f"          label {r['label']}, gold reason: {r['gold_reason']!r}",
                  f"          generated: {r['generated_reason']!r}"]
    if os.path.isfile(curves_path):
        lines.append(f"training curves: {curves_path}")
    print("\n".join(lines), flush=True)


def _error(e: Exception) -> None:
    """One line on stderr, from one process: under torchrun every rank meets the same argument or data
    error, and N copies of it would bury it (torchrun itself then reports the failed ranks)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"ugd.train: error: {e}", file=sys.stderr, flush=True)


def cli(argv: list[str] | None = None) -> int:
    """The console entry: errors in data, configuration or training as one line on stderr."""
    try:
        main(argv)
    except (DataError, ConfigError, CheckpointFileError, TeacherError) as e:  # CheckpointFileError: a damaged
        # checkpoint file; TeacherError: flipped-kd's teacher missing (and pairs without teacher_score)
        _error(e)
        return 2
    except (NonFiniteLossError, FinalEvaluationError) as e:
        _error(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
