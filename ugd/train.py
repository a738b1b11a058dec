"""``python -m ugd.train``: the UGD training job, from a laptop demo to eight GPUs.

    python -m ugd.train                                   # the demo: generated data, tiny random-init Qwen2
    python -m ugd.train --model_name_or_path /ckpt --train_file train.jsonl --eval_file dev.jsonl \\
        --num_labels 4 --output_dir out/run1 --bf16
    python -m ugd.train --preset paper --model_name_or_path /ckpt --train_file ... # the paper's recipe
    python -m ugd.train --config run.yaml --learning_rate 1e-5   # any argument from a file; the command line wins
    torchrun --nproc_per_node 8 -m ugd.train --config run.yaml   # DDP (FSDP: --fsdp ... as in transformers)
    python -m ugd.train --config run.yaml --resume_from_checkpoint true   # the newest complete checkpoint

Arguments are four dataclasses parsed by ``transformers.HfArgumentParser``: ``ModelArguments``,
``DataArguments``, ``UGDArguments`` below, and ``transformers.TrainingArguments`` (learning rate,
batch size, epochs, bf16, gradient accumulation, activation checkpointing, save/eval/logging steps,
report_to, resume_from_checkpoint, ddp/fsdp settings, ...). ``python -m ugd.train --help`` lists all.

Where a value comes from, lowest priority first: the defaults of this module (report_to tensorboard
when it is installed, bf16 on a GPU that supports it, remove_unused_columns False, ...), the preset
(``--preset NAME``: ``ugd/training/presets/NAME.yaml``; the ``demo`` preset when no ``--train_file`` is
given and no preset is named; ``--preset none`` for none), the ``--config`` file (YAML or JSON,
keys are argument names), the command line.

Outputs in ``--output_dir``: the final UGD checkpoint (``UGDModel.from_pretrained(output_dir)``),
``checkpoint-N/`` folders (each a UGD checkpoint plus Trainer's optimizer/scheduler/RNG state),
``training_curves.png``, TensorBoard events under ``runs/``, ``ugd_run_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

logger = logging.getLogger("ugd.train")

SUMMARY_NAME = "ugd_run_summary.json"


class ConfigError(ValueError):
    """A bad argument, preset or config file."""


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A local folder: a causal-LM checkpoint (AutoModelForCausalLM + AutoTokenizer; the UGD special "
                "tokens are added) or a UGD checkpoint (with ugd_config.json: UGDModel.from_pretrained); a .gguf file "
                "or a registered name (smollm2-135m), dequantised once into $UGD_CACHE_DIR (docs/backbones.md). "
                "Default: a tiny random-init backbone (ugd.data.demo.tiny_backbone_config) with a word-level "
                "tokenizer built offline from the data."})
    backbone_family: str = field(default="qwen2", metadata={
        "help": "Random-init backbone only: qwen2 or llama."})
    backbone_config: str | None = field(default=None, metadata={
        "help": "Random-init backbone only: JSON object of config overrides, e.g. "
                "'{\"hidden_size\": 64, \"num_hidden_layers\": 1}' (a mapping in a --config file)."})
    attn_implementation: str = field(default="ugd", metadata={
        "help": "ugd (partitioned-attention kernels, no T x T mask), or eager/sdpa (a dense mask: reference only)."})
    torch_dtype: str = field(default="float32", metadata={
        "help": "dtype the backbone is loaded in: float32 (default; use --bf16 for mixed precision), bfloat16, "
                "float16 or auto (the checkpoint's)."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "torch.set_num_threads on the CPU (default: torch's choice). On a small shared machine 1 can be "
                "much faster than oversubscribed cores (the demo preset sets 1)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 (default) = full fine-tuning."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "Modules LoRA adapts: all-linear (every linear layer but the LM head) or names such as q_proj v_proj."})
    lora_train_special_tokens: bool = field(default=True, metadata={
        "help": "With LoRA, train the embedding rows of [CLS] [gMask] [Start] (peft trainable_token_indices)."})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={
        "help": "Training data (ugd.data.records.read_records: UGD jsonl, LCQMC/BQ/ATEC tsv, QQP tsv, SNLI/MultiNLI jsonl, "
                "e-SNLI csv). "
                "Default: the built-in generated demo data (ugd.data.demo.demo_splits)."})
    eval_file: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
    data_format: str = field(default="auto", metadata={
        "help": "auto (by extension and header), jsonl (UGD records), lcqmc (text_a<TAB>text_b<TAB>label; also BQ, "
                "ATEC), qqp (Quora TSV), nli (SNLI/MultiNLI jsonl) or esnli (e-SNLI's esnli_*.csv: Sentence1, "
                "Sentence2, gold_label, Explanation_1 as the reason, all explanations as references); see ugd.data.records "
                "and docs/training.md."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on the first N records of --train_file only (a quick run on a large file)."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on the first N records of --eval_file only."})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "Skip malformed lines (counted and reported) instead of stopping at the first one."})
    demo_train_size: int = field(default=2000, metadata={"help": "Demo data: training pairs."})
    demo_eval_size: int = field(default=400, metadata={"help": "Demo data: evaluation pairs."})
    demo_seed: int = field(default=0, metadata={"help": "Demo data: generator seed."})
    num_reasons: int = field(default=3, metadata={"help": "Reasons to generate for eval pairs at the end."})
    max_new_tokens: int = field(default=48, metadata={"help": "Length limit of a generated reason."})


@dataclass
class UGDArguments:
    preset: str | None = field(default=None, metadata={
        "help": "A preset in ugd/training/presets (demo, paper) or none. Default: demo without --train_file."})
    config: str | None = field(default=None, metadata={
        "help": "A YAML or JSON file of arguments (keys are argument names); the command line wins."})
    paradigm: str = field(default="ugd-ttm", metadata={
        "help": "A registered paradigm (ugd.paradigms; docs/paradigms.md); the list is filled in by _make_parser."})
    paradigm_options: str | None = field(default=None, metadata={
        "help": "The paradigm's own settings as a JSON object, e.g. '{\"temperature\": 0.05}' (a mapping in a "
                "--config file); docs/paradigms.md lists each paradigm's options."})
    num_labels: int | None = field(default=None, metadata={
        "help": "Number of classes. Default: the checkpoint's, 4 for the demo, else max label + 1 of the data."})
    alpha: float = field(default=1.0, metadata={"help": "Weight of CE(Logits_t)."})
    beta: float = field(default=1.0, metadata={"help": "Weight of CE(Logits_s)."})
    gamma: float = field(default=1.0, metadata={"help": "Weight of the reason generation loss."})
    lam: float = field(default=10.0, metadata={"help": "Weight of KL(P || sg(Q)) on the logits."})
    mu: float = field(default=10.0, metadata={"help": "Weight of KL(T || sg(S)) on the KL projections."})
    detach: bool = field(default=True, metadata={
        "help": "Stop the gradient on the teacher (single-tower) side of the KL terms; --no-detach for the ablation."})
    kl_dim: int = field(default=256, metadata={"help": "Size K of the KL projections."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Temperature of the KL terms."})
    head_activation: str = field(default="gelu", metadata={"help": "Non-linearity of FC_t: gelu, tanh or relu."})
    max_query_len: int = field(default=64, metadata={"help": "Query span length, [CLS] included."})
    max_document_len: int = field(default=512, metadata={"help": "Document span length, [CLS] included."})
    max_reason_len: int = field(default=256, metadata={"help": "Reason span length, [Start] included."})
    prompt: str = field(default="because [gMask], the correlation score is [CLS]", metadata={
        "help": "The P span's text (must contain [gMask] and end with [CLS])."})
    position_mode: str = field(default="restart", metadata={"help": "restart or continuous (docs/spec.md section 4)."})


#: UGDConfig fields set from UGDArguments; the first group fixes the heads' shapes
ARCH_FIELDS = ("paradigm", "num_labels", "kl_dim", "head_activation")
LOSS_FIELDS = ("alpha", "beta", "gamma", "lam", "mu", "detach", "kl_temperature")
LAYOUT_FIELDS = ("prompt", "max_query_len", "max_document_len", "max_reason_len", "position_mode")


@dataclass
class RunArguments:
    model: ModelArguments
    data: DataArguments
    ugd: UGDArguments
    training: object  # transformers.TrainingArguments
    explicit: set  # argument names set by the preset, the config file or the command line
    preset: str | None
    sources: dict  # argument name -> "preset NAME" / "config PATH" / "command line"


def _make_parser():
    from transformers import HfArgumentParser, TrainingArguments

    from . import paradigms

    parser = HfArgumentParser((ModelArguments, DataArguments, UGDArguments, TrainingArguments),
                              description="Train a UGD matcher (see docs/training.md).")
    for action in parser._actions:  # the registry decides which paradigms exist
        if action.dest == "paradigm":
            action.choices = paradigms.names()
            action.help = f"The training paradigm, one of: {', '.join(paradigms.names())} (docs/paradigms.md)."

    def error(message):  # argparse's way prints the whole usage (~130 lines) above the one line that matters
        raise ConfigError(f"{message} (python -m ugd.train --help lists the arguments)")

    parser.error = error
    return parser


def load_config_file(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON file of ``argument: value`` pairs as a dict (dashes in keys read as underscores)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            raise ConfigError(f"{where}: bad YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of argument names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _environment_defaults() -> dict:
    import importlib.util

    import torch

    d = {
        "output_dir": "outputs/ugd-run",
        "remove_unused_columns": False,  # the collator needs the whole record
        "label_names": ["labels"],
        "logging_steps": 10,
        "report_to": ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else "none",
        "dataloader_pin_memory": torch.cuda.is_available(),
        # Without CUDA, train on the CPU (its kernels are compiled; other accelerators are not served by
        # ugd_ops). It also tells accelerate that torchrun processes form a multi-CPU (gloo) group: without
        # use_cpu they would run side by side without DDP.
        "use_cpu": not torch.cuda.is_available(),
    }
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        d["bf16"] = True
    return d


def _cli_keys(argv: list[str]) -> set:
    """Argument names given on the command line."""
    parser = _make_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    ns, _ = parser.parse_known_args(argv)
    return set(vars(ns))


def parse_args(argv: list[str] | None = None) -> RunArguments:
    """Command line (+ preset + config file) -> RunArguments. See the module docstring for the priorities."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _make_parser()
    valid = {a.dest for a in parser._actions if a.dest != "help"}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    pre.add_argument("--train_file", "--train-file")
    pre.add_argument("--paradigm")
    pre.error = parser.error  # one line (ConfigError), not this helper parser's usage
    known, _ = pre.parse_known_args(argv)
    from . import paradigms

    def check_paradigm(name, where):
        if name is not None and name not in paradigms.names():
            raise ConfigError(f"{where}paradigm {name!r} is not registered; the registered paradigms are "
                              f"{', '.join(paradigms.names())} (docs/paradigms.md)")

    check_paradigm(known.paradigm, "--")

    sources: dict = {}
    config_values: dict = {}
    if known.config:
        config_values = load_config_file(known.config)
        unknown = sorted(set(config_values) - valid)
        if unknown:
            raise ConfigError(f"{known.config}: unknown argument(s) {unknown} (see python -m ugd.train --help)")
    preset = known.preset if known.preset is not None else config_values.get("preset")
    if preset is None and not (known.train_file or config_values.get("train_file")):
        preset = "demo"
    preset_values: dict = {}
    if preset and preset != "none":
        from .training.presets import preset_path

        try:
            path = preset_path(preset)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        preset_values = load_config_file(path)
        unknown = sorted(set(preset_values) - valid)
        if unknown:
            raise ConfigError(f"{path}: unknown argument(s) {unknown}")
    cli = _cli_keys(argv)

    values = _environment_defaults()
    for source, d in ((f"preset {preset}", preset_values), (f"config {known.config}", config_values)):
        values.update(d)
        sources.update({k: source for k in d})
    sources.update({k: "command line" for k in cli})
    parser.set_defaults(**values)
    try:
        model_args, data_args, ugd_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # TrainingArguments.__post_init__ checks
        raise ConfigError(str(e)) from e
    ugd_args.preset = preset
    check_paradigm(ugd_args.paradigm, f"{sources.get('paradigm', 'the default')}: ")  # a config file's value
    from .training.checks import output_dir_problem, training_numbers_problem

    # before any data is read or model built: these would otherwise train silently or fail deep inside
    problem = training_numbers_problem(training_args) or output_dir_problem(training_args.output_dir)
    if problem:
        raise ConfigError(problem)
    explicit = set(preset_values) | set(config_values) | cli
    return RunArguments(model_args, data_args, ugd_args, training_args, explicit, preset, sources)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _peek_ugd_config(path: str | None) -> dict | None:
    from .model import CONFIG_NAME

    if path and os.path.isfile(os.path.join(path, CONFIG_NAME)):
        with open(os.path.join(path, CONFIG_NAME)) as f:
            return json.load(f)
    return None


