"""Reading matching data sets into UGD records (docs/spec.md section 8).

A record is ``{"query": str, "document": str, "label": int, "reason": str | None}``::

    records, stats = read_records("data/train.jsonl", num_labels=4)
    print(stats)                       # data/train.jsonl (jsonl): read 1000, kept 1000, ...
    dataset = RecordDataset(records)   # dataset[i] is the record; ugd.data.collator.UGDCollator encodes
    write_jsonl(records, "out/train.jsonl")

Formats (``fmt``):

    "jsonl"  UGD records, one JSON object a line: "query", "document", "label" (an int or an int
             string), "reason" optional (a string or null; "" is stored as None), "teacher_score"
             optional (a finite number: a small model's score of the pair, for flipped-kd), "references"
             optional (a list of strings: all gold reasons, for multi-reference reason scores; empty
             ones dropped). Other keys are ignored.
    "lcqmc"  tab-separated ``text_a<TAB>text_b<TAB>label``, no header (LCQMC, BQ, ATEC). A first line
             whose label column reads "label" is taken as a header and skipped; a leading integer id
             column (ATEC's raw files: ``id<TAB>text_a<TAB>text_b<TAB>label``) is accepted.
    "qqp"    Quora Question Pairs TSV with a header row; the columns question1, question2 and
             is_duplicate are found by name (GLUE's train.tsv / dev.tsv and the original Quora file).
    "nli"    SNLI / MultiNLI JSONL: "sentence1", "sentence2", "gold_label" with entailment=0,
             neutral=1, contradiction=2. Rows whose gold_label is "-" (no annotator majority) are
             dropped and counted in ``ReadStats.dropped_no_label``.
    "esnli"  e-SNLI's official CSVs (esnli_train_1.csv, esnli_dev.csv, esnli_test.csv): a header row,
             then comma-separated rows read with the ``csv`` module (quoted fields may hold commas,
             quotes and newlines; line numbers are those of a row's first line). The columns pairID,
             gold_label, Sentence1, Sentence2, Explanation_1 (and Explanation_2/_3 in dev/test) are found
             by name. Record: query=Sentence1, document=Sentence2, label as for "nli", reason=
             Explanation_1, plus "references" (the non-empty Explanation_1..3, for multi-reference
             reason scores; absent when all are empty) and "id" (the pairID). Rows whose gold_label is
             "-" or empty (no annotator majority) are dropped and counted in
             ``ReadStats.dropped_no_label``; any other value that is not entailment/neutral/contradiction
             (a capitalised or misspelt "Entailment") is a malformed row (see Errors).
    "auto"   by extension and content: .jsonl/.json/.ndjson -> "jsonl" when the first record has
             "query", "nli" when it has "sentence1"; .tsv/.txt/.tab -> "qqp" when the first line is a
             header naming question1, else "lcqmc"; .csv (or a first line with commas and no tab) ->
             "esnli" when the header names pairID or gold_label. Other extensions are sniffed the same
             way from the first line ("{" -> JSON, a tab -> TSV).

Aliases: "ugd" = "jsonl"; "bq", "atec" = "lcqmc"; "snli", "mnli", "multinli" = "nli"; "e-snli" = "esnli".

Errors: the bad-record rule of every reader and command (docs/training.md, "Inputs and outputs").
Every problem of a record raises ``DataError`` with ``path:line: problem`` (1-based line numbers,
counting blank lines). With ``skip_bad=True`` a malformed line (bad JSON or UTF-8, a key twice in one
JSON object, a missing or non-string field, an empty or whitespace-only query or document, a wrong
column count, bad CSV quoting, a label that is not an integer or not in ``label_map``, an NLI / e-SNLI
gold_label that is not one of the label names, such as "Entailment") is skipped and counted in
``ReadStats.skipped_malformed`` (its message kept in ``ReadStats.errors``, the first
``MAX_KEPT_ERRORS`` of them) -- never silently dropped. A label outside ``[0, num_labels)``, or a
negative label, is an error even with ``skip_bad``: it means the data and the model disagree on the
label set. Blank lines are ignored. Only a row whose gold_label says "no label" (SNLI's "-", or an
empty one in e-SNLI) is dropped without ``skip_bad``, counted in ``ReadStats.dropped_no_label``.
"""

from __future__ import annotations

import csv
import errno
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from .._files import atomic_text_file

