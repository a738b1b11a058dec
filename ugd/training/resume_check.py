"""Before ``--resume_from_checkpoint`` loads anything: does the checkpoint belong to this run's model?

Without this check, a checkpoint of another paradigm stops the run with ``load_ugd_weights``'
``ValueError`` traceback, one of another backbone (other hidden size, layers, vocabulary) with
PyTorch's ``size mismatch`` traceback listing dozens of tensors, and ``--resume_from_checkpoint true``
in an output folder without a checkpoint with Trainer's ``No valid checkpoint found`` traceback.
``resolve_resume`` turns each into one line naming the mismatch, before any training step, reading
only small files (``ugd_config.json``, ``config.json``, safetensors headers), never the tensors.
"""

from __future__ import annotations

import json
import os

from safetensors import safe_open
from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint import CONFIG_NAME, DOCUMENT_BACKBONE_DIR, HEADS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from .trainer import _clean_peft_key, is_peft_model

#: UGDConfig fields a checkpoint must share with the model to resume it (the heads' shapes and meaning)
UGD_FIELDS = ("paradigm", "num_labels", "kl_dim", "head_activation")
#: backbone config fields that name a shape difference better than a tensor name does
BACKBONE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "vocab_size", "tie_word_embeddings")
HINT = "resume with the arguments that checkpoint was trained with, or start a new --output_dir"


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e.__class__.__name__}: {e})") from None


def _shapes(files: list[str]) -> dict[str, tuple] | None:
    """tensor name -> shape, from the safetensors headers only; None when a file cannot be read (the
    loader then names the damaged file: ``ugd.checkpoint``)."""
    shapes = {}
    try:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    except Exception:  # safetensors raises its own error type for a damaged header
        return None
    return shapes


def _weight_files(folder: str) -> list[str]:
    single, index = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        return [os.path.join(folder, s) for s in sorted(set(_json(index)["weight_map"].values()))]
    return []


def _model_shapes(module) -> dict[str, tuple]:
    """The shapes the checkpoint files hold for ``module``: a peft-wrapped backbone is saved merged,
    under its base model's names (``ugd.training.trainer.merged_backbone_state_dict``)."""
    if is_peft_model(module):
        return {_clean_peft_key(k): tuple(v.shape) for k, v in module.get_base_model().state_dict().items()
                if not any(p.startswith(("lora_", "trainable_tokens_")) for p in k.split("."))}
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _compare(what: str, file: str, saved: dict[str, tuple] | None, mine: dict[str, tuple],
             tied_ok: bool) -> str | None:
    if saved is None:
        return None
    for key in sorted(mine):
        if key in saved and saved[key] != mine[key]:
            return (f"{what} {key} is {list(saved[key])} in {file}, {list(mine[key])} in this run's model")
    extra = sorted(set(saved) - set(mine))
    if extra:
        return f"{file} holds {what} this run's model lacks ({', '.join(extra[:3])})"
    # a key absent from the file is fine when tied to one that is there (lm_head <-> embed_tokens)
    missing = sorted(k for k in set(mine) - set(saved) if not (tied_ok and k.endswith("lm_head.weight")))
    if missing:
        return f"{file} lacks {what} this run's model has ({', '.join(missing[:3])})"
    return None


def mismatch(model, path: str) -> str | None:
    """Why the UGD checkpoint ``path`` cannot be resumed into ``model`` (one line), or None when it fits."""
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        return f"{path} is not a UGD checkpoint ({CONFIG_NAME} is missing)"
    saved = _json(cfg_file)
    for name in UGD_FIELDS:
        theirs, mine = saved.get(name), getattr(model.config, name, None)
        if theirs != mine:
            return f"{path} was trained with {name} {theirs!r}, this run has {name} {mine!r}"
    for sub, backbone in (("", model.backbone), (DOCUMENT_BACKBONE_DIR, model.document_backbone)):
        if backbone is None:
            continue
        folder = os.path.join(path, sub) if sub else path
        bb_config = os.path.join(folder, "config.json")
        if os.path.isfile(bb_config):
            theirs = _json(bb_config)
            mine = backbone.get_base_model().config if hasattr(backbone, "get_base_model") else backbone.config
            for name in BACKBONE_FIELDS:
                a, b = theirs.get(name), getattr(mine, name, None)
                if a is not None and b is not None and a != b:
                    return f"{path} has another backbone: {name} {a!r} there, {b!r} in this run's model"
        files = _weight_files(folder)
        if files:
            why = _compare("backbone weight", files[0] if len(files) == 1 else folder, _shapes(files),
                           _model_shapes(backbone), tied_ok=True)
            if why:
                return why
    heads = os.path.join(path, HEADS_NAME)
    if os.path.isfile(heads):
        why = _compare("head weight", heads, _shapes([heads]), _model_shapes(model.heads), tied_ok=False)
        if why:  # e.g. paradigm options that size the heads (d2llm iem_hidden, an own or a separate teacher)
            return why
    return None


def resolve_resume(trainer, value, error=ValueError):
    """The checkpoint ``trainer.train(resume_from_checkpoint=value)`` would load -- ``True`` resolved to
    the newest complete ``checkpoint-N`` of the output folder -- after checking it fits the model;
    ``error(one line)`` otherwise, before anything is loaded or trained. ``None`` stays ``None``."""
    if value is None or value is False:
        return None

    out = trainer.args.output_dir
    if value is True:
        path = get_last_checkpoint(out) if out and os.path.isdir(out) else None
        if path is None:
            raise error(f"--resume_from_checkpoint true: no complete checkpoint-N in {out} to resume from "
                        "(drop the flag to start afresh, or name a checkpoint folder)")
    else:
        path = str(value)
        if not os.path.isdir(path):
            raise error(f"--resume_from_checkpoint {path}: no such checkpoint folder")
    try:
        why = mismatch(trainer.accelerator.unwrap_model(trainer.model), path)
    except ValueError as e:  # an unreadable config.json or index
        why = str(e)
    if why:
        raise error(f"--resume_from_checkpoint: {why}; {HINT}")
    return path


__all__ = ["mismatch", "resolve_resume"]
