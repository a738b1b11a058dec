"""python -m ugd.study: rows -> ugd.train arguments, the bootstrap intervals, resuming, refusing changed
settings, failures, the table; the runner is driven by a fake executor (no model) except in the slow
end-to-end run at the bottom."""

import functools
import json
import os
import shutil

import numpy as np
import pytest

from ugd import study
from ugd.study import ROWS, Settings


def _records(n, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    words = ["red", "shoes", "blue", "jacket", "cheap", "good", "a", "man", "dog", "runs"]
    return [{"query": " ".join(rng.choice(words, 4)), "document": " ".join(rng.choice(words, 6)),
             "label": int(i % classes), "reason": " ".join(rng.choice(words, 3))} for i in range(n)]


@pytest.fixture
def files(tmp_path):
    paths = {}
    for split, n in (("train", 40), ("dev", 20), ("test", 24)):
        p = tmp_path / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in _records(n, seed=len(split))))
        paths[split] = str(p)
    return paths


def _argv(files, out, *extra):
    return ["--backbone", "none", "--train_file", files["train"], "--dev_file", files["dev"], "--test_file",
            files["test"], "--train_size", "24", "--test_size", "16", "--out", str(out), *extra]


class FakeExecutor:
    """Writes what ugd.train / ugd.evaluate would: a run summary, a report and predictions (the two-tower head
    right on 3 of 4 records); ``fail`` = paradigms whose training exits 1."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)

    def __call__(self, cmd, stdout_path, stderr_path):
        module = cmd[2]
        self.calls.append(cmd)
        arg = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
        if module == "ugd.train":
            if arg("--paradigm") in self.fail:
                with open(stderr_path, "w") as f:
                    f.write("Traceback ...\nRuntimeError: out of memory\n")
                return 1
            os.makedirs(arg("--output_dir"), exist_ok=True)
            with open(os.path.join(arg("--output_dir"), "ugd_run_summary.json"), "w") as f:
                json.dump({"train_seconds": 12.5, "global_step": 3, "versions": {"torch": "x"}}, f)
            return 0
        labels = [json.loads(line)["label"] for line in open(arg("--input"))]
        preds = []
        for i, y in enumerate(labels):
            p = np.full(3, 0.1)
            p[y if i % 4 else (y + 1) % 3] = 0.8
            preds.append({"index": i, "label": y, "probs": {"two-tower": p.tolist()},
                          **({"generated_reason": "a", "gold_reason": "a b", "rouge_l": 0.5} if i < 4 else {})})
        with open(arg("--predictions"), "w") as f:
            f.write("".join(json.dumps(p) + "\n" for p in preds))
        report = {"paradigm": "x", "num_labels": 3, "records": len(labels), "device": "cpu", "date": "d",
                  "versions": {"torch": "2.x"}, "modes": {"two-tower": {"acc": 0.75, "auc": 0.9},
                                                          "reason": {"rouge_l": 0.5}}}
        with open(arg("--output"), "w") as f:
            json.dump(report, f)
        return 0


# ------------------------------------------------------------------ rows


def _settings(**kw):
    base = dict(backbone="smollm2-135m", train_file="/d/train.jsonl", dev_file=None, test_file="/d/test.jsonl",
                files_sha256={}, eval_on="test", train_size=100, dev_size=0, test_size=50, data_seed=0, num_labels=3,
                epochs=1.0, max_steps=None, lora_r=0, learning_rate=1e-4, batch_size=None, max_query_len=64,
                max_document_len=64, max_reason_len=48, reason_samples=8, max_new_tokens=48, save_checkpoints=False,
                train_args=["--bf16", "true"])
    base.update(kw)
    return Settings(**base)


def _train_args(name, **kw):
    cmd = study.train_command(ROWS[name], 3, _settings(**kw), {"train": "/o/data/train-100.jsonl"}, "/o/model",
                              data_dir="/o/data", teacher_dir="/o/runs/stm/seed3/model")
    assert cmd[1:3] == ["-m", "ugd.train"]
    return cmd[3:]


def _value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


EXPECTED = {  # row -> (paradigm, extra ugd.train flags)
    "ugd-ttm": ("ugd-ttm", {}), "shared-ttm": ("shared-ttm", {}), "ttm": ("ttm", {}), "ugd-stm": ("ugd-stm", {}),
    "stm": ("stm", {}), "ugd-ttm:lam=mu=0": ("ugd-ttm", {"--lam": "0", "--mu": "0"}),
    "ugd-ttm:no-detach": ("ugd-ttm", {"--detach": "false"}), "ugd-ttm:gamma=0": ("ugd-ttm", {"--gamma": "0"}),
    "ugd-ttm:mu=0": ("ugd-ttm", {"--mu": "0"}),
    "ugd-ttm:gate=margin": ("ugd-ttm", {"--paradigm_options": '{"kl_gate": "margin"}'}),
    "ugd-ttm:gate=correct": ("ugd-ttm", {"--paradigm_options": '{"kl_gate": "correct"}'}),
    "ugd-ttm:warmup": ("ugd-ttm", {"--paradigm_options": '{"kl_warmup_steps": 150}'}),
    "ugd-ttm:reread": ("ugd-ttm", {"--interaction_positions": "32", "--interaction_fill": "query"}),
    "ugd-ttm:slots": ("ugd-ttm", {"--interaction_positions": "16", "--interaction_fill": "gmask"}),
    "ugd-ttm:reread+margin": ("ugd-ttm", {"--interaction_positions": "32", "--interaction_fill": "query",
                                          "--paradigm_options": '{"kl_gate": "margin"}'}),
    "ugd-ttm:ahead": ("ugd-ttm", {"--paradigm_options": '{"kl_switch": "teacher_ahead"}'}),
    "ugd-ttm:ahead+margin": ("ugd-ttm", {"--paradigm_options": '{"kl_switch": "teacher_ahead", "kl_gate": "margin"}'}),
    "ugd-ttm:ahead+lead": ("ugd-ttm", {"--paradigm_options": '{"kl_switch": "teacher_ahead", "kl_switch_lead": 0.05}'}),
    "ugd-ttm:teacher-mask=stm": ("ugd-ttm", {"--paradigm_options": '{"teacher_mask": "stm"}'}),
    "ugd-ttm:teacher=stm": ("ugd-ttm", {}),
    "d2llm": ("d2llm", {}), "ullme": ("ullme", {}),
    "flipped-kd": ("flipped-kd", {}),
}


def test_every_row_maps_to_its_train_arguments():
    assert list(EXPECTED) == list(ROWS)
    for name, (paradigm, flags) in EXPECTED.items():
        args = _train_args(name)
        assert _value(args, "--paradigm") == paradigm
        for flag, v in flags.items():
            assert _value(args, flag) == v, (name, flag)
        for flag, v in {"--seed": "3", "--model_name_or_path": "smollm2-135m",
                        "--train_file": "/o/data/train-100.jsonl",
                        "--num_labels": "3", "--save_strategy": "no", "--report_to": "none", "--num_reasons": "0",
                        "--disable_tqdm": "true", "--eval_strategy": "no", "--learning_rate": "0.0001",
                        "--max_reason_len": "48", "--num_train_epochs": "1.0"}.items():
            assert _value(args, flag) == v, (name, flag)
        assert args[-2:] == ["--bf16", "true"]  # what follows -- comes last, verbatim
        options = json.loads(_value(args, "--paradigm_options") or "{}")
        if name == "d2llm":
            assert options == {"ci_weight": 1.0, "ri_weight": 1.0, "teacher": "/o/runs/stm/seed3/model"}
        elif name == "ugd-ttm:teacher=stm":
            assert options == {"teacher": "/o/runs/stm/seed3/model"}
        elif name == "flipped-kd":
            assert options == {"teacher_cache": "/o/data/flipped-kd-teacher-scores.jsonl"}
            assert "--lora_r" not in args  # its own LoRA default (r 8)
        else:
            assert options == json.loads(flags.get("--paradigm_options", "{}")) and _value(args, "--lora_r") == "0"
    assert _value(_train_args("flipped-kd", lora_r=4), "--lora_r") == "4"
    assert "--model_name_or_path" not in _train_args("ugd-ttm", backbone="none")
    assert _value(_train_args("ugd-ttm", max_steps=7), "--max_steps") == "7"


def test_no_detach_row_parses_as_detach_false():
    from ugd.training.args import parse_args

    run = parse_args(_train_args("ugd-ttm:no-detach", train_args=[]))
    assert run.ugd.detach is False and run.ugd.lam == 10.0


def test_rows_resolution_and_unknown_row(files, tmp_path, capsys):
    assert study.resolve_rows(["d2llm", "ugd-ttm"]) == ["stm", "d2llm", "ugd-ttm"]  # the teacher first
    assert study.resolve_rows(["ugd-ttm:teacher=stm"]) == ["stm", "ugd-ttm:teacher=stm"]
    assert study.resolve_rows(["all"]) == list(ROWS)
    assert study.cli(_argv(files, tmp_path / "o", "--rows", "ugd-ttm", "nope")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown row(s) nope" in err and "ugd-ttm:no-detach" in err


# ------------------------------------------------------------------ bootstrap


def _synthetic(n, acc, seed=0):
    """log-probabilities [n, 3] whose argmax is right on exactly round(acc * n) records."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    right = np.zeros(n, bool)
    right[rng.permutation(n)[: round(acc * n)]] = True
    pred = np.where(right, labels, (labels + 1) % 3)
    probs = np.full((n, 3), 0.1)
    probs[np.arange(n), pred] = 0.8
    return np.log(probs), labels


