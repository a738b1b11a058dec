"""The arguments of ``python -m ugd.train`` and where each value comes from.

Four dataclasses parsed by ``transformers.HfArgumentParser``: ``ModelArguments``, ``DataArguments``,
``UGDArguments`` below, and ``transformers.TrainingArguments``. ``parse_args`` applies them in order of
priority, lowest first: the defaults of this module (``_environment_defaults``), the preset
(``--preset NAME``: ``ugd/training/presets/NAME.yaml``; ``demo`` when no ``--train_file`` is given and no
preset is named), the ``--config`` file (YAML or JSON), the command line. Every problem is a
``ConfigError``: one line on stderr, exit 2 (``ugd.train.cli``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from .. import paradigms
from .checks import output_dir_problem, training_numbers_problem
from .presets import preset_path


class ConfigError(ValueError):
    """A bad argument, preset or config file."""


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
    interaction_positions: int = field(default=0, metadata={
        "help": "Extra positions opening the P span, where the single tower under the TTM mask lets Q and D "
                "interact (0: the paper's layout; docs/paradigms.md). The two tower is unchanged."})
    interaction_fill: str = field(default="gmask", metadata={
        "help": "What fills the interaction positions: gmask (learned [gMask] slots) or query (the query's "
                "first tokens read again after the document)."})


#: UGDConfig fields set from UGDArguments; the first group fixes the heads' shapes
ARCH_FIELDS = ("paradigm", "num_labels", "kl_dim", "head_activation")
LOSS_FIELDS = ("alpha", "beta", "gamma", "lam", "mu", "detach", "kl_temperature")
LAYOUT_FIELDS = ("prompt", "max_query_len", "max_document_len", "max_reason_len", "position_mode",
                 "interaction_positions", "interaction_fill")


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
        # One fused AdamW kernel over all parameters (CPU and CUDA, torch >= 2.4). transformers defaults to
        # it only with torch >= 2.8; on the CPU the unfused loop cost more per step than the attention
        # (docs/performance.md, "bf16 training on the CPU").
        "optim": "adamw_torch_fused",
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

    def check_registered(name, where):
        if name is not None and name not in paradigms.names():
            raise ConfigError(f"{where}paradigm {name!r} is not registered; the registered paradigms are "
                              f"{', '.join(paradigms.names())} (docs/paradigms.md)")

    check_registered(known.paradigm, "--")

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
    check_registered(ugd_args.paradigm, f"{sources.get('paradigm', 'the default')}: ")  # a config file's value

    # before any data is read or model built: these would otherwise train silently or fail deep inside
    problem = training_numbers_problem(training_args) or output_dir_problem(training_args.output_dir)
    if problem:
        raise ConfigError(problem)
    explicit = set(preset_values) | set(config_values) | cli
    return RunArguments(model_args, data_args, ugd_args, training_args, explicit, preset, sources)


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


def backbone_overrides(text) -> dict:
    return _json_object(text, "--backbone_config")



def apply_paradigm_defaults(run: RunArguments, paradigm: str) -> None:
    """Sets the paradigm's ``train_defaults`` (flipped-kd: LoRA) on ``run`` for every argument the preset,
    the config file and the command line left alone: before any data is read or model built, so every
    step of the run sees one set of arguments."""
    if paradigm not in paradigms.names():
        return  # refused where the model is built, with the registered names
    for name, value in paradigms.get(paradigm).train_defaults.items():
        if name not in run.explicit and hasattr(run.model, name):
            setattr(run.model, name, value)


def resume_value(value):
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in ("true", "last", "latest", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", ""):
        return None
    return value
