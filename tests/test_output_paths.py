"""The output-path rule (docs/training.md, "Inputs and outputs"; issue 35): ``ugd.evaluate``,
``ugd.predict`` and ``ugd.study`` refuse, in one line with exit status 2 and before any work, an output
that resolves to an input or to another output, a file output that is an existing folder or under a
file, and a folder output that is a file. No checkpoint is loaded: the checks come first."""

from __future__ import annotations

import json
import os

import pytest
from tests.cli_runs import one_error_line, run_cli

from ugd import evaluate, predict, study
from ugd._output_paths import output_problems

RECORD = {"query": "red shoes", "document": "red running shoes", "label": 1}


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(RECORD) + "\n")
    model = tmp_path / "ckpt"
    model.mkdir()
    return {"input": str(path), "model": str(model), "bytes": path.read_bytes(), "root": tmp_path}


def _evaluate(data, *args):
    return run_cli(evaluate.cli, ["--model", data["model"], "--input", data["input"], "--reason_samples", "0",
                                  "--no_progress", *args])


def _predict(data, *args):
    return run_cli(predict.cli, ["--model", data["model"], "--input", data["input"], *args])


@pytest.mark.parametrize("flag", ["--predictions", "--output"])
def test_evaluate_never_writes_over_its_input(data, flag):
    code, _, err = _evaluate(data, flag, data["input"])
    assert code == 2
    one_error_line(err, "ugd.evaluate: error: ", f"{flag} {data['input']} is also --input, an input")
    assert open(data["input"], "rb").read() == data["bytes"]


def test_evaluate_sees_through_links_and_relative_paths(data, monkeypatch):
    link = data["root"] / "link.jsonl"
    os.symlink(data["input"], link)
    hard = data["root"] / "hard.jsonl"
    os.link(data["input"], hard)
    monkeypatch.chdir(data["root"])
    for path in (str(link), str(hard), "./in.jsonl", "sub/../in.jsonl"):
        code, _, err = _evaluate(data, "--predictions", path)
        assert code == 2 and "is also --input" in err, (path, err)
    assert open(data["input"], "rb").read() == data["bytes"]


def test_evaluate_outputs_must_differ(data):
    out = str(data["root"] / "report.json")
    code, _, err = _evaluate(data, "--output", out, "--predictions", out)
    assert code == 2
    one_error_line(err, "ugd.evaluate: error: ", "--predictions", "is also --output", "name two paths")


def test_evaluate_output_folder_or_under_a_file_is_refused_before_the_work(data):
    folder = data["root"] / "reports"
    folder.mkdir()
    code, _, err = _evaluate(data, "--output", str(folder))
    assert code == 2
    one_error_line(err, "ugd.evaluate: error: ", f"--output {folder} is a folder; name a file")
    code, _, err = _evaluate(data, "--predictions", os.path.join(data["input"], "preds.jsonl"))
    assert code == 2
    one_error_line(err, "ugd.evaluate: error: ", f"{data['input']} is a file, so no folder can hold this path")
    code, _, err = _evaluate(data, "--output", data["model"])  # the checkpoint folder is an input too
    assert code == 2 and "is also --model, an input" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_evaluate_unwritable_output_folder(data):
    # /proc refuses new files even to root (permission bits would not: the tests may run as root)
    code, _, err = _evaluate(data, "--output", "/proc/report.json")
    assert code == 2
    one_error_line(err, "ugd.evaluate: error: ", "--output /proc/report.json cannot be written")


def test_predict_never_writes_over_its_input(data):
    code, _, err = _predict(data, "--output", data["input"])
    assert code == 2
    one_error_line(err, "ugd.predict: error: ", "--output", "is also --input, an input")
    code, _, err = _predict(data, "--doc_vectors", data["input"])
    assert code == 2 and "--doc_vectors" in err and "is also --input" in err
    store = str(data["root"] / "docs.safetensors")
    code, _, err = _predict(data, "--doc_vectors", store, "--output", store)
    assert code == 2 and "--doc_vectors" in err and "is also --output" in err
    assert open(data["input"], "rb").read() == data["bytes"]
    # stdin and stdout ("-") are streams, never files
    assert output_problems({"--output": "-"}, {"--input": "-"}) == []


def test_merge_shards_never_writes_over_a_part(data):
    part = data["root"] / "docs.part-00000-of-00001.safetensors"
    part.write_bytes(b"x")
    code, _, err = run_cli(predict.cli, ["merge-shards", "--doc_vectors", str(part), str(part)])
    assert code == 2 and "is also part 1, an input" in err and part.read_bytes() == b"x"


def _study_argv(data, out, *extra):
    return ["--backbone", "none", "--train_file", data["input"], "--test_file", data["input"], "--out", str(out),
            *extra]


def test_study_out_must_be_a_folder(data, capsys):
    target = data["root"] / "notes.txt"
    target.write_text("keep me")
    assert study.cli(_study_argv(data, target)) == 2
    err = capsys.readouterr().err
    one_error_line(err, "ugd.study: error: ", f"--out {target} is a file, not a folder")
    assert target.read_text() == "keep me"
    assert study.cli(_study_argv(data, data["input"])) == 2  # an input file
    assert "is also --train_file, an input" in capsys.readouterr().err
    assert study.cli(_study_argv(data, target / "sub")) == 2  # under a file
    assert "is a file, so no folder can hold this path" in capsys.readouterr().err


def test_a_broken_symbolic_link_on_the_output_path_is_named(tmp_path):
    # one nearest-existing rule for the commands' outputs and train's --output_dir: a dangling link counts
    # as existing, so the path is refused up front with what is wrong, not by makedirs halfway through
    from ugd._output_paths import writable_problem
    from ugd.training.checks import output_dir_problem

    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "missing-target")
    for problem in (writable_problem("--output", str(link / "out.json")),
                    writable_problem("--out", str(link), folder=True),
                    output_dir_problem(link / "run")):
        assert problem is not None and "broken symbolic link" in problem and "\n" not in problem
    assert output_dir_problem(tmp_path / "new" / "run") is None