def load_data(run: RunArguments, num_labels: int | None):
    """(train records, eval records or None, {split: description}, num_labels)."""
    from .data.records import read_records

    d = run.data
    if d.train_file is None:
        from .data.demo import demo_splits

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
    from .data.records import check_format

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
        from .training.checks import label_gaps_warning

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
    import torch

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
    from .data.layout import LayoutConfig

    values = dict(base or {})
    for name in LAYOUT_FIELDS:
        if base is None or name in run.explicit:
            values[name] = getattr(run.ugd, name)
    try:
        return LayoutConfig(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _ugd_config(run: RunArguments, num_labels: int, layout):
    from .model import UGDConfig

    u = run.ugd
    kwargs = {n: getattr(u, n) for n in ARCH_FIELDS + LOSS_FIELDS}
    kwargs["num_labels"] = num_labels
    try:
        return UGDConfig(layout=layout.to_dict(), options=paradigm_options(u.paradigm_options), **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _json_object(value, flag: str) -> dict:
    """A JSON object on the command line, a mapping in a config file, or None ({}); ConfigError naming ``flag``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} is not a JSON object ({e.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {value!r}")
    return parsed


def paradigm_options(value) -> dict:
    """``--paradigm_options``: a JSON object on the command line, a mapping in a config file, or None."""
    return _json_object(value, "--paradigm_options")


def _backbone_overrides(text) -> dict:
    return _json_object(text, "--backbone_config")


def build_model(run: RunArguments, num_labels: int, records: list[dict]):
    """(UGDModel, tokenizer) from ``--model_name_or_path`` (or a random-init tiny backbone)."""
    from transformers import AutoModelForCausalLM

    from .data.layout import load_tokenizer
    from .model import UGDModel

    m = run.model
    path = m.model_name_or_path
    if path is not None:  # a .gguf file or a registered name becomes a plain HF folder (ugd.backbones)
        from .backbones import BackboneError, resolve_backbone

        try:
            path = resolve_backbone(path)
        except BackboneError as e:
            raise ConfigError(f"--model_name_or_path: {e}") from None
    dtype = _dtype(m.torch_dtype)
    saved = _peek_ugd_config(path)
    if path is None:
        from .data.demo import build_tokenizer, tiny_backbone_config

        tokenizer = build_tokenizer(records)
        overrides = _backbone_overrides(m.backbone_config)
        if "max_position_embeddings" not in overrides:  # room for the layout's longest sequence
            from .data.length_limits import positions_needed, prompt_length

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
        from .checkpoint_files import check_backbone_folder

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


def _enable_activation_checkpointing(model) -> None:
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


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _resume_value(value):
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in ("true", "last", "latest", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", ""):
        return None
    return value


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


def main(argv: list[str] | None = None, *, callbacks=()) -> dict:
    """Runs the training job; returns the run summary (also written to ``<output_dir>/ugd_run_summary.json``).

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (for programmatic use and tests).
    """
    t0 = time.time()
    run = parse_args(argv)
    import torch
    from transformers import set_seed

    from .modules import attention  # noqa: F401  registers attn_implementation="ugd"
    from .data.collator import UGDCollator
    from .data.records import RecordDataset
    from .serving.generate import generate_reason
    from .data.layout import LayoutConfig
    from .training.trainer import (CURVES_NAME, CurvesCallback, UGDTrainer, freeze_unused_parameters,
                          fsdp_unsupported_reason)
    from .training.signals import StopOnSignal  # SIGTERM: checkpoint, then exit 143 (docs/training.md)

    targs = run.training
    fsdp_refusal = fsdp_unsupported_reason(targs)
    if fsdp_refusal:  # before any model is built (UGDTrainer refuses too)
        raise ConfigError(fsdp_refusal)
    if run.model.cpu_threads:
        torch.set_num_threads(run.model.cpu_threads)
    set_seed(targs.seed)
    saved = _peek_ugd_config(run.model.model_name_or_path)
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
    from .data.length_limits import check_model_positions

    # every sequence (and the reasons shown at the end) inside the backbone's positions
    check_model_positions(model, tokenizer, run.data.max_new_tokens if run.data.num_reasons > 0 else 0,
                          error=ConfigError)
    # a paradigm's own training defaults (flipped-kd: LoRA), unless the preset, config or command line set them
    for name, value in model.config.paradigm_impl.train_defaults.items():
        if name not in run.explicit and hasattr(run.model, name):
            setattr(run.model, name, value)
    lora = run.model.lora_r > 0
    if lora:
        apply_lora(model, run.model)
    # transformers >= 5.23 calls it activation_checkpointing; older 5.x (the GPU image's 5.17) gradient_checkpointing
    if getattr(targs, "activation_checkpointing", None) or getattr(targs, "gradient_checkpointing", False):
        _enable_activation_checkpointing(model)
    # parameters no step of this config trains are frozen (FC_s^kl behind the stop-gradient, a head whose
    # loss weight is 0, ...: ugd.training.trainer.freeze_unused_parameters), so DDP needs no unused-parameter search;
    # UGDTrainer does it too, this is for the count printed below
    freeze_unused_parameters(model)
    if dev is None and str(getattr(targs.eval_strategy, "value", targs.eval_strategy)) != "no":
        from transformers.trainer_utils import IntervalStrategy

        logger.warning("no --eval_file: evaluation during training is off")
        targs.eval_strategy = IntervalStrategy.NO

    layout = LayoutConfig(**model.config.layout) if model.config.layout else LayoutConfig()
    # model_config: paradigms whose batches depend on their options (ullme, flipped-kd)
    collator = UGDCollator(tokenizer, paradigm=model.config.paradigm, config=layout, model_config=model.config)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = UGDTrainer(model=model, args=targs, train_dataset=RecordDataset(train),
                         eval_dataset=RecordDataset(dev) if dev else None, data_collator=collator,
                         tokenizer=tokenizer, callbacks=[CurvesCallback(), StopOnSignal(), *callbacks])
    main_process = trainer.is_world_process_zero()
    if main_process:
        print(f"[ugd.train] paradigm {model.config.paradigm}, {num_labels} labels, {n_params / 1e6:.2f}M parameters "
              f"({n_train / 1e6:.2f}M trained{', LoRA r=%d' % run.model.lora_r if lora else ''}), device "
              f"{targs.device}, {targs.world_size} process(es), preset {run.preset or 'none'}, output {targs.output_dir}",
              flush=True)
    t_train = time.time()
    from .training.resume_check import resolve_resume  # another paradigm's/backbone's checkpoint: one line, exit 2

    resume = resolve_resume(trainer, _resume_value(targs.resume_from_checkpoint), ConfigError)
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t_train

    if lora:  # the final model is a plain UGD checkpoint with the adapters merged
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.backbone = model.backbone.merge_and_unload()
    trainer.save_model(targs.output_dir)

    metrics = trainer.evaluate() if dev else {}
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
    }
    reasons = []
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    generates = "generate" in unwrapped.paradigm.serves(unwrapped.config)
    eval_preds = []
    if main_process and dev:
        # the final evaluation in every mode the model serves (ugd.evaluate: macro-F1, confusion matrix, and
        # ROUGE-L / BLEU of the first --num_reasons reasons, when rouge-score and sacrebleu are installed)
        from .evaluate import evaluate_model, served_modes
        from .serving.reason_scores import available

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


def _versions() -> dict:
    import platform

    import torch
    import transformers

    import ugd_ops

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


def cli(argv: list[str] | None = None) -> int:
    """The console entry: errors in data, configuration or training as one line on stderr."""
    from .checkpoint_files import CheckpointFileError
    from .data.records import DataError
    from .data.teachers import TeacherError
    from .training.trainer import NonFiniteLossError

    try:
        main(argv)
    except (DataError, ConfigError, CheckpointFileError, TeacherError) as e:  # CheckpointFileError: a damaged
        # checkpoint file; TeacherError: flipped-kd's teacher missing (and pairs without teacher_score)
        print(f"ugd.train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"ugd.train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
