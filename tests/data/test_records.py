"""ugd.data.records: the readers of docs/spec.md section 8 on small hand-written files."""

import csv
import io
import json
import os
import pickle
from pathlib import Path

import pytest

from ugd.data.records import NLI_LABELS, DataError, ReadStats, RecordDataset, read_records, write_jsonl


def write(tmp_path, name, text):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def rec(q, d, label, reason=None):
    return {"query": q, "document": d, "label": label, "reason": reason}


# ------------------------------------------------------------------------------ formats


def test_jsonl(tmp_path):
    p = write(tmp_path, "train.jsonl", "\n".join([
        json.dumps({"query": "red shoes", "document": "red running shoes", "label": 3, "reason": "exact match"}),
        "",
        json.dumps({"query": "lamp", "document": "a mug", "label": "0", "id": 7}),  # int string; extra key ignored
        "   ",
        json.dumps({"query": "q", "document": "d", "label": 1, "reason": ""}),  # reason "" -> None
        json.dumps({"query": "早上好", "document": "你好", "label": 2, "reason": None}),
    ]) + "\n")
    records, stats = read_records(p)
    assert records == [rec("red shoes", "red running shoes", 3, "exact match"), rec("lamp", "a mug", 0),
                       rec("q", "d", 1), rec("早上好", "你好", 2)]
    assert (stats.read, stats.kept, stats.skipped_malformed, stats.dropped_no_label) == (4, 4, 0, 0)
    assert stats.fmt == "jsonl" and stats.path == str(p)
    assert read_records(p, fmt="jsonl")[0] == records
    assert read_records(str(p), fmt="ugd")[0] == records


def test_lcqmc(tmp_path):
    p = write(tmp_path, "lcqmc.tsv", "喜欢打篮球的男生喜欢什么样的女生\t爱打篮球的男生喜欢什么样的女生\t1\n"
                                     "我手机丢了，我想换个手机\t我想买个新手机，求推荐\t1\r\n\n"
                                     "大家觉得她好看吗\t大家觉得跑男好看吗？\t0\n")
    records, stats = read_records(p)
    assert stats.fmt == "lcqmc" and stats.kept == 3 and stats.read == 3
    assert records[1] == rec("我手机丢了，我想换个手机", "我想买个新手机，求推荐", 1)  # \r\n stripped
    assert [r["label"] for r in records] == [1, 1, 0]
    # BQ / ATEC use the same reader; an ATEC raw file has a leading id column; a header row is skipped
    p2 = write(tmp_path, "atec.txt", "text_a\ttext_b\tlabel\n1\t怎么更改花呗手机号码\t我的花呗是以前的手机号码\t1\n")
    records, stats = read_records(p2, fmt="atec")
    assert records == [rec("怎么更改花呗手机号码", "我的花呗是以前的手机号码", 1)] and stats.read == 1


def test_qqp(tmp_path):
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    p = write(tmp_path, "train.tsv", header + "133273\t213221\t213222\tHow is the life of a math student?\t"
                                              "Which level of prepration is enough?\t0\n"
                                              "402555\t536040\t536041\tHow do I control my horny emotions?\t"
                                              "How do you control your horniness?\t1\n")
    records, stats = read_records(p)
    assert stats.fmt == "qqp" and stats.read == 2
    assert records[1] == rec("How do I control my horny emotions?", "How do you control your horniness?", 1)
    # columns are found by name, in any order
    p2 = write(tmp_path, "other.tsv", "is_duplicate\tquestion2\tquestion1\n0\tb?\ta?\n")
    assert read_records(p2)[0] == [rec("a?", "b?", 0)]