FORMATS = ("jsonl", "lcqmc", "qqp", "nli", "esnli")
FORMAT_ALIASES = {"ugd": "jsonl", "bq": "lcqmc", "atec": "lcqmc", "snli": "nli", "mnli": "nli", "multinli": "nli",
                  "e-snli": "esnli"}
FORMAT_HELP = (
    "'jsonl' (UGD records: query, document, label, reason?), 'lcqmc' (text_a<TAB>text_b<TAB>label, also BQ "
    "and ATEC), 'qqp' (Quora TSV with a header: question1, question2, is_duplicate), 'nli' (SNLI/MultiNLI "
    "JSONL: sentence1, sentence2, gold_label), 'esnli' (e-SNLI's CSV: pairID, gold_label, Sentence1, Sentence2, "
    "Explanation_1..3)"
)
NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
NLI_NO_LABEL = "-"
QQP_COLUMNS = ("question1", "question2", "is_duplicate")
#: e-SNLI CSV columns read (the *_marked_* / *_Highlighted_* columns are not used)
ESNLI_COLUMNS = ("pairID", "gold_label", "Sentence1", "Sentence2", "Explanation_1")
ESNLI_EXTRA_EXPLANATIONS = ("Explanation_2", "Explanation_3")  # dev and test only
JSON_EXTENSIONS = (".jsonl", ".json", ".ndjson")
CSV_EXTENSIONS = (".csv",)
TSV_EXTENSIONS = (".tsv", ".txt", ".tab")
MAX_KEPT_ERRORS = 10


class DataError(ValueError):
    """A problem with a data file; ``str(e)`` is ``"path:line: problem"`` (``"path: problem"`` when the
    problem is the whole file's). ``e.path``, ``e.line`` (1-based, or None) and ``e.problem`` hold the parts."""

    def __init__(self, path, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.problem))


@dataclass
class ReadStats:
    """What ``read_records`` did with a file: ``read`` data lines (CSV: rows; blank lines and a header
    not counted) = ``kept`` + ``skipped_malformed`` + ``dropped_no_label``. ``dropped_values`` counts the
    gold_label values of the dropped rows; ``label_lines`` maps each kept label to the line of its first
    record (for messages such as ugd.train's warning about labels missing from 0..max)."""

    read: int = 0
    kept: int = 0
    skipped_malformed: int = 0
    dropped_no_label: int = 0
    path: str | None = None
    fmt: str | None = None
    errors: list = field(default_factory=list)  # messages of the first skipped lines
    dropped_values: dict = field(default_factory=dict)  # gold_label value -> rows dropped
    label_lines: dict = field(default_factory=dict)  # label -> line of its first kept record

    def __str__(self) -> str:
        head = f"{self.path} ({self.fmt})" if self.path else (self.fmt or "data")
        s = f"{head}: read {self.read}, kept {self.kept}"
        if self.skipped_malformed:
            s += f", skipped {self.skipped_malformed} malformed (first: {self.errors[0]})" if self.errors else \
                f", skipped {self.skipped_malformed} malformed"
        if self.dropped_no_label:
            s += f", dropped {self.dropped_no_label} without a gold label"
            if set(self.dropped_values) - {NLI_NO_LABEL}:  # say which values, unless it is only SNLI's '-'
                shown = sorted(self.dropped_values.items(), key=lambda kv: -kv[1])[:5]
                s += " (gold_label " + ", ".join(f"{v!r} x{c}" for v, c in shown) + \
                     (", ..." if len(self.dropped_values) > 5 else "") + ")"
        return s


class BadRecord(Exception):
    """A malformed line (skippable with skip_bad)."""


class _LabelOutOfRange(Exception):
    """A label outside [0, num_labels) (never skippable)."""


