"""UGD on ``transformers.Trainer``: loss terms in the logs, ACC/AUC per head, UGD checkpoints.

    trainer = UGDTrainer(model=ugd_model, args=TrainingArguments(...), train_dataset=RecordDataset(train),
                         eval_dataset=RecordDataset(dev), data_collator=UGDCollator(tok, paradigm=...),
                         tokenizer=tok)
    trainer.train()                  # resume_from_checkpoint= as usual
    trainer.evaluate()               # eval_loss, eval_acc_t, eval_auc_t, eval_acc_s, eval_auc_s, eval_loss_<term>

What it changes in Trainer:

* ``compute_loss`` calls ``UGDModel(batch)`` (one packed batch dict) and keeps a running sum of every
  loss term; ``log`` adds their means since the last log to the training logs as ``loss_cls_t``,
  ``loss_cls_s``, ``loss_gen``, ``loss_kl``, ``loss_kl_emb`` (unweighted values, averaged over the
  processes), next to Trainer's ``loss`` (the weighted total).
* ``training_step`` stops the run with ``NonFiniteLossError`` naming the step when the loss is NaN or
  inf (on any process), before the optimizer step: no weight is updated with it and no checkpoint is
  written after it, so the last checkpoint on disk is the last good one.
* ``prediction_step`` returns the logits of both heads (``[B, 2, C]``: two-tower, single-tower; NaN
  for a head the paradigm lacks) and the labels; ``compute_metrics`` turns them into ACC and AUC per
  head (``ugd.training.metrics``; AUC is macro one-vs-rest beyond two classes) and adds the eval loss terms.
* Saving: every checkpoint directory, and ``save_model``'s output, is a UGD checkpoint
  (``UGDModel.from_pretrained`` loads it; its backbone loads with ``AutoModelForCausalLM``). Trainer
  adds the optimizer, scheduler, RNG and trainer state as usual. With LoRA the backbone is saved with
  the adapters merged (computed, the live model is not touched) plus ``lora_adapter/`` for resuming.
* Checkpoints are atomic: Trainer writes ``checkpoint-N`` into ``<output_dir>/.ugd-staging/``, and
  only when every file (of every process) is there is it renamed to ``<output_dir>/checkpoint-N``.
  A run killed while saving leaves no ``checkpoint-N`` behind, so ``resume_from_checkpoint=True``
  (the newest ``checkpoint-N``) never picks up a half-written one.
* Resuming loads a UGD checkpoint's weights into the model (``_load_from_checkpoint``).
* Parameters no training step of the model's config uses (``unused_parameters``: FC_s^kl behind the
  stop-gradient, heads of zero-weight terms, an untied LM head without L_gen) are frozen at
  construction, so DDP runs with ``find_unused_parameters=False`` (docs/scaling.md); at the end of a
  distributed run the processes compare parameter checksums (``ReplicaCheckCallback``). ``--fsdp`` on
  the CPU is refused (``fsdp_unsupported_reason``): accelerate would silently not shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import accelerate
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

try:  # a function in newer transformers 5.x; 5.0 has only the Trainer method _rotate_checkpoints
    from transformers.trainer_utils import rotate_checkpoints
except ImportError:
    rotate_checkpoints = None

from .. import checkpoint
from .._files import fsync_dir, fsync_tree
from ..checkpoint import CONFIG_NAME, LORA_ADAPTER_DIR
from ..model import UGDModel
from .metrics import head_metrics

logger = logging.getLogger("ugd.trainer")

STAGING_DIR = ".ugd-staging"
TRAINING_ARGS_NAME = "training_args.bin"
HEAD_NAMES = ("t", "s")  # two-tower, single-tower: the order of the logits in prediction_step


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stopped before the optimizer step."""


# ---------------------------------------------------------------------------------------------
# helpers: models wrapped by peft, saving and loading UGD checkpoints
# ---------------------------------------------------------------------------------------------


