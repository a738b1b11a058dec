"""The data and the model of a ``python -m ugd.train`` run, from its arguments (``ugd.training.args``).

    load_data    the training and evaluation records (files, or the built-in demo data) and num_labels
    build_model  UGDModel and tokenizer: a random-init tiny backbone, a causal-LM folder or a UGD checkpoint
    apply_lora   peft LoRA adapters on the backbone
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from ..backbones import BackboneError, resolve_backbone
from ..checkpoint import CONFIG_NAME, check_backbone_folder
from ..data.demo import build_tokenizer, demo_splits, tiny_backbone_config
from ..data.layout import LayoutConfig, load_tokenizer
from ..data.length_limits import positions_needed, prompt_length
from ..data.records import check_format, read_records
from ..model import UGDConfig, UGDModel
from .args import (ARCH_FIELDS, LAYOUT_FIELDS, LOSS_FIELDS, ConfigError, ModelArguments, RunArguments,
                   backbone_overrides, paradigm_options)
from .checks import label_gaps_warning

logger = logging.getLogger("ugd.train")  # the training job's messages, whichever module writes them


def peek_ugd_config(path: str | None) -> dict | None:
    if path and os.path.isfile(os.path.join(path, CONFIG_NAME)):
        with open(os.path.join(path, CONFIG_NAME)) as f:
            return json.load(f)
    return None


def paradigm_of(run: RunArguments, saved: dict | None) -> str:
    """The paradigm the run trains: a UGD checkpoint's own (``saved``: its ``ugd_config.json``, read as
    ``UGDConfig.from_dict`` reads it), else ``--paradigm``."""
    return saved.get("paradigm", UGDConfig.paradigm) if saved is not None else run.ugd.paradigm


def load_data(run: RunArguments, num_labels: int | None):
    """(train records, eval records or None, {split: description}, num_labels)."""
    d = run.data
    if d.train_file is None:
        train, dev = demo_splits(d.demo_train_size, d.demo_eval_size, seed=d.demo_seed)
        num_labels = num_labels or 4
        for split, records in (("train", train), ("eval", dev)):
            bad = [r["label"] for r in records if not 0 <= r["label"] < num_labels]
            if bad:
                raise ConfigError(f"the demo data has labels 0..3; --num_labels {num_labels} is too small")
        info = {"train": f"built-in demo data: {len(train)} pairs (seed {d.demo_seed})",
                "eval": f"built-in demo data: {len(dev)} pairs"}
        return train, (dev or None), info, num_labels
    for flag, file in (("--train_file", d.train_file), ("--eval_file", d.eval_file)):
        if file and not os.path.isfile(file):  # one line, not read_records' FileNotFoundError traceback
            problem = "a folder, not a data file" if os.path.isdir(file) else "no such file"
            raise ConfigError(f"{flag} {file}: {problem}")

    try:
        check_format(d.data_format)
    except ValueError as e:
        raise ConfigError(f"--data_format: {e}") from None
    for flag, value in (("--max_train_samples", d.max_train_samples), ("--max_eval_samples", d.max_eval_samples)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: expected a count of at least 1 (leave it out for the whole file)")
    kw = dict(fmt=d.data_format, skip_bad=d.skip_bad_records, skip_hint="--skip_bad_records")
    train, stats = read_records(d.train_file, num_labels=num_labels, **kw)
    if not train:
        raise ConfigError(f"{d.train_file}: no training records")
    if num_labels is None:
        num_labels = max(2, max(int(r["label"]) for r in train) + 1)
        logger.warning("num_labels not given: %d, from the largest label of %s", num_labels, d.train_file)

        gaps = label_gaps_warning(stats, num_labels)  # a stray label 7 in a 0..2 file: 8 classes, 5 never seen
        if gaps:
            if logger.hasHandlers():  # without a handler logging itself writes the bare message to stderr
                logger.warning(gaps)
            print(f"ugd.train: warning: {gaps}", file=sys.stderr, flush=True)
    info = {"train": str(stats)}
    # after num_labels: the classes come from the whole file, as they would without the limit
    if d.max_train_samples is not None and d.max_train_samples < len(train):
        train = train[: d.max_train_samples]
        info["train"] += f"; the first {len(train)} used (--max_train_samples)"
    dev = None
    if d.eval_file:
        dev, eval_stats = read_records(d.eval_file, num_labels=num_labels, **kw)
        info["eval"] = str(eval_stats)
        if d.max_eval_samples is not None and d.max_eval_samples < len(dev):
            dev = dev[: d.max_eval_samples]
            info["eval"] += f"; the first {len(dev)} used (--max_eval_samples)"
    return train, dev, info, num_labels


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


def _dtype(name: str):
    if name == "auto":
        return "auto"
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        raise ConfigError(f"--torch_dtype {name!r}: expected float32, bfloat16, float16 or auto") from None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"--torch_dtype {name!r}: expected float32, bfloat16, float16 or auto")
    return dtype


def _layout_from(run: RunArguments, base: dict | None = None):
    values = dict(base or {})
    for name in LAYOUT_FIELDS:
        if base is None or name in run.explicit:
            values[name] = getattr(run.ugd, name)
    try:
        return LayoutConfig(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _ugd_config(run: RunArguments, num_labels: int, layout):
    u = run.ugd
    kwargs = {n: getattr(u, n) for n in ARCH_FIELDS + LOSS_FIELDS}
    kwargs["num_labels"] = num_labels
    try:
        return UGDConfig(layout=layout.to_dict(), options=paradigm_options(u.paradigm_options), **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model(run: RunArguments, num_labels: int, records: list[dict]):
    """(UGDModel, tokenizer) from ``--model_name_or_path`` (or a random-init tiny backbone)."""
    m = run.model
    path = m.model_name_or_path
    if path is not None:  # a .gguf file or a registered name becomes a plain HF folder (ugd.backbones)

        try:
            path = resolve_backbone(path)
        except BackboneError as e:
            raise ConfigError(f"--model_name_or_path: {e}") from None
    dtype = _dtype(m.torch_dtype)
    saved = peek_ugd_config(path)
    if path is None:
        tokenizer = build_tokenizer(records)
        overrides = backbone_overrides(m.backbone_config)
        if "max_position_embeddings" not in overrides:  # room for the layout's longest sequence

            layout = _layout_from(run)
            overrides["max_position_embeddings"] = max(512, positions_needed(
                layout, prompt_length(tokenizer, layout), run.data.max_new_tokens))
        try:
            cfg = tiny_backbone_config(len(tokenizer) + 3, family=m.backbone_family, **overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"random-init backbone: {e}") from None
        backbone = AutoModelForCausalLM.from_config(cfg, attn_implementation="ugd")
        model = UGDModel.from_backbone(backbone, tokenizer, _ugd_config(run, num_labels, _layout_from(run)))
    elif saved is not None:  # a UGD checkpoint: its heads, config and tokenizer
        for name in ARCH_FIELDS:
            if name in run.explicit and name != "num_labels" and getattr(run.ugd, name) != saved.get(name):
                raise ConfigError(f"{path} is a UGD checkpoint with {name}={saved.get(name)!r}; --{name} "
                                  f"{getattr(run.ugd, name)!r} would need new heads (start from its backbone instead)")
        if num_labels != saved.get("num_labels"):
            raise ConfigError(f"{path} is a UGD checkpoint with num_labels={saved.get('num_labels')}, not {num_labels}")
        model = UGDModel.from_pretrained(path, dtype=dtype, attn_implementation="ugd")
        tokenizer = model.tokenizer or load_tokenizer(path)  # from_pretrained loaded the saved one
        for name in LOSS_FIELDS:
            if name in run.explicit:
                setattr(model.config, name, getattr(run.ugd, name))
        if "paradigm_options" in run.explicit:
            model.config.options = {**model.config.options, **paradigm_options(run.ugd.paradigm_options)}
        model.config.layout = _layout_from(run, model.config.layout or {}).to_dict()
        try:
            model.config.__post_init__()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        if not os.path.isdir(path):
            raise ConfigError(f"--model_name_or_path {path}: not a local folder (nothing is downloaded)")

        check_backbone_folder(path)  # a missing/empty/truncated model.safetensors: one error naming it
        tokenizer = load_tokenizer(path)
        backbone = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ugd", dtype=dtype)
        model = UGDModel.from_backbone(backbone, tokenizer, _ugd_config(run, num_labels, _layout_from(run)))
    if dtype not in ("auto", None):
        model.to(dtype)
    if m.attn_implementation != "ugd":
        for bb in (model.backbone, model.document_backbone):
            if bb is not None:
                bb.set_attn_implementation(m.attn_implementation)
    return model, tokenizer


def apply_lora(model, m: ModelArguments):
    """Wraps ``model.backbone`` with peft LoRA adapters (the heads stay fully trained)."""
    from peft import LoraConfig, get_peft_model

    if model.document_backbone is not None:
        raise ConfigError("LoRA is not supported with the two-backbone 'ttm' baseline")
    targets = list(m.lora_target_modules) if not isinstance(m.lora_target_modules, str) else [m.lora_target_modules]
    target = "all-linear" if targets == ["all-linear"] else targets
    ids = model.config.special_token_ids
    token_ids = sorted({ids[k] for k in ("cls", "gmask", "start") if k in ids})
    kwargs = {}
    if m.lora_train_special_tokens and token_ids:
        kwargs["trainable_token_indices"] = {"embed_tokens": token_ids}
    cfg = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=target, **kwargs)
    model.backbone = get_peft_model(model.backbone, cfg)
    return model


def enable_activation_checkpointing(model) -> None:
    """Trainer enables activation checkpointing through ``model.activation_checkpointing_enable``;
    UGDModel forwards it to its backbone(s)."""
    backbones = [b for b in (model.backbone, model.document_backbone) if b is not None]

    def enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        kwargs = dict(activation_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", False)
        for bb in backbones:
            if hasattr(bb, "activation_checkpointing_enable"):
                bb.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                   every_n_layers=every_n_layers, offload=offload)
            else:  # transformers < 5.23 names it gradient checkpointing, without layer skipping or offload
                bb.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def enable_old(gradient_checkpointing_kwargs=None):  # what Trainer calls in transformers < 5.23
        enable(gradient_checkpointing_kwargs)

    model.activation_checkpointing_enable = enable
    model.gradient_checkpointing_enable = enable_old