def test_bootstrap_interval_covers_the_accuracy_and_shrinks_with_n():
    widths = []
    for n in (100, 1600):
        iv = study.bootstrap([_synthetic(n, 0.7)], n, study._acc)
        assert iv["value"] == pytest.approx(0.7, abs=1 / n)
        assert iv["low"] < 0.7 < iv["high"] and iv["seed_sd"] is None
        widths.append(iv["high"] - iv["low"])
        # a binomial proportion: the 95 % interval is about +-1.96 sqrt(p(1-p)/n)
        assert widths[-1] == pytest.approx(2 * 1.96 * (0.21 / n) ** 0.5, rel=0.25)
    assert widths[1] < widths[0] / 3  # 16 x the records: a quarter of the width
    again = study.bootstrap([_synthetic(100, 0.7)], 100, study._acc)
    assert again == study.bootstrap([_synthetic(100, 0.7)], 100, study._acc)  # fixed RNG seed


def test_bootstrap_over_seeds_is_the_seed_mean():
    seeds = [_synthetic(400, 0.6, seed=0), _synthetic(400, 0.8, seed=0)]
    iv = study.bootstrap(seeds, 400, study._acc)
    assert iv["value"] == pytest.approx(0.7) and iv["per_seed"] == pytest.approx([0.6, 0.8])
    assert iv["seed_sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert iv["low"] < 0.7 < iv["high"]
    auc = study.bootstrap([_synthetic(400, 1.0)], 400, study._auc)
    assert auc["value"] == 1.0 and auc["low"] == 1.0


def test_paired_difference_is_the_difference_of_the_seed_means_and_pairs_the_records():
    n = 800
    logp, labels = _synthetic(n, 0.6, seed=3)
    better = logp.copy()
    wrong = np.flatnonzero(logp.argmax(1) != labels)[:80]  # 80 more records right: +0.1 exactly
    better[wrong] = np.log(0.1)
    better[wrong, labels[wrong]] = np.log(0.8)
    a, b = [(better, labels)] * 2, [(logp, labels)] * 2
    iv = study.paired_difference(a, b, n, study._acc)
    assert iv["value"] == pytest.approx(0.1) and iv["per_seed"] == pytest.approx([0.1, 0.1])
    # paired: only the 80 changed records vary between resamples, so the interval is far narrower than that
    # of either accuracy alone (+-0.034 at n 800) and excludes 0
    assert 0.07 < iv["low"] < 0.1 < iv["high"] < 0.13
    same = study.paired_difference(b, b, n, study._auc)
    assert (same["value"], same["low"], same["high"]) == (0.0, 0.0, 0.0)


def test_seed_interval_is_the_t_interval_of_the_seed_mean():
    iv = study.seed_interval([0.1, 0.2, 0.3])
    assert iv["value"] == pytest.approx(0.2)
    assert iv["high"] - 0.2 == pytest.approx(4.303 * 0.1 / 3 ** 0.5)  # t(2) = 4.303, sd 0.1
    assert study.seed_interval([0.1]) is None and study.seed_interval([0.1, None]) is None
    assert study.t95(1) == 12.706 and study.t95(30) == pytest.approx(2.042, abs=0.01)
    assert study.t95(200) == pytest.approx(1.972, abs=0.002)


def test_the_table_holds_the_paired_differences_of_the_ugd_ttm_rows(files, tmp_path):
    out = tmp_path / "o"
    rows = ["ugd-ttm", "ugd-ttm:gate=margin", "ugd-ttm:lam=mu=0", "shared-ttm", "stm"]
    assert study.difference_pairs(rows) == [
        ("ugd-ttm", "ugd-ttm:lam=mu=0"), ("ugd-ttm", "shared-ttm"), ("ugd-ttm:gate=margin", "ugd-ttm"),
        ("ugd-ttm:gate=margin", "ugd-ttm:lam=mu=0"), ("ugd-ttm:gate=margin", "shared-ttm"),
        ("ugd-ttm:lam=mu=0", "shared-ttm")]
    assert study.main(_argv(files, out, "--rows", *rows, "--seeds", "0", "1"), execute=FakeExecutor()) == 0
    diffs = json.loads((out / "results.json").read_text())["differences"]
    assert sorted((d["row"], d["against"], d["seeds"]) for d in diffs) == sorted(
        (a, b, [0, 1]) for a, b in study.difference_pairs(rows))
    assert all(d["acc"]["value"] == 0.0 and d["acc"]["low"] == 0.0 for d in diffs)  # the fake predicts alike
    table = (out / "table.md").read_text()
    assert ("| ugd-ttm:gate=margin | ugd-ttm:lam=mu=0 | 0, 1 | +0.0000 [+0.000, +0.000] sd 0.000 | "
            "[+0.000, +0.000] |") in table
    # a pair is over the seeds both rows finished; a row without any leaves its pairs out
    shutil.rmtree(out / "runs" / "shared-ttm" / "seed1")
    shutil.rmtree(out / "runs" / "ugd-ttm:lam=mu=0".replace(":", "_"))
    assert study.main(["--report_only", "--out", str(out)]) == 0
    diffs = json.loads((out / "results.json").read_text())["differences"]
    assert sorted((d["row"], d["against"], d["seeds"]) for d in diffs) == [
        ("ugd-ttm", "shared-ttm", [0]), ("ugd-ttm:gate=margin", "shared-ttm", [0]),
        ("ugd-ttm:gate=margin", "ugd-ttm", [0, 1])]


# ------------------------------------------------------------------ the runner


def test_second_invocation_skips_finished_runs(files, tmp_path, capsys):
    out = tmp_path / "o"
    fake = FakeExecutor()
    assert study.main(_argv(files, out, "--rows", "ugd-ttm", "stm", "--seeds", "0", "1"), execute=fake) == 0
    assert len(fake.calls) == 8  # 2 rows x 2 seeds x (train, evaluate)
    done = json.loads((out / "runs" / "ugd-ttm" / "seed1" / "done.json").read_text())
    assert done["report"]["modes"]["two-tower"]["acc"] == 0.75 and done["train_seconds"] == 12.5
    assert (out / "data" / "train-24.jsonl").is_file() and (out / "data" / "test-16.jsonl").is_file()
    capsys.readouterr()

    again = FakeExecutor()
    assert study.main(_argv(files, out, "--rows", "ugd-ttm", "stm", "--seeds", "0", "1"), execute=again) == 0
    assert again.calls == []
    assert "[study] ugd-ttm seed 0: done earlier, skipped" in capsys.readouterr().out

    # trained but not evaluated (interrupted): only the evaluation runs again
    (out / "runs" / "stm" / "seed0" / "done.json").unlink()
    third = FakeExecutor()
    assert study.main(_argv(files, out, "--rows", "stm", "--seeds", "0"), execute=third) == 0
    assert [c[2] for c in third.calls] == ["ugd.evaluate"]
    results = json.loads((out / "results.json").read_text())
    acc = results["rows"]["ugd-ttm"]["metrics"]["two-tower"]["acc"]
    assert acc["value"] == pytest.approx(0.75) and acc["low"] <= 0.75 <= acc["high"]
    assert results["rows"]["ugd-ttm"]["seeds_done"] == [0, 1]


def test_changed_settings_are_refused(files, tmp_path, capsys):
    out = tmp_path / "o"
    assert study.main(_argv(files, out, "--rows", "stm"), execute=FakeExecutor()) == 0
    capsys.readouterr()
    assert study.cli(_argv(files, out, "--rows", "stm", "--epochs", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "epochs 1.0 -> 2.0" in err and "another --out" in err and "\n" not in err
    assert study.cli(_argv(files, out, "--rows", "stm", "--", "--gamma", "2")) == 2
    assert "train_args" in capsys.readouterr().err
    # adding rows or seeds is not a change of settings
    assert study.main(_argv(files, out, "--rows", "ttm", "--seeds", "0"), execute=FakeExecutor()) == 0


def test_failing_row_is_recorded_and_the_study_goes_on(files, tmp_path, capsys):
    out = tmp_path / "o"
    fake = FakeExecutor(fail={"stm"})
    assert study.main(_argv(files, out, "--rows", "d2llm", "ugd-ttm"), execute=fake) == 1
    failed = json.loads((out / "runs" / "stm" / "seed0" / "failed.json").read_text())
    assert failed["stage"] == "train" and "out of memory" in failed["stderr_tail"]
    teacher = json.loads((out / "runs" / "d2llm" / "seed0" / "failed.json").read_text())
    assert teacher["stage"] == "teacher"
    assert (out / "runs" / "ugd-ttm" / "seed0" / "done.json").is_file()  # went on
    captured = capsys.readouterr()
    assert "FAILED in train: RuntimeError: out of memory" in captured.out
    table = (out / "table.md").read_text()
    assert "| stm | stm | 0/1 | failed: seed 0 in train |" in table
    # a rerun retries the failed ones: now the teacher trains and d2llm gets its path
    fake = FakeExecutor()
    assert study.main(_argv(files, out, "--rows", "d2llm"), execute=fake) == 0
    d2llm = next(c for c in fake.calls if "d2llm" in c)
    assert json.loads(d2llm[d2llm.index("--paradigm_options") + 1])["teacher"].endswith("runs/stm/seed0/model")
    assert not (out / "runs" / "stm" / "seed0" / "failed.json").exists()


def test_table_marks_rows_not_run(files, tmp_path):
    out = tmp_path / "o"
    assert study.main(_argv(files, out, "--rows", "ugd-ttm"), execute=FakeExecutor()) == 0
    s = json.loads((out / "study.json").read_text())
    s["rows"] = ["ugd-ttm", "ugd-ttm:gamma=0"]
    results = study.collect(str(out), s["rows"], s["seeds"])
    table = study.render_table(results, s)
    assert "| ugd-ttm:gamma=0 | ugd-ttm | 0/1 | not run |" in table
    row = next(line for line in table.splitlines() if line.startswith("| ugd-ttm |"))
    assert "0.7500 [" in row and "| – | – |" in row and "0.5000" in row and row.endswith("| 12 |")
    assert "1000 resamples" in table and "torch 2.x" in table


def test_eval_on_dev_never_reads_the_test_file(files, tmp_path):
    out = tmp_path / "dev"
    argv = _argv(files, out, "--rows", "stm", "--eval_on", "dev")
    argv[argv.index("--test_file") + 1] = str(tmp_path / "missing.jsonl")
    fake = FakeExecutor()
    assert study.main(argv, execute=fake) == 0
    ev = next(c for c in fake.calls if c[2] == "ugd.evaluate")
    assert ev[ev.index("--input") + 1].endswith("data/dev-16.jsonl")


def test_subsets_are_fixed_and_nested():
    records = list(range(100))
    a = study.subset(records, 10, 0, 0)
    assert a == study.subset(records, 10, 0, 0) and a == study.subset(records, 30, 0, 0)[:10]
    assert a != study.subset(records, 10, 1, 0)


# ------------------------------------------------------------------ end to end


TINY = '{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, ' \
       '"num_key_value_heads": 2}'


@pytest.mark.slow
def test_end_to_end_tiny_backbone(files, tmp_path):
    """Two rows, one seed, a tiny random-init backbone: ugd.train and ugd.evaluate for real."""
    pytest.importorskip("ugd.evaluate")
    from ugd.serving import reason_scores

    if not reason_scores.available():
        pytest.skip("rouge-score / sacrebleu are not installed")
    out = tmp_path / "e2e"
    argv = _argv(files, out, "--rows", "ugd-ttm", "stm", "--epochs", "1", "--batch_size", "8", "--reason_samples",
                 "4", "--max_new_tokens", "4", "--max_query_len", "8", "--max_document_len", "10",
                 "--max_reason_len", "6", "--cpu_threads", "1", "--", "--backbone_config", TINY)
    assert study.main(argv) == 0, (out / "runs" / "ugd-ttm" / "seed0" / "failed.json").read_text() \
        if (out / "runs" / "ugd-ttm" / "seed0" / "failed.json").exists() else ""
    results = json.loads((out / "results.json").read_text())["rows"]
    ttm = results["ugd-ttm"]["metrics"]
    assert set(ttm) == {"two-tower", "single-tower", "reason"} and ttm["two-tower"]["records"] == 16
    assert 0 <= ttm["two-tower"]["acc"]["low"] <= ttm["two-tower"]["acc"]["value"] <= ttm["two-tower"]["acc"]["high"]
    assert set(results["stm"]["metrics"]) == {"single-tower"}
    assert "| stm | stm | 1/1 | – | – |" in (out / "table.md").read_text()


# ------------------------------------------------------------------ issue 35 / issue 31: arguments, report, children


def test_report_only_needs_only_the_out_folder(files, tmp_path, capsys):
    out = tmp_path / "o"
    assert study.main(_argv(files, out, "--rows", "ugd-ttm", "stm", "--seeds", "0", "1"), execute=FakeExecutor()) == 0
    table = (out / "table.md").read_text()
    (out / "table.md").unlink()
    (out / "results.json").unlink()
    capsys.readouterr()
    assert study.cli(["--report_only", "--out", str(out)]) == 0  # settings, rows and seeds from study.json
    assert (out / "table.md").read_text() == table
    assert "train 24 records" in table and "evaluated on 16 records" in table  # the counts came along
    # a study written before study.json kept the data counts: they come from results.json
    s = json.loads((out / "study.json").read_text())
    del s["data"]
    (out / "study.json").write_text(json.dumps(s))
    assert study.cli(["--report_only", "--out", str(out)]) == 0
    assert (out / "table.md").read_text() == table
    # settings given as well must be the study's
    capsys.readouterr()
    assert study.cli(_argv(files, out, "--report_only", "--epochs", "3")) == 2
    assert "epochs 1.0 -> 3.0" in capsys.readouterr().err


def test_report_only_refuses_a_folder_without_a_study(files, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "missing"):
        assert study.cli(["--report_only", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ugd.study: error: --out {out} holds no study (no study.json)") and err.count("\n") == 1
    assert list(empty.iterdir()) == [] and not (tmp_path / "missing").exists()  # no table of "not run" rows
    assert study.cli(_argv(files, empty, "--report_only")) == 2  # with the settings: still no study there
    assert list(empty.iterdir()) == []
    assert study.cli(["--out", str(empty)]) == 2  # without --report_only the settings are needed
    assert "--backbone is needed" in capsys.readouterr().err


@pytest.mark.parametrize("flags, shown", [(["--seeds", "0", "-1"], "--seeds -1"), (["--data_seed", "-3"], "--data_seed -3"),
                                          (["--seeds", str(2 ** 32)], f"--seeds {2 ** 32}")])
def test_negative_seeds_are_refused_up_front(files, tmp_path, capsys, flags, shown):
    fake = FakeExecutor()
    assert study.cli(_argv(files, tmp_path / "o", *flags)) == 2
    err = capsys.readouterr().err
    assert err == f"ugd.study: error: {shown}: seeds are integers in [0, 2**32)\n"
    assert fake.calls == [] and not (tmp_path / "o").exists()


def test_a_size_larger_than_the_file_is_said(files, tmp_path, capsys):
    argv = _argv(files, tmp_path / "o", "--rows", "stm")
    argv[argv.index("--test_size") + 1] = "5000"
    assert study.main(argv, execute=FakeExecutor()) == 0
    out = capsys.readouterr().out
    assert f"[study] --test_size 5000: --test_file {files['test']} holds 24 records; all 24 are used" in out
    assert "--train_size" not in out  # 24 of 40: no clamp


def test_a_run_folder_locked_by_a_live_trainer_is_not_touched(files, tmp_path, capsys):
    """A rerun while an earlier study's trainer still trains into the folder: recorded as failed in one line,
    the folder left alone (not cleared, no second trainer)."""
    from ugd.training.run_lock import run_lock

    out = tmp_path / "o"
    model = out / "runs" / "stm" / "seed0" / "model"
    model.mkdir(parents=True)
    (model / "partial.bin").write_bytes(b"x")
    fake = FakeExecutor()
    with run_lock(model):
        assert study.main(_argv(files, out, "--rows", "stm"), execute=fake) == 1
    assert fake.calls == [] and (model / "partial.bin").is_file()
    failed = json.loads((out / "runs" / "stm" / "seed0" / "failed.json").read_text())
    assert failed["stage"] == "train" and "is locked by another ugd.train process" in failed["stderr_tail"]
    assert study.main(_argv(files, out, "--rows", "stm"), execute=FakeExecutor()) == 0  # lock gone: it runs


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_the_study_even_under_kill_9(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = (f"import sys; from ugd import study\n"
              f"study.run_subprocess([sys.executable, '-c', {child!r}], {str(tmp_path / 'o')!r}, "
              f"{str(tmp_path / 'e')!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        deadline = time.time() + 120
        while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        child_pid = int(pid_file.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.kill(child_pid, 0)
            except ProcessLookupError:
                break
            # a zombie child of init counts as gone: read its state
            with open(f"/proc/{child_pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
            time.sleep(0.2)
        else:
            os.kill(child_pid, signal.SIGKILL)
            pytest.fail("the child outlived its killed parent")
    finally:
        if proc.poll() is None:
            proc.kill()


COMMITTED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


@pytest.mark.parametrize("name", sorted(n for n in (os.listdir(COMMITTED) if os.path.isdir(COMMITTED) else ())
                                        if os.path.isfile(os.path.join(COMMITTED, n, "study.json"))))
def test_a_committed_study_rebuilds_its_table_from_its_folder_alone(name, tmp_path, monkeypatch):
    """results/<study> (committed evidence, no weights) rebuilds with --report_only --out DIR alone, and each
    finished run's cell is the ACC its own report holds."""
    # the cells' values do not depend on the resamples, only their intervals: 50 keep this test quick
    monkeypatch.setattr(study, "bootstrap", functools.partial(study.bootstrap, resamples=50))
    folder = tmp_path / name
    # local weights (runs/*/seed*/model/, gitignored) are not evidence and can be gigabytes: leave them
    shutil.copytree(os.path.join(COMMITTED, name), folder, ignore=shutil.ignore_patterns("model"))
    assert study.main(["--report_only", "--out", str(folder)]) in (0, 1)
    with open(folder / "results.json") as f:
        rows = json.load(f)["rows"]
    done = list(folder.glob("runs/*/seed*/done.json"))
    assert done, "a committed study holds at least one finished run"
    for path in done:
        with open(path) as f:
            d = json.load(f)
        for head, mode in d["report"]["modes"].items():
            if "acc" in mode and head in rows[d["row"]]["metrics"]:
                cell = rows[d["row"]]["metrics"][head]["acc"]
                assert cell["per_seed"][rows[d["row"]]["seeds_done"].index(d["seed"])] == pytest.approx(mode["acc"])