def is_peft_model(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is optional
        return False
    return isinstance(module, PeftModel)


def _clean_peft_key(key: str) -> str:
    return ".".join(p for p in key.split(".") if p not in ("base_layer", "token_adapter"))


def merged_backbone_state_dict(peft_model) -> dict:
    """The state dict of the base model of ``peft_model`` with its LoRA adapters and trainable-token
    rows merged in, under the base model's own parameter names -- computed, the model is not changed
    (``merge_and_unload`` would change it, and ``merge_adapter``/``unmerge_adapter`` round). Tensors
    are on the CPU."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    base = peft_model.get_base_model()
    merged = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                if module.merged:
                    merged[_clean_peft_key(name) + ".weight"] = weight.detach().cpu().clone()
                    continue
                w = weight.detach().clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        w += module.get_delta_weight(adapter).to(w.dtype)
                merged[_clean_peft_key(name) + ".weight"] = w.cpu()
            elif isinstance(module, TrainableTokensLayer):
                merged[_clean_peft_key(name) + ".weight"] = module.get_merged_weights(
                    module.active_adapters).detach().cpu().clone()
        out = {}
        for key, value in base.state_dict().items():
            parts = key.split(".")
            if any(p.startswith(("lora_", "trainable_tokens_")) for p in parts):
                continue
            clean = _clean_peft_key(key)
            out[clean] = merged[clean] if clean in merged else value.detach().cpu()
    return out


def save_ugd_checkpoint(model: UGDModel, path: str, tokenizer=None, state_dict: dict | None = None) -> None:
    """Writes ``model`` as a UGD checkpoint to ``path`` (the layout of ``UGDModel.save_pretrained``).

    ``state_dict``: a full state dict of ``model`` (keys ``backbone.*``, ``heads.*``,
    ``document_backbone.*``), as FSDP/DeepSpeed hand it to ``Trainer._save``; default: the live weights.
    A peft-wrapped backbone is saved merged (``merged_backbone_state_dict``), its adapter state in
    ``lora_adapter/`` (for resuming).
    """
    peft = is_peft_model(model.backbone)
    if state_dict is None and not peft:
        model.save_pretrained(path, tokenizer=tokenizer)
        return
    if state_dict is not None and not peft:
        parts = {"backbone": {}, "heads": {}, "document_backbone": {}}
        for k, v in state_dict.items():
            prefix, _, rest = k.partition(".")
            if prefix not in parts:
                raise ValueError(f"unexpected key {k!r} in the UGDModel state dict")
            parts[prefix][rest] = v
        checkpoint.write_checkpoint(path, backbone=model.backbone, backbone_state=parts["backbone"],
                                    document_backbone=model.document_backbone,
                                    document_state=parts["document_backbone"], heads_state=parts["heads"],
                                    config=model.config.to_dict(), tokenizer=tokenizer)
    else:  # peft
        if model.document_backbone is not None:
            raise NotImplementedError("LoRA with the two-backbone 'ttm' baseline is not supported")
        checkpoint.write_checkpoint(path, backbone=model.backbone.get_base_model(),
                                    backbone_state=merged_backbone_state_dict(model.backbone),
                                    lora_adapter=model.backbone, heads_state=model.heads.state_dict(),
                                    config=model.config.to_dict(), tokenizer=tokenizer)


def load_ugd_weights(model: UGDModel, path: str) -> None:
    """Loads the weights of the UGD checkpoint ``path`` into ``model`` in place (same architecture)."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"{path} is not a UGD checkpoint ({CONFIG_NAME} is missing)")
    saved = checkpoint.read_config(path)
    for key in ("paradigm", "num_labels", "kl_dim"):
        if saved.get(key) != getattr(model.config, key):
            raise ValueError(f"{path}: checkpoint has {key}={saved.get(key)!r}, the model {getattr(model.config, key)!r}")
    # a missing/empty/truncated weight file: one error naming it (python -m ugd.train exits 2)
    checkpoint.check_checkpoint_files(path, document_backbone=model.document_backbone is not None,
                                      lora_adapter=os.path.join(path, LORA_ADAPTER_DIR) if is_peft_model(model.backbone) else None)
    if is_peft_model(model.backbone):
        from peft import set_peft_model_state_dict

        adapter = os.path.join(path, LORA_ADAPTER_DIR, "adapter_model.safetensors")
        if not os.path.isfile(adapter):
            raise FileNotFoundError(f"{path}: no {LORA_ADAPTER_DIR}/adapter_model.safetensors to resume LoRA from")
        result = set_peft_model_state_dict(model.backbone, load_file(adapter))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{adapter}: unexpected adapter weights {result.unexpected_keys[:5]}")
    else:
        checkpoint.load_backbone_weights(model.backbone, path)
        if model.document_backbone is not None:
            checkpoint.load_backbone_weights(model.document_backbone,
                                             os.path.join(path, checkpoint.DOCUMENT_BACKBONE_DIR))
    heads, _ = checkpoint.read_heads(path)
    model.heads.load_state_dict({k: v.to(model.head_device) for k, v in heads.items()})


def unused_parameters(model: UGDModel) -> list[str]:
    """Names of trainable parameters that a training step of ``model`` never uses (heads of inactive
    loss terms, an untied LM head without L_gen, the document backbone's LM head): DDP needs
    ``find_unused_parameters=True`` exactly when this is not empty. The paradigm knows which
    (``Paradigm.unused_parameters``)."""
    return model.paradigm.unused_parameters(model)


def freeze_unused_parameters(model) -> list[str]:
    """Sets ``requires_grad=False`` on the parameters ``unused_parameters`` names and returns their names.

    They get no gradient in any step of this config (their loss weight is 0, FC_s^kl sits behind the
    stop-gradient of KL(T || sg(S)), an untied LM head without L_gen), so the optimizer would skip them
    anyway; frozen, they hold no optimizer state and no DDP gradient bucket, and DDP runs without
    ``find_unused_parameters`` (a walk of the autograd graph every step). They are still saved.
    """
    if not hasattr(model, "paradigm"):  # not a UGDModel (Trainer also takes plain models)
        return []
    names = set(unused_parameters(model))
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return sorted(names)


def fsdp_unsupported_reason(args) -> str | None:
    """Why ``args`` (TrainingArguments) asks for FSDP where it cannot run, or None.

    accelerate applies its FSDP plugin only to accelerator process groups (CUDA/NCCL, XPU, NPU, ...):
    for CPU processes (gloo) it drops the plugin without a word, and every process would train the
    whole model unsharded, which is DDP at best. Refused instead of pretending.
    """
    if not getattr(args, "fsdp", None) or args.device.type != "cpu":
        return None
    return (f"--fsdp needs GPUs: accelerate {accelerate.__version__} shards only GPU process groups and on the CPU "
            "(gloo) would train every process on the whole, unsharded model; on CPUs use DDP (torchrun without "
            "--fsdp), on GPUs see docs/scaling.md")


def parameter_checksum(model) -> str:
    """A short hex digest of every parameter's values (float64 sum and sum of squares per tensor, in
    ``named_parameters`` order): equal for bit-identical replicas; what the ranks of a DDP run compare."""
    with torch.no_grad():
        stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                             for _, p in model.named_parameters()]).cpu()
    return hashlib.sha256(stats.numpy().tobytes()).hexdigest()[:16]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


