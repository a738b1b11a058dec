"""Bad arguments and inputs of ``python -m ugd.train``: one line on stderr, exit 2, no
traceback, and no model built. Most cases call ``ugd.train.cli`` in-process (they fail in parse_args
or load_data, before any model exists); one runs the module in a subprocess for the real console."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ugd import paradigms
from ugd.data.records import BadRecord, DataError, json_object, read_records
from ugd.train import cli
from ugd.training.args import ConfigError, parse_args
from ugd.training.build import load_data

REPO = Path(__file__).resolve().parents[2]
TINY = ["--backbone_config", json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 4, "num_key_value_heads": 2}),
        "--demo_train_size", "16", "--demo_eval_size", "8", "--num_reasons", "0", "--report_to", "none",
        "--cpu_threads", "1"]


def refused(capsys, argv, tmp_path, *must_contain):
    """cli(argv) exits 2 with one stderr line starting 'ugd.train: error:' that holds every string given."""
    if "--output_dir" not in argv:
        argv = [*argv, "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert cli([*TINY, *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ugd.train: error: ") and "Traceback" not in err
    for s in must_contain:
        assert s in lines[0], (s, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("value", ["-5", "-2"])
def test_max_steps_below_minus_one_is_refused(capsys, tmp_path, value):
    refused(capsys, ["--max_steps", value], tmp_path, f"--max_steps {value}", "-1")


def test_max_steps_minus_one_still_means_unset(tmp_path):
    run = parse_args([*TINY, "--max_steps", "-1", "--output_dir", str(tmp_path / "out")])
    assert run.training.max_steps == -1


@pytest.mark.parametrize("flag,value", [("--per_device_train_batch_size", "0"),
                                        ("--per_device_train_batch_size", "-3"),
                                        ("--per_device_eval_batch_size", "0"),
                                        ("--gradient_accumulation_steps", "0")])
def test_batch_sizes_below_one_are_refused(capsys, tmp_path, flag, value):
    refused(capsys, [flag, value], tmp_path, f"{flag} {value}", "at least 1")


# ------------------------------------------------------------------------------ output folder


def test_output_dir_under_a_regular_file(capsys, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    refused(capsys, ["--output_dir", str(f / "run")], tmp_path, str(f), "a file, not a folder")
    refused(capsys, ["--output_dir", str(f)], tmp_path, str(f), "a file, not a folder")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_dir_under_proc(capsys, tmp_path):
    refused(capsys, ["--output_dir", "/proc/ugd-run/out"], tmp_path, "/proc/ugd-run/out", "cannot be created")


def test_output_dir_check_leaves_no_trace(tmp_path):
    parse_args([*TINY, "--output_dir", str(tmp_path / "new" / "run")])
    assert list(tmp_path.iterdir()) == []  # checked by a temporary folder, created and removed


# ------------------------------------------------------------------------------ paradigm, format


def test_unknown_paradigm_is_one_line_listing_the_registered(capsys, tmp_path):
    line = refused(capsys, ["--paradigm", "nope"], tmp_path, "'nope'", *paradigms.names())
    assert "usage" not in line
    cfg = tmp_path / "run.yaml"
    cfg.write_text("paradigm: nope2\n")
    refused(capsys, ["--config", str(cfg)], tmp_path, str(cfg), "'nope2'", paradigms.names()[0])


def test_other_argparse_errors_are_one_line_too(capsys, tmp_path):
    refused(capsys, ["--max_steps", "many"], tmp_path, "--max_steps", "invalid int value", "--help")
    refused(capsys, ["--config"], tmp_path, "--config", "expected one argument")  # the early pre-parse too


def test_unknown_data_format(capsys, tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"query": "q", "document": "d", "label": 0}) + "\n")
    refused(capsys, ["--train_file", str(train), "--data_format", "xml"], tmp_path, "--data_format", "'esnli'")


def test_console_prints_one_line_without_usage(tmp_path):
    # the real entry point: nothing but the line (no usage block, no traceback), exit 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "ugd.train", "--paradigm", "nope", "--output_dir", str(tmp_path / "o")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("ugd.train: error: --paradigm")
    assert "Traceback" not in p.stderr and p.stdout == ""


# ------------------------------------------------------------------------------ data


def write_jsonl(path, labels_or_lines):
    lines = [x if isinstance(x, str) else json.dumps({"query": f"q{i}", "document": "d", "label": x})
             for i, x in enumerate(labels_or_lines)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_duplicate_json_keys_are_a_malformed_record(capsys, tmp_path):
    train = write_jsonl(tmp_path / "dup.jsonl", [0, 1, '{"query": "q", "document": "d", "label": 0, "label": 2}'])
    refused(capsys, ["--train_file", str(train)], tmp_path, f"{train}:3:", "'label' appears twice",
            "--skip_bad_records")
    records, stats = read_records(train, skip_bad=True)
    assert len(records) == 2 and stats.skipped_malformed == 1
    with pytest.raises(BadRecord, match="'a' appears twice"):  # nested objects too
        json_object('{"query": "q", "meta": {"a": 1, "a": 2}}')
    # ugd.predict reads its input with the same function: ordinary lines still parse
    from ugd.predict import _parse_line

    assert _parse_line('{"query": "q", "document": "d", "x": {"a": 1}}', ("query", "document"))["query"] == "q"
    with pytest.raises(BadRecord, match="appears twice"):
        _parse_line('{"query": "q", "query": "r", "document": "d"}', ("query", "document"))


def test_label_gap_warns_before_training(capsys, tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", [0, 1, 2, 0, 7, 1, 2])
    run = parse_args(["--train_file", str(train), "--output_dir", str(tmp_path / "out")])
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="ugd.train"):
        records, _, _, num_labels = load_data(run, None)
    assert num_labels == 8 and len(records) == 7  # not an error: a class may really be unused
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ugd.train: warning:")]
    assert len(warned) == 1, warned
    for s in ("3, 4, 5, 6 never occur", "label 7", f"{train}:5", "--num_labels 8", "Fix the file"):
        assert s in warned[0], s
    assert any("never occur" in r.getMessage() for r in caplog.records)  # and logged, for log files


def test_no_label_gap_warning_when_contiguous_or_given(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [0, 1, 2, 1])
    load_data(parse_args(["--train_file", str(train), "--output_dir", str(tmp_path / "o")]), None)
    gap = write_jsonl(tmp_path / "gap.jsonl", [0, 2])
    load_data(parse_args(["--train_file", str(gap), "--output_dir", str(tmp_path / "o")]), 3)  # --num_labels 3
    assert "ugd.train: warning" not in capsys.readouterr().err
    ones = write_jsonl(tmp_path / "zeros.jsonl", [0, 0])  # one class only: 2 classes, 1 unseen
    load_data(parse_args(["--train_file", str(ones), "--output_dir", str(tmp_path / "o")]), None)
    assert "label 1 never occurs" in capsys.readouterr().err


def test_bad_num_labels_data_still_names_the_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [0, 1, 7])
    with pytest.raises(DataError, match=r"train\.jsonl:3: label 7 is out of range for num_labels=3"):
        load_data(parse_args(["--train_file", str(train), "--output_dir", str(tmp_path / "o")]), 3)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_max_samples_take_the_first_records_and_keep_the_classes(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [0, 1, 0, 1, 2])
    dev = write_jsonl(tmp_path / "dev.jsonl", [1, 0, 2])
    run = parse_args(["--train_file", str(train), "--eval_file", str(dev), "--max_train_samples", "3",
                      "--max_eval_samples", "2", "--output_dir", str(tmp_path / "o")])
    records, dev_records, info, num_labels = load_data(run, None)
    assert [r["label"] for r in records] == [0, 1, 0] and [r["label"] for r in dev_records] == [1, 0]
    assert num_labels == 3  # from the whole file, as without the limit
    assert "the first 3 used" in info["train"] and "the first 2 used" in info["eval"]
    records, _, _, _ = load_data(parse_args(["--train_file", str(train), "--max_train_samples", "50",
                                             "--output_dir", str(tmp_path / "o")]), None)
    assert len(records) == 5


@pytest.mark.parametrize("flag", ["--max_train_samples", "--max_eval_samples"])
def test_max_samples_below_one_are_refused(capsys, tmp_path, flag):
    train = write_jsonl(tmp_path / "train.jsonl", [0, 1])
    refused(capsys, ["--train_file", str(train), "--eval_file", str(train), flag, "0"], tmp_path, f"{flag} 0",
            "at least 1")