class _NoLabel(Exception):
    """An NLI row without a gold label (dropped and counted); ``args[0]`` is the gold_label value."""


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def decode_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, str | None, str | None]]:
    """(1-based line number, text or None, decode error or None) for each line of a binary stream;
    a UTF-8 byte-order mark and CRLF line ends are accepted."""
    for n, raw in enumerate(lines, 1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.rstrip(b"\r\n")
        try:
            yield n, raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            yield n, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"


def _lines(path: str) -> Iterator[tuple[int, str | None, str | None]]:
    """``decode_lines`` of a file."""
    with open(path, "rb") as f:
        yield from decode_lines(f)


def check_format(fmt: str) -> str:
    """The canonical name of a format name or alias (``"auto"`` too); ValueError naming the formats."""
    if not isinstance(fmt, str):
        raise ValueError(f"fmt must be a string, got {type(fmt).__name__}")
    f = fmt.lower()
    f = FORMAT_ALIASES.get(f, f)
    if f != "auto" and f not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected 'auto' or one of {FORMAT_HELP}")
    return f


def _detect_format(path: str) -> str | None:
    """The format of ``path`` by extension and first line(s); None for a file without data lines."""
    ext = os.path.splitext(path)[1].lower()
    first = None
    for n, text, err in _lines(path):
        if text is None or not text.strip():
            continue
        first = (n, text)
        break
    if first is None:
        return None
    n, text = first
    stripped = text.lstrip()
    if ext in JSON_EXTENSIONS or (ext not in TSV_EXTENSIONS and stripped.startswith("{")):
        if stripped.startswith("["):
            raise DataError(path, n, "this looks like a JSON array; expected JSON Lines (one JSON object a line)")
        # the first line that parses as an object decides (a malformed first line is reported later)
        for n, text, err in _lines(path):
            if text is None or not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                if "query" in obj:
                    return "jsonl"
                if "sentence1" in obj:
                    return "nli"
                raise DataError(path, n, f"cannot detect the data format: the record has keys {sorted(obj)[:10]}, "
                                         "neither 'query' (UGD jsonl) nor 'sentence1' (SNLI/MultiNLI); "
                                         f"pass fmt= one of {FORMAT_HELP}")
        raise DataError(path, None, "cannot detect the data format: no line parses as a JSON object (JSON Lines "
                                    f"hold one object a line); pass fmt= one of {FORMAT_HELP}")
    if ext in CSV_EXTENSIONS or (ext not in TSV_EXTENSIONS and "\t" not in text and "," in text):
        header = {c.strip().lower() for c in next(csv.reader([text]), [])}
        if "pairid" in header or "gold_label" in header:  # the reader names any missing column
            return "esnli"
        if ext in CSV_EXTENSIONS:
            raise DataError(path, None, "cannot detect the data format from the extension '.csv' or the first line "
                                        "(an e-SNLI CSV starts with a header naming pairID, gold_label, Sentence1, "
                                        f"Sentence2); pass fmt= one of {FORMAT_HELP}")
    if ext in TSV_EXTENSIONS or "\t" in text:
        cols = [c.strip().lower() for c in text.split("\t")]
        if "gold_label" in cols and "sentence1" in cols:
            raise DataError(path, n, "this looks like the tab-separated release of SNLI/MultiNLI; read its .jsonl "
                                     "file instead (fmt='nli')")
        return "qqp" if "question1" in cols else "lcqmc"
    raise DataError(path, None, f"cannot detect the data format from the extension {ext or '(none)'!r} or the "
                                f"first line; pass fmt= one of {FORMAT_HELP}")


def _parse_label(value, label_map: Mapping | None, what: str = "label") -> int:
    """An int from an int, an int string, or a string of ``label_map``; BadRecord otherwise."""
    if isinstance(value, str):
        if label_map is not None and value in label_map:
            return label_map[value]
        s = value.strip()
        if label_map is not None and s in label_map:
            return label_map[s]
        try:
            return int(s)
        except ValueError:
            known = f" or one of the label_map keys {sorted(label_map)}" if label_map else ""
            raise BadRecord(f"{what} {value!r} is not an integer{known}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRecord(f"{what} must be an integer, got {json.dumps(value, ensure_ascii=False)}")
    return value


def _text(obj: dict, key: str, fmt: str) -> str:
    if key not in obj:
        raise BadRecord(f"missing field {key!r} ({fmt} records need {_required(fmt)})")
    v = obj[key]
    if not isinstance(v, str):
        raise BadRecord(f"field {key!r} must be a string, got {json.dumps(v, ensure_ascii=False)[:60]}")
    return v


def _required(fmt: str) -> str:
    return {"jsonl": "'query', 'document', 'label'", "nli": "'sentence1', 'sentence2', 'gold_label'"}[fmt]


def _no_constant(name: str):
    # Python's json accepts NaN / Infinity, JSON does not: such a record would be written back invalid
    raise BadRecord(f"bad JSON ({name} is not a JSON value; write a number or null)")


def _unique_keys(pairs: list) -> dict:
    # Python's json keeps the last of repeated keys; a record naming "label" twice is ambiguous, not data
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise BadRecord(f"bad JSON (the key {key!r} appears twice in one object; keep one)")
        obj[key] = value
    return obj


def json_object(text: str) -> dict:
    """The JSON object on one line of a JSONL file, or ``BadRecord`` saying what is wrong with it (bad
    JSON, NaN/Infinity, a key twice in one object, not an object)."""
    try:
        obj = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise BadRecord(f"bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_jsonl(text: str, label_map) -> dict:
    obj = json_object(text)
    query = _text(obj, "query", "jsonl")
    document = _text(obj, "document", "jsonl")
    if "label" not in obj or obj["label"] is None:
        raise BadRecord(f"missing field 'label' (jsonl records need {_required('jsonl')})")
    label = _parse_label(obj["label"], label_map)
    reason = obj.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise BadRecord(f"field 'reason' must be a string or null, got {json.dumps(reason, ensure_ascii=False)[:60]}")
    record = {"query": query, "document": document, "label": label, "reason": reason or None}
    references = obj.get("references")  # several gold reasons (an e-SNLI CSV written as jsonl keeps them)
    if references is not None:
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise BadRecord(f"field 'references' must be a list of strings or null, got "
                            f"{json.dumps(references, ensure_ascii=False)[:60]}")
        if any(r.strip() for r in references):
            record["references"] = [r for r in references if r.strip()]
    score = obj.get("teacher_score")  # a small model's score of the pair (flipped-kd), kept when present
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score or abs(score) == float("inf"):
            raise BadRecord(f"field 'teacher_score' must be a finite number or null, got {json.dumps(score)[:60]}")
        record["teacher_score"] = float(score)
    return record


def _parse_nli(text: str, label_map) -> dict:
    obj = json_object(text)
    s1 = _text(obj, "sentence1", "nli")
    s2 = _text(obj, "sentence2", "nli")
    if "gold_label" not in obj:
        raise BadRecord(f"missing field 'gold_label' (nli records need {_required('nli')})")
    gold = obj["gold_label"]
    if gold == NLI_NO_LABEL:
        raise _NoLabel(gold)
    mapping = label_map if label_map is not None else NLI_LABELS
    if isinstance(gold, str) and gold in mapping:
        label = mapping[gold]
    elif isinstance(gold, str) and not gold.strip().lstrip("-").isdigit():
        raise BadRecord(f"gold_label {gold!r} is not one of {sorted(mapping)} (or '-', dropped)")
    else:
        label = _parse_label(gold, mapping, "gold_label")
    return {"query": s1, "document": s2, "label": label, "reason": None}


def _csv_rows(path: str) -> Iterator[tuple[int, list | None, str | None]]:
    """(line of the row's first line, the row's fields or None, problem or None) for each CSV row of a
    file; a row over several lines (a quoted newline) has the number of its first. A line that is not
    UTF-8, or bad quoting, makes that row's problem; the rows after it are still read."""
    bad_utf8: dict = {}

    def lines():  # keep the line ends: the csv module needs them inside quoted fields
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad_utf8[n] = f"not valid UTF-8 ({e.reason} at byte {e.start})"
                    yield raw.decode("utf-8", "replace")

    # strict: text after a closing quote, or a quote never closed, is an error, not a silently merged
    # or truncated row
    reader = csv.reader(lines(), strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if reader.line_num == end:  # nothing consumed: give up rather than loop
                return
            end = reader.line_num
            yield start, None, f"bad CSV quoting ({e}); a field with commas, quotes or newlines is written in " \
                               "double quotes, a quote inside it doubled"
            continue
        end = reader.line_num
        problem = next((bad_utf8[k] for k in range(start, end + 1) if k in bad_utf8), None)
        yield start, (None if problem else row), problem


def _esnli_header(path: str, n: int, row: list) -> tuple:
    """(column count, {official name: index}) of an e-SNLI header row; DataError naming a missing column."""
    names = [c.strip().lower() for c in row]
    missing = [c for c in ESNLI_COLUMNS if c.lower() not in names]
    if missing:
        raise DataError(path, n, f"the e-SNLI header lacks the column(s) {missing}; an e-SNLI CSV starts with a "
                                 f"header row naming {list(ESNLI_COLUMNS)} (Explanation_2, Explanation_3 optional)")
    index = {c: names.index(c.lower()) for c in ESNLI_COLUMNS + ESNLI_EXTRA_EXPLANATIONS if c.lower() in names}
    return len(names), index


def _parse_esnli(row: list, header: tuple, label_map) -> dict:
    width, index = header
    if len(row) != width:
        raise BadRecord(f"expected {width} comma-separated fields as in the header, got {len(row)}")
    gold = row[index["gold_label"]].strip()
    mapping = label_map if label_map is not None else NLI_LABELS
    if gold in (NLI_NO_LABEL, ""):
        raise _NoLabel(gold)
    if gold not in mapping:  # "Entailment", "entailement": a typo of a label, not a row without one
        raise BadRecord(f"gold_label {gold!r} is not one of {sorted(mapping)} (or '-', dropped)")
    explanations = [row[index[c]].strip() for c in ("Explanation_1",) + ESNLI_EXTRA_EXPLANATIONS if c in index]
    record = {"query": row[index["Sentence1"]], "document": row[index["Sentence2"]], "label": mapping[gold],
              "reason": explanations[0] or None, "id": row[index["pairID"]]}
    references = [e for e in explanations if e]
    if references:  # all gold explanations, for multi-reference reason scores (ugd.serving.reason_scores)
        record["references"] = references
    return record


def _parse_lcqmc(text: str, label_map) -> dict:
    cols = text.split("\t")
    if len(cols) == 4 and cols[0].strip().isdigit():  # ATEC raw: id, text_a, text_b, label
        cols = cols[1:]
    if len(cols) != 3:
        raise BadRecord(f"expected 3 tab-separated columns text_a, text_b, label; got {len(cols)}")
    return {"query": cols[0], "document": cols[1], "label": _parse_label(cols[2], label_map), "reason": None}


def read_records(path, *, fmt: str = "auto", num_labels: int | None = None, skip_bad: bool = False,
                 label_map: Mapping[str, int] | None = None,
                 skip_hint: str = "skip_bad=True") -> tuple[list[dict], ReadStats]:
    """Reads a data file into UGD records (see the module docstring for the formats).

    Args:
        path: the file (UTF-8; a BOM is ignored).
        fmt: "auto", "jsonl", "lcqmc", "qqp", "nli" or "esnli" (or an alias: ugd, bq, atec, snli, mnli,
            multinli, e-snli).
        num_labels: when given, a label outside ``[0, num_labels)`` raises DataError (even with skip_bad).
        skip_bad: skip malformed lines (counted in ``stats.skipped_malformed``) instead of raising.
        label_map: string label -> int (e.g. ``{"bad": 0, "good": 1}``); integer strings still parse as
            integers. For "nli" and "esnli" it replaces the default ``{"entailment": 0, "neutral": 1,
            "contradiction": 2}``.
        skip_hint: how the caller's user switches ``skip_bad`` on, named in the error of a malformed line
            (``python -m ugd.train`` passes ``--skip_bad_records``).

    Returns:
        ``(records, stats)``; each record is ``{"query", "document", "label", "reason"}`` (plus
        "teacher_score" from jsonl when present, "references" and "id" from esnli).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: a malformed line (without skip_bad), a label out of range, an undetectable format.
        ValueError: bad arguments.
    """
    if isinstance(path, (bytes, bytearray)):
        path = os.fsdecode(path)
    path = os.fspath(path)
    f = check_format(fmt)
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels must be None or an int >= 1, got {num_labels!r}")
    if label_map is not None:
        if not isinstance(label_map, Mapping):
            raise ValueError(f"label_map must be a mapping from label strings to ints, got {type(label_map).__name__}")
        for k, v in label_map.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"label_map[{k!r}] must be an int, got {v!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "data file not found", path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"data path is a directory, not a file: {path}")

    if f == "auto":
        f = _detect_format(path)
    stats = ReadStats(path=path, fmt=f)
    records: list[dict] = []
    if f is None:  # no data lines: nothing to detect, nothing to read
        return records, stats

    qqp_cols = None
    esnli_header = None
    header_checked = False
    # a CSV row (esnli) is a list of fields and may span lines; every other format is one line of text
    for n, text, decode_error in (_csv_rows(path) if f == "esnli" else _lines(path)):
        if text is not None and (not text if f == "esnli" else not text.strip()):
            continue
        if f == "esnli" and esnli_header is None:
            if decode_error:
                raise DataError(path, n, f"the e-SNLI header row: {decode_error}")
            esnli_header = _esnli_header(path, n, text)
            continue
        if f == "qqp" and qqp_cols is None:  # the header row
            if decode_error:
                raise DataError(path, n, f"the QQP header line is {decode_error}")
            names = [c.strip().lower() for c in text.split("\t")]
            missing = [c for c in QQP_COLUMNS if c not in names]
            if missing:
                raise DataError(path, n, f"the QQP header {names} lacks the column(s) {missing}; a QQP file starts "
                                         f"with a header row naming {list(QQP_COLUMNS)}")
            qqp_cols = (len(names), [names.index(c) for c in QQP_COLUMNS])
            continue
        if f == "lcqmc" and not header_checked:
            header_checked = True
            cols = text.split("\t") if text is not None else []
            if len(cols) in (3, 4) and cols[-1].strip().lower() == "label":
                continue  # a header row (some LCQMC/BQ copies have "text_a<TAB>text_b<TAB>label")
        stats.read += 1
        try:
            if decode_error:
                raise BadRecord(decode_error)
            if f == "jsonl":
                rec = _parse_jsonl(text, label_map)
            elif f == "nli":
                rec = _parse_nli(text, label_map)
            elif f == "lcqmc":
                rec = _parse_lcqmc(text, label_map)
            elif f == "esnli":
                rec = _parse_esnli(text, esnli_header, label_map)
            else:
                width, (i1, i2, il) = qqp_cols
                cols = text.split("\t")
                if len(cols) != width:
                    raise BadRecord(f"expected {width} tab-separated columns as in the header, got {len(cols)}")
                rec = {"query": cols[i1], "document": cols[i2], "label": _parse_label(cols[il], label_map, "is_duplicate"),
                       "reason": None}
            for key in ("query", "document"):
                if not rec[key].strip():  # nothing to match: every command would fail on it later
                    raise BadRecord(f"the {key} is empty (or only whitespace); a matching pair needs text on both "
                                    "sides")
            label = rec["label"]
            if label < 0 or (num_labels is not None and label >= num_labels):
                raise _LabelOutOfRange(label)
        except _NoLabel as e:
            stats.dropped_no_label += 1
            stats.dropped_values[e.args[0]] = stats.dropped_values.get(e.args[0], 0) + 1
            continue
        except BadRecord as e:
            if not skip_bad:
                raise DataError(path, n, f"{e} (pass {skip_hint} to skip and count malformed lines)") from None
            stats.skipped_malformed += 1
            if len(stats.errors) < MAX_KEPT_ERRORS:
                stats.errors.append(f"{path}:{n}: {e}")
            continue
        except _LabelOutOfRange as e:
            label = e.args[0]
            if num_labels is None:
                problem = f"label {label} is negative; labels are class indices 0, 1, ..."
            else:
                problem = f"label {label} is out of range for num_labels={num_labels}"
            raise DataError(path, n, problem) from None
        records.append(rec)
        stats.kept += 1
        stats.label_lines.setdefault(rec["label"], n)
    return records, stats


# ---------------------------------------------------------------------------------------------
# dataset and writing
# ---------------------------------------------------------------------------------------------


class RecordDataset(torch.utils.data.Dataset):
    """A list of records as a map-style Dataset: ``dataset[i]`` is the record dict (the collator,
    ``ugd.data.collator.UGDCollator``, encodes lists of them)."""

    def __init__(self, records: Sequence[Mapping]):
        self.records = list(records)
        self.stats: ReadStats | None = None

    @classmethod
    def from_file(cls, path, **kwargs) -> "RecordDataset":
        """``read_records(path, **kwargs)`` as a dataset; the ReadStats are in ``dataset.stats``."""
        records, stats = read_records(path, **kwargs)
        ds = cls(records)
        ds.stats = stats
        return ds

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    @property
    def labels(self) -> list:
        """Each record's label (None where a record has none)."""
        return [r.get("label") for r in self.records]


def _json_default(o):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_jsonl(records: Iterable[Mapping], path) -> int:
    """Writes records as UTF-8 JSON Lines, atomically (a temp file in the same folder, then
    ``os.replace``): a reader never sees a half-written file. Creates the folder if needed.
    Returns the number of records written."""
    n = 0
    with atomic_text_file(path, newline="\n") as out:
        for r in records:
            # allow_nan=False: bare NaN / Infinity are not JSON, and no reader should get them
            out.write(json.dumps(dict(r), ensure_ascii=False, default=_json_default, allow_nan=False))
            out.write("\n")
            n += 1
    return n


__all__ = [
    "FORMATS",
    "NLI_LABELS",
    "DataError",
    "ReadStats",
    "RecordDataset",
    "read_records",
    "write_jsonl",
]
