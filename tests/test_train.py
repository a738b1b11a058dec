"""python -m ugd.train and ugd.training.trainer on tiny configs (CPU): the demo end to end, data errors, resume
after a SIGKILL, atomic checkpoints, NaN stop, checkpoint loading, config files and presets, DDP with
two processes, LoRA, and the reason generator."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import TrainerCallback

from tests.cli_runs import sigkill_once_written
from ugd.data.records import DataError
from ugd.train import cli, main
from ugd.training.args import ConfigError, parse_args
from ugd.training.trainer import STAGING_DIR, NonFiniteLossError, UGDTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_BACKBONE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "num_key_value_heads": 2}
TINY = [
    "--backbone_config", json.dumps(TINY_BACKBONE), "--cpu_threads", "1",
    "--demo_train_size", "64", "--demo_eval_size", "32",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
    "--max_query_len", "16", "--max_document_len", "40", "--max_reason_len", "16", "--kl_dim", "16",
    "--disable_tqdm", "true", "--report_to", "none", "--num_reasons", "0", "--eval_strategy", "no",
    "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no",
]


def run_args(tmp_path, name, *extra):
    return [*TINY, "--output_dir", str(tmp_path / name), *extra]


def train_losses(checkpoint_or_dir) -> dict:
    """step -> the training log entry (loss and loss terms) from a trainer_state.json."""
    with open(os.path.join(checkpoint_or_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return {e["step"]: e for e in history if "loss" in e}


def read_weights(path) -> dict:
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "model.safetensors"))
    state.update({f"heads.{k}": v for k, v in load_file(os.path.join(path, "ugd_heads.safetensors")).items()})
    return state


# ---------------------------------------------------------------------------------------------
# the demo, end to end, and the saved model
# ---------------------------------------------------------------------------------------------


def count_trainer_evaluations(monkeypatch) -> list:
    """Patches UGDTrainer.evaluate to record the global step of each call; returns that list."""
    steps, evaluate = [], UGDTrainer.evaluate

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(UGDTrainer, "evaluate", counted)
    return steps


def test_demo_end_to_end_writes_model_curves_tensorboard_and_loadable_checkpoints(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ugd.data.collator import UGDCollator
    from ugd.data.demo import demo_splits
    from ugd.data.layout import LayoutConfig
    from ugd.training.metrics import head_metrics
    from ugd.model import UGDModel

    out = tmp_path / "demo"
    evaluations = count_trainer_evaluations(monkeypatch)
    summary = main(run_args(tmp_path, "demo", "--max_steps", "30", "--eval_strategy", "steps", "--eval_steps", "15",
                            "--save_strategy", "steps", "--save_steps", "15", "--report_to", "tensorboard",
                            "--num_reasons", "2", "--max_new_tokens", "8", "--logging_steps", "5"))
    printed = capsys.readouterr().out
    assert "two-tower" in printed and "single-tower" in printed and "ACC" in printed and "AUC" in printed
    assert summary["global_step"] == 30
    # the run ended on the step-30 evaluation: the report takes it instead of evaluating the dev set again
    assert evaluations == [15, 30]
    for f in ("ugd_config.json", "ugd_heads.safetensors", "model.safetensors", "config.json", "tokenizer.json",
              "training_curves.png", "ugd_run_summary.json"):
        assert (out / f).is_file(), f
    assert (out / "training_curves.png").stat().st_size > 10_000
    events = [f for _, _, files in os.walk(out / "runs") for f in files if f.startswith("events.out.tfevents")]
    assert events, "no tensorboard event file"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-15",
                                                                                          "checkpoint-30"]
    assert not (out / STAGING_DIR / "checkpoint-30").exists()
    ev = summary["eval"]
    for key in ("eval_loss", "eval_acc_t", "eval_auc_t", "eval_acc_s", "eval_auc_s", "eval_loss_cls_t",
                "eval_loss_gen", "eval_loss_kl", "eval_loss_kl_emb"):
        assert key in ev, key
    logs = train_losses(out / "checkpoint-30")
    assert {"loss", "loss_cls_t", "loss_cls_s", "loss_gen", "loss_kl", "loss_kl_emb"} <= set(logs[30])
    assert len(summary["reasons"]) == 2 and all(isinstance(r["generated_reason"], str) for r in summary["reasons"])

    # the final model and a checkpoint load as UGD checkpoints; the backbone as a plain causal LM
    model = UGDModel.from_pretrained(str(out)).eval()
    assert isinstance(UGDModel.from_pretrained(str(out / "checkpoint-15")), UGDModel)
    assert type(AutoModelForCausalLM.from_pretrained(str(out))).__name__ == "Qwen2ForCausalLM"
    # ... and gives the metrics the run reported (load_tokenizer: see its docstring for why not AutoTokenizer)
    from ugd.data.layout import load_tokenizer

    tok = load_tokenizer(str(out))
    assert tok.convert_ids_to_tokens(tok("red running shoes")["input_ids"]) == ["red", "running", "shoes"]
    _, dev = demo_splits(64, 32, seed=0)
    batch = UGDCollator(tok, paradigm="ugd-ttm", layout=LayoutConfig(**model.config.layout))(dev)
    with torch.no_grad():
        o = model(batch, compute=("two_tower", "single_tower"))
    for head, logits in (("t", o.logits_t), ("s", o.logits_s)):
        m = head_metrics(logits, batch["labels"])
        assert m["acc"] == pytest.approx(ev[f"eval_acc_{head}"], abs=1e-6)
        assert m["auc"] == pytest.approx(ev[f"eval_auc_{head}"], abs=1e-5)


def test_final_trainer_evaluation_runs_when_the_run_did_not_end_on_one(tmp_path, monkeypatch):
    evaluations = count_trainer_evaluations(monkeypatch)
    summary = main(run_args(tmp_path, "tail", "--max_steps", "5"))  # eval_strategy "no", a dev set to report on
    assert evaluations == [5]
    assert summary["eval"]["epoch"] > 0 and "eval_acc_t" in summary["eval"]


def test_own_checkpoint_and_data_then_continue_from_the_ugd_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from ugd.data.demo import demo_splits, tiny_backbone_config, word_level_tokenizer
    from ugd.model import UGDModel

    # a plain local causal-LM checkpoint (as a user's Qwen folder would be) and JSONL data
    train, dev = demo_splits(24, 8, seed=3)
    for r in train + dev:
        r["label"] = int(r["label"] >= 2)  # two classes
    tok = word_level_tokenizer([t for r in train + dev for t in (r["query"], r["document"], r["reason"])]
                               + ["because the correlation score is ,"], lowercase=True)
    lm = AutoModelForCausalLM.from_config(tiny_backbone_config(len(tok), **TINY_BACKBONE))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    from ugd.data.records import write_jsonl

    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(dev, tmp_path / "dev.jsonl")
    data = ("--train_file", str(tmp_path / "train.jsonl"), "--eval_file", str(tmp_path / "dev.jsonl"))
    summary = main(run_args(tmp_path, "run1", "--model_name_or_path", str(tmp_path / "lm"), *data, "--max_steps", "2"))
    assert summary["num_labels"] == 2  # from the data
    assert "eval_acc_t" in summary["eval"] and summary["data"]["train"].endswith("read 24, kept 24")
    first = UGDModel.from_pretrained(str(tmp_path / "run1"))
    assert first.config.lam == 10.0 and first.config.num_labels == 2

    # continue from the UGD checkpoint: its heads and tokenizer; a loss weight changed
    main(run_args(tmp_path, "run2", "--model_name_or_path", str(tmp_path / "run1"), *data, "--max_steps", "1",
                  "--lam", "5"))
    second = UGDModel.from_pretrained(str(tmp_path / "run2"))
    assert second.config.lam == 5.0 and second.config.special_token_ids == first.config.special_token_ids
    with pytest.raises(ConfigError, match="num_labels=2"):
        main(run_args(tmp_path, "run3", "--model_name_or_path", str(tmp_path / "run1"), *data, "--num_labels", "3"))


# ---------------------------------------------------------------------------------------------
# data errors
# ---------------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = [json.dumps({"query": f"red shoes {i}", "document": "red running shoes for sale", "label": i % 2,
                    "reason": "the page sells red shoes"}) for i in range(8)]


def test_malformed_record_names_file_and_line(tmp_path, capsys):
    train = write_lines(tmp_path / "train.jsonl", GOOD[:2] + ['{"query": "x", "document": '] + GOOD[2:])
    with pytest.raises(DataError, match=r"train\.jsonl:3: bad JSON"):
        main(run_args(tmp_path, "bad", "--train_file", train, "--max_steps", "1"))
    assert cli(run_args(tmp_path, "bad", "--train_file", train, "--max_steps", "1")) == 2
    assert "train.jsonl:3" in capsys.readouterr().err


def test_skip_bad_records_counts_them(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", GOOD[:2] + ['{"query": "x", "document": '] + GOOD[2:]
                        + ['{"query": "y", "label": 1}'])
    summary = main(run_args(tmp_path, "skip", "--train_file", train, "--skip_bad_records", "--max_steps", "1",
                            "--num_labels", "2"))
    assert "kept 8" in summary["data"]["train"] and "skipped 2 malformed" in summary["data"]["train"]
    assert "train.jsonl:3" in summary["data"]["train"]


def test_label_out_of_range_is_an_error_naming_the_line(tmp_path):
    bad = json.dumps({"query": "q", "document": "d", "label": 7})
    train = write_lines(tmp_path / "train.jsonl", GOOD[:4] + [bad])
    with pytest.raises(DataError, match=r"train\.jsonl:5: label 7 is out of range for num_labels=4"):
        main(run_args(tmp_path, "range", "--train_file", train, "--num_labels", "4", "--max_steps", "1"))
    with pytest.raises(DataError, match=r"train\.jsonl:5"):  # skip_bad does not hide it
        main(run_args(tmp_path, "range", "--train_file", train, "--num_labels", "4", "--max_steps", "1",
                      "--skip_bad_records"))


# ---------------------------------------------------------------------------------------------
# resume, atomic checkpoints, NaN
# ---------------------------------------------------------------------------------------------

RESUME = ("--max_steps", "10", "--save_strategy", "steps", "--save_steps", "5", "--lr_scheduler_type", "linear")

KILLED_RUN = textwrap.dedent("""
    import sys, time
    from transformers import TrainerCallback
    from ugd.train import main

    class HangAfterSave(TrainerCallback):  # keeps the run alive after checkpoint-5 until it is killed
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 5:
                time.sleep(600)

    main(sys.argv[1:], callbacks=[HangAfterSave()])
