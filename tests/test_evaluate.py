"""``python -m ugd.evaluate`` on tiny random checkpoints (CPU): the report's keys, metrics that agree with
``ugd.training.metrics`` on the predictions file, reason scores equal to rouge-score / sacrebleu called directly,
``--max_records``, and one-line errors with exit status 2. Runs in-process (``ugd.evaluate.cli``)."""

import json
import sys

import pytest
import torch
from tests.cli_runs import run_cli
from tests.tiny_checkpoints import NUM_LABELS, save_tiny_checkpoint

from ugd.training import metrics
from ugd.evaluate import cli, evaluate_model, main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

REASON_ARGS = ("--reason_samples", 5, "--max_new_tokens", 4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from ugd.data.demo import demo_splits

    root = tmp_path_factory.mktemp("evaluate")
    records, _ = demo_splits(12, 0)
    records[1]["reason"] = None  # one of the reason samples has no gold reason
    data = root / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {
        "root": root,
        "records": records,
        "data": str(data),
        "ckpt": save_tiny_checkpoint(root / "ckpt", records, "ugd-ttm", seed=0),  # all three modes
        "stm": save_tiny_checkpoint(root / "stm", records, "stm", seed=2),  # single-tower only
    }


def run(*args):
    """cli(args) in-process: (exit status, stdout, stderr)."""
    return run_cli(cli, args)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture(scope="module")
def full_run(env):
    """One evaluation in every mode, with the report and predictions files (shared by several tests)."""
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    out, preds = env["root"] / "report.json", env["root"] / "preds.jsonl"
    code, stdout, stderr = run("--model", env["ckpt"], "--input", env["data"], "--output", out,
                               "--predictions", preds, "--batch_size", 5, "--no_progress", *REASON_ARGS)
    assert code == 0, stderr
    return json.loads(out.read_text()), read_jsonl(preds), stdout


def test_report_keys_and_table(env, full_run):
    report, preds, stdout = full_run
    n = len(env["records"])
    assert {"model", "input", "paradigm", "num_labels", "records", "modes", "versions", "device", "date",
            "batch_size"} <= set(report)
    assert report["paradigm"] == "ugd-ttm" and report["num_labels"] == NUM_LABELS and report["records"] == n
    assert report["device"] == "cpu" and report["batch_size"] == 5
    assert list(report["modes"]) == ["two-tower", "single-tower", "reason"]
    for mode in ("two-tower", "single-tower"):
        m = report["modes"][mode]
        assert {"acc", "auc", "macro_f1", "confusion", "pairs_per_second", "seconds", "records"} <= set(m)
        assert m["records"] == n and m["pairs_per_second"] > 0
        assert len(m["confusion"]) == NUM_LABELS and all(len(row) == NUM_LABELS for row in m["confusion"])
        assert sum(map(sum, m["confusion"])) == n
    r = report["modes"]["reason"]
    assert {"rouge_l", "bleu", "samples", "pairs_per_second", "seconds"} <= set(r)
    assert r["generated"] == 5 and r["samples"] == 4 and r["without_gold_reason"] == 1
    assert {"python", "torch", "transformers"} <= set(report["versions"])
    assert report["date"].endswith(" UTC") and len(report["date"]) == len("2026-12-05 10:00 UTC")
    assert "two-tower" in stdout and "macro-F1" in stdout and "ROUGE-L" in stdout


def test_metrics_agree_with_ugd_metrics_on_the_predictions(env, full_run):
    report, preds, _ = full_run
    assert [p["index"] for p in preds] == list(range(len(env["records"])))
    assert [p["label"] for p in preds] == [r["label"] for r in env["records"]]
    for mode in ("two-tower", "single-tower"):
        logits = torch.tensor([p["probs"][mode] for p in preds], dtype=torch.float64).log()
        labels = torch.tensor([p["label"] for p in preds])
        m = report["modes"][mode]
        assert m["acc"] == pytest.approx(metrics.accuracy(logits, labels))
        assert m["auc"] == pytest.approx(metrics.roc_auc(logits, labels))
        assert m["macro_f1"] == pytest.approx(metrics.macro_f1(logits, labels))
        assert m["confusion"] == metrics.confusion_matrix(logits, labels, NUM_LABELS).tolist()


def test_scores_equal_the_python_api(env, full_run):
    from ugd.model import UGDModel

    _, preds, _ = full_run
    model = UGDModel.from_pretrained(env["ckpt"])
    pairs = [(r["query"], r["document"]) for r in env["records"]]
    torch.testing.assert_close(torch.tensor([p["probs"]["two-tower"] for p in preds]),
                               model.predict(pairs, mode="two_tower"), atol=1e-6, rtol=1e-5)
    assert [p.get("generated_reason") for p in preds[:5]] == model.generate_reason(pairs[:5], max_new_tokens=4)
    assert all("generated_reason" not in p for p in preds[5:])


def test_reason_scores_match_the_packages(env, full_run):
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    report, preds, _ = full_run
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scored = [(p, r) for p, r in zip(preds[:5], env["records"][:5]) if r["reason"]]
    assert len(scored) == 4
    assert any(p["generated_reason"] for p, _ in scored)  # random weights still say something in 4 tokens
    for p, r in scored:
        assert p["gold_reason"] == r["reason"]
        assert p["rouge_l"] == pytest.approx(scorer.score(r["reason"], p["generated_reason"])["rougeL"].fmeasure)
    assert preds[1]["gold_reason"] is None and preds[1]["rouge_l"] is None
    r = report["modes"]["reason"]
    assert r["rouge_l"] == pytest.approx(sum(p["rouge_l"] for p, _ in scored) / 4)
    bleu = BLEU().corpus_score([p["generated_reason"] for p, _ in scored], [[r["reason"] for _, r in scored]])
    assert r["bleu"] == pytest.approx(bleu.score)


def test_multi_reference_scores_take_the_best_reference():
    pytest.importorskip("rouge_score")
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    from ugd.serving.reason_scores import gold_references, score_reasons

    assert gold_references({"reason": "a b", "references": ["c", "", None, "d"]}) == ["c", "d"]
    assert gold_references({"reason": ""}) == [] and gold_references({"reason": "x"}) == ["x"]
    preds = ["the red shoes match", "a blue mug"]
    refs = [["the page sells red shoes", "red shoes match the query"], ["a blue mug for coffee"]]
    got = score_reasons(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = max(scorer.score(t, preds[0])["rougeL"].fmeasure for t in refs[0])
    assert got["per_sample_rouge_l"][0] == pytest.approx(best)
    expected = BLEU().corpus_score(preds, [[refs[0][0], refs[1][0]], [refs[0][1], None]]).score
    assert got["bleu"] == pytest.approx(expected)


def test_max_records_and_modes(env, tmp_path):
    preds = tmp_path / "p.jsonl"
    report = main(["--model", env["ckpt"], "--input", env["data"], "--max_records", "3", "--modes", "single_tower",
                   "--predictions", str(preds), "--no_progress"])
    assert report["records"] == 3 and list(report["modes"]) == ["single-tower"]
    assert sum(map(sum, report["modes"]["single-tower"]["confusion"])) == 3
    lines = read_jsonl(preds)
    assert len(lines) == 3 and all(set(p["probs"]) == {"single-tower"} for p in lines)


def test_default_modes_are_what_the_paradigm_serves(env):
    report = main(["--model", env["stm"], "--input", env["data"], "--no_progress"])
    assert list(report["modes"]) == ["single-tower"]


def test_library_function_without_gold_reasons(env):
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    from ugd.model import UGDModel

    model = UGDModel.from_pretrained(env["ckpt"])
    records = [dict(r, reason=None) for r in env["records"][:3]]
    report, preds = evaluate_model(model, model.tokenizer, records, ["reason"], reason_samples=2, max_new_tokens=2,
                                   show_progress=False)
    r = report["modes"]["reason"]
    assert r["samples"] == 0 and r["without_gold_reason"] == 2 and r["rouge_l"] is None and r["bleu"] is None
    assert [("generated_reason" in p) for p in preds] == [True, True, False]
    with pytest.raises(ValueError, match="label"):
        evaluate_model(model, None, [dict(records[0], label=NUM_LABELS)], ["two-tower"])


def _bad_input(env, tmp_path, case):
    if case == "missing file":
        return ["--input", tmp_path / "nope.jsonl"], "no such file"
    if case == "bad record":
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps(env["records"][0]) + "\n{not json\n")
        return ["--input", f], f"{f}:2:"
    if case == "no labels":
        f = tmp_path / "empty.jsonl"
        f.write_text("\n")
        return ["--input", f], "no labelled records"
    if case == "missing label":
        f = tmp_path / "nolabel.jsonl"
        f.write_text(json.dumps({"query": "a", "document": "b"}) + "\n")
        return ["--input", f], "missing field 'label'"
    if case == "label out of range":
        f = tmp_path / "range.jsonl"
        f.write_text(json.dumps(dict(env["records"][0], label=NUM_LABELS)) + "\n")
        return ["--input", f], f"out of range for num_labels={NUM_LABELS}"
    if case == "not a checkpoint":
        return ["--model", tmp_path], "not a UGD checkpoint"
    if case == "unknown mode":
        return ["--modes", "rerank"], "unknown --modes value"
    if case == "batch size":
        return ["--batch_size", "0"], "--batch_size must be >= 1"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing file", "bad record", "no labels", "missing label", "label out of range",
                                  "not a checkpoint", "unknown mode", "batch size"])
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, case):
    extra, expected = _bad_input(env, tmp_path, case)
    args = {"--model": env["ckpt"], "--input": env["data"]}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    # --reason_samples 0: these hold without the eval extra too
    code, stdout, stderr = run(*[x for kv in args.items() for x in kv], "--reason_samples", "0", "--no_progress")
    assert code == 2
    assert stderr.startswith("ugd.evaluate: error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr and "Traceback" not in stderr


def test_a_mode_the_paradigm_cannot_serve(env):
    code, _, stderr = run("--model", env["stm"], "--input", env["data"], "--modes", "two-tower", "reason")
    assert code == 2 and stderr.count("\n") == 1
    assert "cannot serve mode two-tower" in stderr and "it serves: single-tower" in stderr


def test_missing_score_packages_say_how_to_install(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import fails as if not installed
    code, _, stderr = run("--model", env["ckpt"], "--input", env["data"], "--modes", "reason")
    assert code == 2 and stderr.count("\n") == 1 and "pip install 'rouge-score>=0.1.2' 'sacrebleu>=2.0'" in stderr
    # without reasons the packages are not needed
    code, _, stderr = run("--model", env["ckpt"], "--input", env["data"], "--modes", "reason", "two-tower",
                          "--reason_samples", "0", "--no_progress")
    assert code == 0, stderr


def test_training_run_summary_holds_the_evaluation(tmp_path, capsys):
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    from tests.test_train import TINY

    from ugd.train import main as train_main

    summary = train_main([*TINY, "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--num_reasons", "2",
                          "--max_new_tokens", "4"])
    printed = capsys.readouterr().out
    ev = summary["evaluation"]
    assert list(ev["modes"]) == ["two-tower", "single-tower", "reason"] and ev["records"] == 32
    assert ev["modes"]["two-tower"]["acc"] == pytest.approx(summary["eval"]["eval_acc_t"])  # the "eval" key stays
    assert ev["modes"]["single-tower"]["acc"] == pytest.approx(summary["eval"]["eval_acc_s"])
    assert ev["modes"]["reason"]["samples"] == 2 and len(summary["reasons"]) == 2
    assert "macro-F1" in printed and "ROUGE-L" in printed and "reason 2:" in printed


def test_empty_text_is_a_bad_record_file_line_or_skipped(env, tmp_path):
    """Issue 35: an empty or whitespace-only query passed the reader and stopped the evaluation with
    "query of pair 0 is empty" (no file:line), and --skip_bad did not skip it."""
    records = [dict(r) for r in env["records"][:4]]
    records[2]["query"] = "   "
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, _, stderr = run("--model", env["ckpt"], "--input", data, "--reason_samples", "0", "--no_progress")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"ugd.evaluate: error: {data}:3: the query is empty") and "--skip_bad" in stderr
    out = tmp_path / "report.json"
    code, _, stderr = run("--model", env["ckpt"], "--input", data, "--reason_samples", "0", "--no_progress",
                          "--skip_bad", "--output", out)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["records"] == 3 and "skipped 1 malformed" in report["data"]