class UGDTrainer(Trainer):
    """``transformers.Trainer`` for ``UGDModel`` (see the module docstring).

    ``tokenizer`` is saved into every checkpoint. It is kept off Trainer's ``processing_class``, which
    would make Trainer align the tokenizer's special tokens with ``model.config`` (a ``UGDConfig``
    here, not a transformers config).
    """

    def __init__(self, *args, tokenizer=None, **kwargs):
        kwargs.setdefault("compute_metrics", self._compute_metrics)
        self.ugd_tokenizer = tokenizer
        self._train_terms: dict[str, torch.Tensor] = {}
        self._train_term_counts: dict[str, int] = {}
        self._eval_terms: dict[str, float] = {}
        self._eval_term_counts: dict[str, int] = {}
        model = kwargs.get("model", args[0] if args else None)
        config = getattr(model, "config", None)
        if config is not None and not hasattr(config, "to_json_string"):
            # Trainer's TensorBoard callback writes model.config.to_json_string() (a transformers config API)
            config.to_json_string = lambda: json.dumps(config.to_dict(), indent=2)
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        why = fsdp_unsupported_reason(targs) if targs is not None else None
        if why:
            raise ValueError(why)
        # before Trainer builds the accelerator, which reads ddp_find_unused_parameters
        if hasattr(model, "paradigm"):  # a UGDModel
            freeze_unused_parameters(model)  # every parameter still trainable is now used by every step
            if targs is not None and targs.ddp_find_unused_parameters is None:
                # Trainer's own default for a model that is not a PreTrainedModel is True: a graph walk per step
                targs.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)
        self.add_callback(ReplicaCheckCallback())

    # ----------------------------------------------------------------- training

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            # global_step counts finished optimizer steps and is restored on resume, so a schedule on it resumes exactly
            self.accelerator.unwrap_model(model).training_step = self.state.global_step
        out = model(inputs)
        if out.loss is None:
            raise ValueError("the batch gave no loss: no sample has a label (and no reason) for the active loss terms")
        if model.training:
            logged = {f"loss_{t}": v for t, v in out.terms.items()}
            logged.update({f"train_{k}": v for k, v in out.stats.items()})
            for name, value in logged.items():
                v = value.detach().float()
                self._train_terms[name] = self._train_terms[name] + v if name in self._train_terms else v
                self._train_term_counts[name] = self._train_term_counts.get(name, 0) + 1
        return (out.loss, out) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
        if _distributed():  # every process stops together (else the others hang in the next all-reduce)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite.item()):
            step = self.state.global_step + 1
            last = self._last_checkpoint()
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {step} (epoch {self.state.epoch or 0:.2f}); stopped "
                f"before the optimizer step, nothing saved after it; {where}. Lower the learning rate, check the "
                f"data, or use bf16 instead of fp16")
        return loss

    def _last_checkpoint(self) -> str | None:
        d = self.args.output_dir
        return get_last_checkpoint(d) if d and os.path.isdir(d) else None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._train_term_counts:
            names = sorted(self._train_terms)
            device = self._train_terms[names[0]].device
            values = torch.stack([self._train_terms[n] / self._train_term_counts[n] for n in names]).to(device)
            if _distributed():
                torch.distributed.all_reduce(values)
                values /= torch.distributed.get_world_size()
            for n, v in zip(names, values.tolist()):
                logs[n] = v
            self._train_terms.clear()
            self._train_term_counts.clear()
        super().log(logs, start_time)

    # ----------------------------------------------------------------- evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        serves = unwrapped.paradigm.serves(unwrapped.config)
        with torch.no_grad():
            out = model(inputs)  # eval mode, compute=None: the loss terms and the heads they need
            want = []
            if "score_pairs" in serves and out.logits_t is None:
                want.append("two_tower")
            if "single_tower" in serves and out.logits_s is None:
                want.append("single_tower")
            if want and not prediction_loss_only:  # a head no active loss term needs (a zero weight)
                extra = model(inputs, compute=tuple(want))
                out.logits_t = out.logits_t if out.logits_t is not None else extra.logits_t
                out.logits_s = out.logits_s if out.logits_s is not None else extra.logits_s
        for term, value in out.terms.items():
            self._eval_terms[term] = self._eval_terms.get(term, 0.0) + float(value)
            self._eval_term_counts[term] = self._eval_term_counts.get(term, 0) + 1
        loss = out.loss.detach() if out.loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        labels = inputs["labels"]
        ref = out.logits_t if out.logits_t is not None else out.logits_s
        nan = torch.full_like(ref, float("nan"))
        logits = torch.stack([(out.logits_t if out.logits_t is not None else nan).float(),
                              (out.logits_s if out.logits_s is not None else nan).float()], dim=1)
        return loss, logits, labels

    def _compute_metrics(self, eval_pred) -> dict:
        logits = torch.as_tensor(eval_pred.predictions)
        labels = torch.as_tensor(eval_pred.label_ids)
        metrics = {}
        for i, head in enumerate(HEAD_NAMES):
            head_logits = logits[:, i]
            if torch.isnan(head_logits).all():
                continue
            for name, value in head_metrics(head_logits, labels).items():
                metrics[f"{name}_{head}"] = value
        # the loss terms of this evaluation, averaged over batches and processes
        names = sorted(self._eval_terms)
        if names:
            sums = torch.tensor([self._eval_terms[n] for n in names] + [self._eval_term_counts[n] for n in names],
                                dtype=torch.float64, device=self.args.device)
            if _distributed():
                torch.distributed.all_reduce(sums)
            k = len(names)
            for j, n in enumerate(names):
                metrics[f"loss_{n}"] = float(sums[j] / sums[k + j])
        self._eval_terms.clear()
        self._eval_term_counts.clear()
        return metrics

    def evaluate(self, *args, **kwargs):
        self._eval_terms.clear()
        self._eval_term_counts.clear()
        return super().evaluate(*args, **kwargs)

    # ----------------------------------------------------------------- saving and loading

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_ugd_checkpoint(model, output_dir, tokenizer=self.ugd_tokenizer, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _barrier(self) -> None:
        if _distributed():
            torch.distributed.barrier()

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written under ``.ugd-staging/`` and renamed into place when complete."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = os.path.join(run_dir, STAGING_DIR, name)
        final = os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left over from a save that was killed
        self._barrier()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotation happens below, in run_dir, after the rename
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
            self.args.save_total_limit = limit
        self._barrier()  # every process has written its files (rng_state_<rank>.pth)
        if self.args.should_save:
            fsync_tree(staged)
            if os.path.exists(final):  # the same step saved again (e.g. after resuming): replace it
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(staged, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staged, final)
            try:  # the staging folder is only for saves in progress: leave none behind
                os.rmdir(os.path.join(run_dir, STAGING_DIR))
            except OSError:
                pass  # not empty (another save's leftovers) or already gone
            fsync_dir(run_dir)
            if self.state.best_global_step:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if os.path.exists(best):
                    self.state.best_model_checkpoint = best
            if rotate_checkpoints is not None:
                rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            else:  # reads args.save_total_limit (restored above) and state.best_model_checkpoint
                self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        self._barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        load_ugd_weights(self.accelerator.unwrap_model(model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_ugd_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


# ---------------------------------------------------------------------------------------------
# callbacks
# ---------------------------------------------------------------------------------------------


class ReplicaCheckCallback(TrainerCallback):
    """At the end of a distributed run, compares ``parameter_checksum`` across the processes: the main
    one prints ``parameters identical on all N processes (checksum C)``, or a warning naming the ranks
    that differ (a replica that drifted: a bug, or non-deterministic kernels under FSDP/DeepSpeed)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None or not _distributed() or args.fsdp or args.deepspeed:
            return  # sharded (FSDP, DeepSpeed ZeRO): each process holds only its shard
        digest = parameter_checksum(model)
        world = torch.distributed.get_world_size()
        digests = [None] * world
        torch.distributed.all_gather_object(digests, digest)
        if state.is_world_process_zero:
            if len(set(digests)) == 1:
                print(f"[ugd.train] parameters identical on all {world} processes (checksum {digest})", flush=True)
            else:
                logger.warning("parameters differ across processes: %s",
                               ", ".join(f"rank {r}: {d}" for r, d in enumerate(digests)))


__all__ = [
    "LORA_ADAPTER_DIR",
    "STAGING_DIR",
    "NonFiniteLossError",
    "ReplicaCheckCallback",
    "UGDTrainer",
    "freeze_unused_parameters",
    "fsdp_unsupported_reason",
    "load_ugd_weights",
    "merged_backbone_state_dict",
    "parameter_checksum",
    "save_ugd_checkpoint",
    "unused_parameters",
]