""")


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path):
    reference = tmp_path / "reference"
    main(run_args(tmp_path, "reference", *RESUME))
    ref = train_losses(reference / "checkpoint-10")

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *run_args(tmp_path, "killed", *RESUME)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_once_written(proc, killed / "checkpoint-5" / "trainer_state.json")
    assert not (killed / "checkpoint-10").exists()

    main(run_args(tmp_path, "killed", *RESUME, "--resume_from_checkpoint", "true"))
    resumed = train_losses(killed / "checkpoint-10")
    for step in range(6, 11):
        for key in ("loss", "loss_cls_t", "loss_cls_s", "loss_gen", "loss_kl", "loss_kl_emb"):
            assert resumed[step][key] == pytest.approx(ref[step][key], abs=1e-6), (step, key)
    a, b = read_weights(reference), read_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_save_killed_midway_leaves_no_checkpoint_and_resume_takes_the_last_complete_one(tmp_path, monkeypatch):
    original = UGDTrainer._save_rng_state

    def dies_at_step_10(self, output_dir):
        if self.state.global_step == 10:
            raise KeyboardInterrupt("killed while saving")  # after the model and optimizer were written
        return original(self, output_dir)

    monkeypatch.setattr(UGDTrainer, "_save_rng_state", dies_at_step_10)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        main(run_args(tmp_path, "run", *RESUME))
    assert (out / "checkpoint-5" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-10").exists()
    assert (out / STAGING_DIR / "checkpoint-10" / "model.safetensors").is_file()  # the half-written one
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-5")

    monkeypatch.setattr(UGDTrainer, "_save_rng_state", original)
    summary = main(run_args(tmp_path, "run", *RESUME, "--resume_from_checkpoint", "true"))
    assert summary["global_step"] == 10
    assert (out / "checkpoint-10" / "rng_state.pth").is_file()
    assert not (out / STAGING_DIR / "checkpoint-10").exists()


class PoisonWeight(TrainerCallback):
    """Sets a weight to NaN after step ``after``: the next step's loss is NaN."""

    def __init__(self, after: int):
        self.after = after

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.after:
            with torch.no_grad():
                model.heads.classifier.weight.fill_(float("nan"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"nan at step 7 .*checkpoint-5"):
        main(run_args(tmp_path, "nan", *RESUME), callbacks=[PoisonWeight(after=6)])
    assert (out / "checkpoint-5" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-10").exists() and not (out / "ugd_config.json").exists()
    weights = read_weights(out / "checkpoint-5")
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("paradigm,extra", [
    ("ugd-stm", ()),
    ("shared-ttm", ()),
    ("stm", ()),
    ("ttm", ()),  # two backbones
    ("ugd-ttm", ("--gradient_checkpointing", "--gamma", "0")),  # activation checkpointing; a term off
])
def test_every_paradigm_trains_evaluates_and_saves(tmp_path, paradigm, extra):
    from ugd import paradigms
    from ugd.model import UGDModel

    summary = main(run_args(tmp_path, "p", "--paradigm", paradigm, "--max_steps", "2", *extra))
    ev = summary["eval"]
    assert ("eval_acc_t" in ev) == (paradigm in paradigms.names(capability="score_pairs")) and ("eval_acc_s" in ev) == (
        paradigm in paradigms.names(capability="single_tower"))
    model = UGDModel.from_pretrained(str(tmp_path / "p"))
    assert model.config.paradigm == paradigm
    if paradigm == "ugd-ttm":  # gamma = 0: no generation term
        assert "eval_loss_gen" not in ev and "eval_loss_kl" in ev


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_yaml_config_with_command_line_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(textwrap.dedent("""
        train_file: data/train.jsonl
        learning_rate: 5e-6          # YAML reads this as a string; argparse converts it
        per_device_train_batch_size: 4
        alpha: 0.5
        detach: false
        lora_target_modules: [q_proj, v_proj]
        max_reason_len: 77
    """))
    run = parse_args(["--config", str(cfg), "--learning_rate", "1e-4", "--mu", "0"])
    assert run.training.learning_rate == pytest.approx(1e-4)  # the command line wins
    assert run.training.per_device_train_batch_size == 4
    assert run.ugd.alpha == 0.5 and run.ugd.mu == 0.0 and run.ugd.detach is False
    assert run.ugd.max_reason_len == 77 and run.model.lora_target_modules == ["q_proj", "v_proj"]
    assert run.data.train_file == "data/train.jsonl" and run.preset is None  # a train file: no demo preset
    assert run.sources["learning_rate"] == "command line" and run.sources["alpha"].startswith("config ")
    assert "mu" in run.explicit and "gamma" not in run.explicit
    run = parse_args(["--config", str(cfg)])
    assert run.training.learning_rate == pytest.approx(5e-6)

    js = tmp_path / "run.json"
    js.write_text(json.dumps({"train_file": "t.jsonl", "num_train_epochs": 2, "paradigm": "ugd-stm"}))
    run = parse_args(["--config", str(js), "--no-detach"])
    assert run.training.num_train_epochs == 2 and run.ugd.paradigm == "ugd-stm" and run.ugd.detach is False

    bad = tmp_path / "bad.yaml"
    bad.write_text("train_file: t.jsonl\nlearning_rat: 1e-3\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        parse_args(["--preset", "nope"])


def test_paper_preset_has_the_papers_values():
    run = parse_args(["--preset", "paper", "--train_file", "train.jsonl"])
    t = run.training
    assert t.learning_rate == pytest.approx(5e-6)
    assert t.per_device_train_batch_size == 32
    assert (t.adam_beta1, t.adam_beta2) == (0.9, 0.999) and t.weight_decay == 0.0
    assert t.warmup_steps == 4000 and t.num_train_epochs == 5
    assert str(getattr(t.optim, "value", t.optim)) == "adamw_torch"
    assert run.model.lora_r == 0  # full fine-tuning
    u = run.ugd
    assert (u.alpha, u.beta, u.gamma, u.lam, u.mu, u.detach) == (1.0, 1.0, 1.0, 10.0, 10.0, True)
    assert run.sources["learning_rate"] == "preset paper"


def test_no_arguments_selects_the_demo():
    run = parse_args([])
    assert run.preset == "demo" and run.data.train_file is None and run.model.model_name_or_path is None
    assert run.ugd.paradigm == "ugd-ttm" and run.ugd.num_labels == 4
    assert run.training.output_dir == "outputs/ugd-demo"
    assert run.training.remove_unused_columns is False


# ---------------------------------------------------------------------------------------------
# DDP: two processes agree with one on the same global batch
# ---------------------------------------------------------------------------------------------


def test_ddp_two_processes_match_one_process(tmp_path):
    # sum of two half-batch means / 2 = the full-batch mean (every sample has a label and a reason), so
    # with SGD the two runs take the same steps. mu=0 leaves the embedding-KL heads unused: ugd.train
    # freezes them (freeze_unused_parameters), so DDP needs no find_unused_parameters.
    common = ("--max_steps", "3", "--optim", "sgd", "--learning_rate", "0.05", "--train_sampling_strategy",
              "sequential", "--mu", "0", "--lr_scheduler_type", "constant", "--per_device_eval_batch_size", "16")
    main(run_args(tmp_path, "one", *common, "--per_device_train_batch_size", "8"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ugd.train", *run_args(tmp_path, "two", *common, "--per_device_train_batch_size", "4",
                                        "--ddp_backend", "gloo")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(tmp_path / "two" / "ugd_run_summary.json") as f:
        assert json.load(f)["world_size"] == 2
    one, two = read_weights(tmp_path / "one"), read_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    start = read_weights_initial(tmp_path)
    moved = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(one[k], start[k])) if k in start else 0
    assert moved > 0


def read_weights_initial(tmp_path):
    """The untrained weights of the same seed (to check the runs above did move them)."""
    main(run_args(tmp_path, "zero", "--max_steps", "1", "--learning_rate", "0", "--optim", "sgd", "--mu", "0"))
    return read_weights(tmp_path / "zero")


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def test_merged_state_dict_equals_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ugd.data.demo import tiny_backbone_config
    from ugd.training.trainer import merged_backbone_state_dict

    for tied in (True, False):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(tiny_backbone_config(40, tie_word_embeddings=tied, **TINY_BACKBONE))
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             trainable_token_indices={"embed_tokens": [3, 5]}))
        with torch.no_grad():  # adapters start as a no-op (B = 0): give them values
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        merged = merged_backbone_state_dict(pm)
        reference = copy.deepcopy(pm).merge_and_unload().state_dict()
        assert set(reference) <= set(merged) and set(merged) - set(reference) <= {"lm_head.weight"}
        for k, v in reference.items():
            torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")


def test_lora_run_saves_merged_checkpoints_and_resumes_exactly(tmp_path):
    from ugd.model import UGDModel

    lora = ("--lora_r", "4", "--lora_alpha", "8", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
            "--lr_scheduler_type", "constant")
    summary = main(run_args(tmp_path, "lora", *lora))
    out = tmp_path / "lora"
    assert summary["global_step"] == 4
    assert (out / "checkpoint-2" / "lora_adapter" / "adapter_model.safetensors").is_file()
    final = UGDModel.from_pretrained(str(out))  # merged: a plain UGD checkpoint
    assert not any("lora" in n for n, _ in final.named_parameters())
    UGDModel.from_pretrained(str(out / "checkpoint-2"))
    initial = read_weights_initial(tmp_path)
    trained = read_weights(out)
    assert not torch.equal(trained["heads.classifier.weight"], initial["heads.classifier.weight"])  # heads train
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"],
                           initial["model.layers.0.self_attn.q_proj.weight"])  # merged LoRA update
    torch.testing.assert_close(trained["model.norm.weight"], initial["model.norm.weight"])  # frozen

    main(run_args(tmp_path, "lora_resumed", *lora, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    ref, resumed = train_losses(out / "checkpoint-4"), train_losses(tmp_path / "lora_resumed" / "checkpoint-4")
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-6)