def test_nli_drops_and_counts_no_gold_label(tmp_path):
    lines = [
        {"gold_label": "neutral", "sentence1": "A person on a horse.", "sentence2": "A person is training.", "pairID": "1"},
        {"gold_label": "-", "sentence1": "Two kids.", "sentence2": "Kids play."},
        {"gold_label": "contradiction", "sentence1": "A man sleeps.", "sentence2": "A man runs."},
        {"gold_label": "entailment", "sentence1": "A dog runs.", "sentence2": "An animal moves."},
        {"gold_label": "-", "sentence1": "x", "sentence2": "y"},
    ]
    p = write(tmp_path, "snli_1.0_dev.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    records, stats = read_records(p, num_labels=3)
    assert stats.fmt == "nli"
    assert [r["label"] for r in records] == [1, 2, 0]
    assert records[0] == rec("A person on a horse.", "A person is training.", 1)
    assert (stats.read, stats.kept, stats.dropped_no_label, stats.skipped_malformed) == (5, 3, 2, 0)
    assert "dropped 2 without a gold label" in str(stats)
    # an unknown gold label is malformed, not dropped
    p2 = write(tmp_path, "bad.jsonl", json.dumps({"gold_label": "maybe", "sentence1": "a", "sentence2": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: gold_label 'maybe'"):
        read_records(p2)


def test_label_map(tmp_path):
    p = write(tmp_path, "graded.tsv", "a\tb\tgood\nc\td\tbad\ne\tf\t1\n")
    records, _ = read_records(p, label_map={"bad": 0, "good": 2})
    assert [r["label"] for r in records] == [2, 0, 1]
    with pytest.raises(DataError, match=r"graded\.tsv:1: label 'good' is not an integer"):
        read_records(p)
    with pytest.raises(ValueError, match="label_map"):
        read_records(p, label_map={"bad": "0"})


# ------------------------------------------------------------------------------ auto detection


def test_auto_detection(tmp_path):
    ugd = json.dumps({"query": "q", "document": "d", "label": 1})
    nli = json.dumps({"sentence1": "a", "sentence2": "b", "gold_label": "neutral"})
    cases = {
        "a.jsonl": (ugd, "jsonl"), "b.json": (nli, "nli"), "c.ndjson": (ugd, "jsonl"),
        "d.tsv": ("q\td\t1", "lcqmc"), "e.txt": ("q\td\t0", "lcqmc"),
        "f.tsv": ("id\tquestion1\tquestion2\tis_duplicate\n1\tq\td\t1", "qqp"),
        "noext": (ugd, "jsonl"), "noext2": ("q\td\t1", "lcqmc"),
    }
    for name, (text, fmt) in cases.items():
        records, stats = read_records(write(tmp_path, name, text + "\n"))
        assert stats.fmt == fmt, name
        assert len(records) == 1 and records[0]["label"] in (0, 1), name
    # a malformed first line does not confuse detection; it is reported (or skipped) with its line
    p = write(tmp_path, "g.jsonl", "{oops\n" + ugd + "\n")
    with pytest.raises(DataError, match=r"g\.jsonl:1: bad JSON"):
        read_records(p)
    assert read_records(p, skip_bad=True)[1].skipped_malformed == 1


def test_auto_detection_failures_name_the_formats(tmp_path):
    p = write(tmp_path, "x.jsonl", json.dumps({"text": "a", "y": 1}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:1: cannot detect .*'jsonl'.*'lcqmc'.*'qqp'.*'nli'"):
        read_records(p)
    p = write(tmp_path, "x.csv", "a,b,1\n")
    with pytest.raises(DataError, match=r"x\.csv: cannot detect .*'\.csv'.*'jsonl'.*'lcqmc'.*'qqp'.*'nli'"):
        read_records(p)
    p = write(tmp_path, "arr.json", '[{"query": "a", "document": "b", "label": 1}]\n')
    with pytest.raises(DataError, match=r"arr\.json:1: .*JSON array"):
        read_records(p)
    p = write(tmp_path, "snli_1.0_dev.txt", "gold_label\tsentence1_parse\tsentence1\tsentence2\nneutral\t(a)\ta\tb\n")
    with pytest.raises(DataError, match=r"snli_1\.0_dev\.txt:1: .*SNLI.*fmt='nli'"):
        read_records(p)
    with pytest.raises(ValueError, match=r"unknown data format 'csv'.*'jsonl'"):
        read_records(p, fmt="csv")


def test_empty_file(tmp_path):
    records, stats = read_records(write(tmp_path, "empty.jsonl", "\n\n"))
    assert records == [] and stats.read == 0 and stats.kept == 0


# ------------------------------------------------------------------------------ errors


BAD_JSONL = [
    ('{"query": "a", "document": "b", "label": 1', "bad JSON"),
    ('["a", "b", 1]', "expected a JSON object"),
    ('{"document": "b", "label": 1}', "missing field 'query'"),
    ('{"query": "a", "label": 1}', "missing field 'document'"),
    ('{"query": "a", "document": "b"}', "missing field 'label'"),
    ('{"query": "a", "document": "b", "label": null}', "missing field 'label'"),
    ('{"query": "a", "document": "b", "label": "one"}', "label 'one' is not an integer"),
    ('{"query": "a", "document": "b", "label": 1.5}', "label must be an integer"),
    ('{"query": "a", "document": "b", "label": true}', "label must be an integer"),
    ('{"query": 3, "document": "b", "label": 1}', "field 'query' must be a string"),
    ('{"query": "a", "document": "b", "label": 1, "reason": 5}', "field 'reason' must be a string or null"),
]


@pytest.mark.parametrize("line,problem", BAD_JSONL)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, problem):
    good = json.dumps({"query": "q", "document": "d", "label": 0})
    p = write(tmp_path, "train.jsonl", good + "\n\n" + line + "\n" + good + "\n")
    with pytest.raises(DataError) as e:
        read_records(p, fmt="jsonl")
    assert str(e.value).startswith(f"{p}:3: {problem}")
    assert e.value.line == 3 and e.value.path == str(p)
    assert isinstance(e.value, ValueError)
    records, stats = read_records(p, fmt="jsonl", skip_bad=True)
    assert len(records) == 2
    assert (stats.read, stats.kept, stats.skipped_malformed) == (3, 2, 1)
    assert stats.errors[0].startswith(f"{p}:3: {problem}") and "skipped 1 malformed" in str(stats)


def test_malformed_tsv_lines(tmp_path):
    p = write(tmp_path, "lcqmc.tsv", "a\tb\t1\na\tb\n\na\tb\tc\t1\na\tb\tx\na\tb\t0\n")
    with pytest.raises(DataError, match=r"lcqmc\.tsv:2: expected 3 tab-separated columns"):
        read_records(p)
    records, stats = read_records(p, skip_bad=True)
    assert len(records) == 2 and stats.skipped_malformed == 3 and stats.read == 5
    assert [e.split(": ")[0] for e in stats.errors] == [f"{p}:2", f"{p}:4", f"{p}:5"]
    q = write(tmp_path, "qqp.tsv", "question1\tquestion2\tis_duplicate\na\tb\t1\na\tb\n")
    with pytest.raises(DataError, match=r"qqp\.tsv:3: expected 3 tab-separated columns as in the header"):
        read_records(q)
    q = write(tmp_path, "q2.tsv", "question1\tquestion2\tlabel\na\tb\t1\n")
    with pytest.raises(DataError, match=r"q2\.tsv:1: .*lacks the column\(s\) \['is_duplicate'\]"):
        read_records(q, fmt="qqp")


def test_bad_utf8_is_a_malformed_line(tmp_path):
    p = write(tmp_path, "x.tsv", b"\xef\xbb\xbfa\tb\t1\n\xff\xfe\tb\t0\nc\td\t0\n")  # BOM on line 1 is fine
    with pytest.raises(DataError, match=r"x\.tsv:2: not valid UTF-8"):
        read_records(p)
    records, stats = read_records(p, skip_bad=True)
    assert records[0] == rec("a", "b", 1) and stats.skipped_malformed == 1 and stats.kept == 2


def test_label_out_of_range_is_an_error_even_with_skip_bad(tmp_path):
    lines = [json.dumps({"query": "q", "document": "d", "label": x}) for x in (0, 3, "{")]
    p = write(tmp_path, "train.jsonl", "\n".join(lines[:2]) + "\n")
    assert len(read_records(p)[0]) == 2  # no num_labels: no upper bound
    for skip in (False, True):
        with pytest.raises(DataError) as e:
            read_records(p, num_labels=3, skip_bad=skip)
        assert str(e.value) == f"{p}:2: label 3 is out of range for num_labels=3"
    neg = write(tmp_path, "neg.tsv", "a\tb\t-1\n")
    with pytest.raises(DataError, match=r"neg\.tsv:1: label -1 is negative"):
        read_records(neg, skip_bad=True)
    nli = write(tmp_path, "n.jsonl", json.dumps({"sentence1": "a", "sentence2": "b", "gold_label": "contradiction"}))
    with pytest.raises(DataError, match="label 2 is out of range for num_labels=2"):
        read_records(nli, num_labels=2)


def test_missing_file_and_bad_arguments(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope.train\.jsonl") as e:
        read_records(missing)
    assert e.value.filename == str(missing)
    p = write(tmp_path, "a.tsv", "a\tb\t1\n")
    with pytest.raises(ValueError, match="num_labels"):
        read_records(p, num_labels=0)
    with pytest.raises(IsADirectoryError):
        read_records(tmp_path)


def test_data_error_pickles():
    e = pickle.loads(pickle.dumps(DataError("data/train.jsonl", 17, "label 7 is out of range for num_labels=4")))
    assert str(e) == "data/train.jsonl:17: label 7 is out of range for num_labels=4" and e.line == 17


def test_read_stats_str():
    s = ReadStats(read=10, kept=8, skipped_malformed=1, dropped_no_label=1, path="d.jsonl", fmt="nli",
                  errors=["d.jsonl:4: bad JSON"])
    assert str(s) == ("d.jsonl (nli): read 10, kept 8, skipped 1 malformed (first: d.jsonl:4: bad JSON), "
                      "dropped 1 without a gold label")
    assert "\n" not in str(ReadStats(3, 3, 0, 0))


# ------------------------------------------------------------------------------ dataset and writing


def test_write_jsonl_round_trip_and_dataset(tmp_path):
    records = [rec("red shoes", "red running shoes", 3, "exact match"), rec("杯子", "碗", 0)]
    path = tmp_path / "out" / "train.jsonl"
    assert write_jsonl(records, path) == 2
    assert [f for f in os.listdir(path.parent)] == ["train.jsonl"]  # no temp file left behind
    assert "杯子" in path.read_text(encoding="utf-8")
    back, stats = read_records(path, num_labels=4)
    assert back == records and stats.kept == 2
    write_jsonl(records[:1], path)  # replaces
    assert read_records(path)[0] == records[:1]

    ds = RecordDataset.from_file(path)
    assert len(ds) == 1 and ds[0] == records[0] and ds.stats.kept == 1 and ds.labels == [3]
    ds = RecordDataset(records)
    assert len(ds) == 2 and ds[1]["query"] == "杯子"

    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=list)
    assert next(iter(loader)) == records


def test_write_jsonl_failure_leaves_old_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl([rec("a", "b", 1)], path)

    def bad():
        yield rec("c", "d", 0)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl(bad(), path)
    assert read_records(path)[0] == [rec("a", "b", 1)]
    assert os.listdir(tmp_path) == ["train.jsonl"]


def test_nan_constants_are_malformed_and_the_hint_names_the_callers_flag(tmp_path):
    """Python's json reads NaN / Infinity, JSON has neither: such a line is malformed, and the
    error names how the caller skips it (ugd.train passes --skip_bad_records)."""
    f = tmp_path / "d.jsonl"
    f.write_text('{"query": "a", "document": "b", "label": 1}\n{"query": "a", "document": "b", "label": NaN}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: .*NaN.*pass skip_bad=True"):
        read_records(f)
    with pytest.raises(DataError, match=r"pass --skip_bad_records to skip"):
        read_records(f, skip_hint="--skip_bad_records")
    records, stats = read_records(f, skip_bad=True)
    assert len(records) == 1 and stats.skipped_malformed == 1


# ------------------------------------------------------------------------------ e-SNLI CSV

ESNLI_DATA = Path(os.environ.get("UGD_DATA_DIR") or Path(__file__).resolve().parents[2].parent / "shared" / "data") \
    / "esnli"
TRAIN_HEADER = ["pairID", "gold_label", "Sentence1", "Sentence2", "Explanation_1", "Sentence1_marked_1",
                "Sentence2_marked_1", "Sentence1_Highlighted_1", "Sentence2_Highlighted_1"]
DEV_HEADER = TRAIN_HEADER + [f"{c}_{k}" for k in (2, 3) for c in ("Explanation", "Sentence1_marked", "Sentence2_marked",
                                                                     "Sentence1_Highlighted", "Sentence2_Highlighted")]


def esnli_csv(header, rows) -> str:
    """CSV text as e-SNLI's files have it (the csv module quotes fields with commas, quotes, newlines)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for r in rows:  # r: pairID, gold, s1, s2, explanations...; marked/highlighted columns filled in
        row = dict(zip(["pairID", "gold_label", "Sentence1", "Sentence2"], r[:4]))
        for k, e in enumerate(r[4:], 1):
            row[f"Explanation_{k}"] = e
        w.writerow([row.get(c, "*x*" if "marked" in c else "{}") for c in header])
    return out.getvalue()


def test_esnli_csv(tmp_path):
    text = esnli_csv(DEV_HEADER, [
        ("3416050480.jpg#4r1n", "neutral", 'A person, on a "horse", jumps.', "A person is\ntraining.",
         "Not all jumps, are training.", "", "The horse could be, anything."),
        ("1r", "-", "no", "majority", "x", "", ""),
        ("2r", "contradiction", "A man sleeps.", "A man runs.", "Sleeping is not running.", "Both can't be.", "  "),
        ("3r", "maybe", "a", "b", "c", "", ""),
        ("4r", "entailment", "A dog runs.", "An animal moves.", "", "", ""),
    ])
    p = write(tmp_path, "esnli_dev.csv", text)
    records, stats = read_records(p, num_labels=3, skip_bad=True)  # auto: a .csv whose header names pairID, gold_label
    assert stats.fmt == "esnli"
    assert records[0] == {"query": 'A person, on a "horse", jumps.', "document": "A person is\ntraining.",
                          "label": 1, "reason": "Not all jumps, are training.", "id": "3416050480.jpg#4r1n",
                          "references": ["Not all jumps, are training.", "The horse could be, anything."]}
    assert records[1]["references"] == ["Sleeping is not running.", "Both can't be."] and records[1]["label"] == 2
    assert records[2]["reason"] is None and "references" not in records[2] and records[2]["label"] == 0
    # '-': dropped and counted; an unknown gold label ('maybe') is a malformed row, skipped and counted apart
    assert (stats.read, stats.kept, stats.dropped_no_label, stats.skipped_malformed) == (5, 3, 1, 1)
    assert "dropped 1 without a gold label" in str(stats) and "gold_label 'maybe' is not one of" in str(stats)
    assert stats.label_lines == {1: 2, 2: 5, 0: 7}  # a row spans lines 2-3; its line is its first
    # the train file's header (Explanation_1 only), a BOM and CRLF line ends; aliases
    train = write(tmp_path, "esnli_train_1.csv", ("\ufeff" + esnli_csv(TRAIN_HEADER, [
        ("9r", "entailment", "Two, kids.", "Kids.", "Two kids are kids."),
    ])).replace("\n", "\r\n"))
    records, stats = read_records(train, fmt="e-snli")
    assert records == [{"query": "Two, kids.", "document": "Kids.", "label": 0, "reason": "Two kids are kids.",
                        "id": "9r", "references": ["Two kids are kids."]}]


def test_esnli_errors_name_file_line_and_column(tmp_path):
    no_col = write(tmp_path, "esnli_test.csv", "pairID,gold_label,Sentence1,Sentence2\n1r,neutral,a,b\n")
    with pytest.raises(DataError) as e:
        read_records(no_col)
    assert str(e.value).startswith(f"{no_col}:1: the e-SNLI header lacks the column(s) ['Explanation_1']")
    no_s2 = write(tmp_path, "renamed.csv", "pairID,gold_label,Sentence1,Hypothesis,Explanation_1\n")
    with pytest.raises(DataError, match=r"renamed\.csv:1: .*lacks the column\(s\) \['Sentence2'\]"):
        read_records(no_s2)
    header = ",".join(TRAIN_HEADER) + "\n"
    bad = write(tmp_path, "bad.csv", header + "1r,neutral,a,b,c,,,{},{}\n"
                                              '2r,neutral,"a\nb",b,c,,{},{}\n'  # a field short, over 2 lines
                                              '3r,neutral,"a"x,b,c,,,{},{}\n'  # text after a closing quote
                                              "4r,entailment,a,b,c,,,{},{}\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: expected 9 comma-separated fields as in the header, got 8 "
                                        r"\(pass skip_bad=True"):
        read_records(bad)
    records, stats = read_records(bad, skip_bad=True)
    assert [r["id"] for r in records] == ["1r", "4r"] and stats.skipped_malformed == 2
    assert [x.split(": ")[0] for x in stats.errors] == [f"{bad}:3", f"{bad}:5"] and "bad CSV quoting" in stats.errors[1]
    unclosed = write(tmp_path, "open.csv", header + '1r,neutral,"a,b,c,,,{},{}\n2r,neutral,a,b,c,,,{},{}\n')
    with pytest.raises(DataError, match=r"open\.csv:2: bad CSV quoting"):
        read_records(unclosed)
    utf8 = write(tmp_path, "u.csv", header.encode() + b"1r,neutral,\xff,b,c,,,{},{}\n2r,neutral,a,b,c,,,{},{}\n")
    with pytest.raises(DataError, match=r"u\.csv:2: not valid UTF-8"):
        read_records(utf8)
    assert len(read_records(utf8, skip_bad=True)[0]) == 1
    with pytest.raises(DataError, match=r"label 2 is out of range for num_labels=2"):
        read_records(write(tmp_path, "c.csv", header + "1r,contradiction,a,b,c,,,{},{}\n"), num_labels=2)


def test_esnli_records_pass_the_collator_and_jsonl(tmp_path):
    from ugd.data.collator import UGDCollator
    from ugd.data.demo import build_tokenizer
    from ugd.data.layout import LayoutConfig, add_special_tokens

    p = write(tmp_path, "esnli_dev.csv", esnli_csv(DEV_HEADER, [
        ("1r", "neutral", "a man sleeps", "a man runs", "one can not sleep and run", "two", "three"),
        ("2r", "entailment", "a dog runs", "an animal moves", "a dog is an animal", "", "")]))
    records, _ = read_records(p)
    tok = build_tokenizer(records)
    add_special_tokens(tok)
    batch = UGDCollator(tok, layout=LayoutConfig(max_query_len=16, max_document_len=16, max_reason_len=16))(records)
    assert batch["labels"].tolist() == [1, 0]
    # written as jsonl and read back, the references stay (the id, like any other key, does not)
    write_jsonl(records, tmp_path / "esnli.jsonl")
    back, _ = read_records(tmp_path / "esnli.jsonl")
    assert [r.get("references") for r in back] == [r["references"] for r in records]
    assert all("id" not in r for r in back)


@pytest.mark.skipif(not (ESNLI_DATA / "dev.jsonl").is_file(), reason="needs shared/data/esnli (UGD_DATA_DIR)")
def test_esnli_csv_of_the_shared_dev_rows_reads_back(tmp_path):
    with open(ESNLI_DATA / "dev.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(200), f)]
    names = {v: k for k, v in NLI_LABELS.items()}
    text = esnli_csv(DEV_HEADER, [(f"{i}r", names[r["label"]], r["query"], r["document"], r["reason"], "", "")
                                  for i, r in enumerate(rows)])
    records, stats = read_records(write(tmp_path, "esnli_dev.csv", text), num_labels=3)
    assert stats.kept == len(rows) == 200
    assert [(r["query"], r["document"], r["label"], r["reason"]) for r in records] == \
        [(r["query"], r["document"], r["label"], r["reason"]) for r in rows]


# ------------------------------------------------------------------------------ the bad-record rule (issue 35)


@pytest.mark.parametrize("fmt,line", [
    ("jsonl", json.dumps({"query": "  ", "document": "a mug", "label": 1})),
    ("jsonl", json.dumps({"query": "lamp", "document": "", "label": 1})),
    ("lcqmc", "lamp\t\t1"),
    ("nli", json.dumps({"sentence1": "\t", "sentence2": "b", "gold_label": "neutral"})),
])
def test_empty_text_is_a_bad_record_with_file_and_line(tmp_path, fmt, line):
    good = {"jsonl": json.dumps({"query": "q", "document": "d", "label": 0}), "lcqmc": "q\td\t0",
            "nli": json.dumps({"sentence1": "q", "sentence2": "d", "gold_label": "entailment"})}[fmt]
    p = write(tmp_path, f"data.{'tsv' if fmt == 'lcqmc' else 'jsonl'}", f"{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as e:
        read_records(p, fmt=fmt)
    assert str(e.value).startswith(f"{p}:2: the ") and "is empty (or only whitespace)" in str(e.value)
    assert "skip_bad" in str(e.value)
    records, stats = read_records(p, fmt=fmt, skip_bad=True)
    assert len(records) == 2 and stats.skipped_malformed == 1 and "skipped 1 malformed" in str(stats)


def test_esnli_misspelt_label_is_a_bad_record_not_a_missing_one(tmp_path):
    p = write(tmp_path, "esnli_dev.csv", esnli_csv(DEV_HEADER, [
        ("1r", "entailment", "A dog runs.", "An animal moves.", "e", "", ""),
        ("2r", "Entailment", "A dog runs.", "An animal moves.", "e", "", ""),
        ("3r", "-", "no", "majority", "x", "", ""),
    ]))
    with pytest.raises(DataError) as e:
        read_records(p)
    assert str(e.value).startswith(f"{p}:3: gold_label 'Entailment' is not one of")
    records, stats = read_records(p, skip_bad=True)
    assert len(records) == 1 and (stats.skipped_malformed, stats.dropped_no_label) == (1, 1)
    text = str(stats)
    assert "skipped 1 malformed" in text and "'Entailment'" in text and "dropped 1 without a gold label" in text
