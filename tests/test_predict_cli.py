"""``python -m ugd.predict`` on tiny random checkpoints (CPU): each mode equals the Python API, stored
document vectors are reused without encoding them again, and bad input or arguments exit 2 with a
message naming the problem. Runs in-process (``ugd.predict.cli``); one subprocess proves the module entry."""

import json
import subprocess
import sys

import pytest
import torch
from tests.cli_runs import run_cli
from tests.tiny_checkpoints import save_tiny_checkpoint

import ugd.serving.inference
from ugd.model import UGDModel
from ugd.predict import cli


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from ugd.data.demo import demo_splits

    root = tmp_path_factory.mktemp("predict")
    records, extra = demo_splits(16, 4)
    records = [{"id": f"r{i}", **r} for i, r in enumerate(records)]
    # the same query twice and the same document twice: distinct texts are encoded once
    records.append({"id": "dup", "query": records[0]["query"], "document": records[1]["document"], "extra": [1, 2]})
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    ckpt = save_tiny_checkpoint(root / "ckpt", records + extra, "ugd-ttm", seed=0)
    return {
        "root": root,
        "records": records,
        "extra": extra,  # documents not in pairs.jsonl
        "pairs": str(pairs),
        "ckpt": ckpt,
        "other": save_tiny_checkpoint(root / "other", records + extra, "ugd-ttm", seed=1),  # other random weights
        "stm": save_tiny_checkpoint(root / "stm", records + extra, "stm", seed=2),  # single-tower only
        "shared": save_tiny_checkpoint(root / "shared", records + extra, "shared-ttm", seed=3),  # two-tower only
        "model": UGDModel.from_pretrained(ckpt),
    }


def run(*args, stdin: str | bytes | None = None):
    """cli(args) in-process: (exit status, stdout, stderr); ``stdin`` as ``cli_runs.run_cli`` takes it."""
    return run_cli(cli, args, stdin=stdin)


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_scored(got: list[dict], records: list[dict], probs: torch.Tensor, *, exact: bool) -> None:
    assert len(got) == len(records)
    for g, r, p in zip(got, records, probs):
        assert {k: g[k] for k in r} == r  # every input key passes through unchanged, in input order
        assert set(g) == set(r) | {"probs", "pred", "score"}
        if exact:
            assert g["probs"] == p.tolist()
        else:
            torch.testing.assert_close(torch.tensor(g["probs"]), p, atol=1e-5, rtol=1e-5)
        assert g["pred"] == int(torch.tensor(g["probs"]).argmax())
        assert g["score"] == g["probs"][-1]  # the default --positive_label: the last class
        assert abs(sum(g["probs"]) - 1) < 1e-5


def _pairs(records):
    return [(r["query"], r["document"]) for r in records]


# ---------------------------------------------------------------------------------------------
# each mode equals the Python API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["two-tower", "single_tower"])
def test_scoring_modes_equal_the_api(env, mode, tmp_path):
    out = tmp_path / "scored.jsonl"
    code, stdout, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--output", out, "--mode", mode)
    assert code == 0, stderr
    assert stdout == ""
    expected = env["model"].predict(_pairs(env["records"]), mode=mode)
    assert_scored(read_jsonl(out.read_text()), env["records"], expected, exact=True)
    assert f"{len(env['records'])} records, mode {mode.replace('_', '-')}" in stderr and "pairs/s" in stderr


def test_positive_label_picks_the_score(env):
    code, stdout, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--positive_label", 1)
    assert code == 0, stderr
    for g in read_jsonl(stdout):
        assert g["score"] == g["probs"][1]
    # the default is the last class, as ugd serve and model.rank: one relevance score for one model everywhere
    code, stdout, stderr = run("--model", env["ckpt"], "--input", env["pairs"])
    assert code == 0, stderr
    for g in read_jsonl(stdout):
        assert len(g["probs"]) > 2 and g["score"] == g["probs"][-1]


def test_reason_mode_equals_the_api(env):
    code, stdout, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--mode", "reason",
                               "--max_new_tokens", 4, "--batch_size", 5)
    assert code == 0, stderr
    got = read_jsonl(stdout)
    expected = env["model"].generate_reason(_pairs(env["records"]), max_new_tokens=4, batch_size=5)
    assert [g["reason"] for g in got] == expected
    assert any(expected)  # an untrained model still says something in 4 tokens
    for g, r in zip(got, env["records"]):  # "reason" is replaced, the rest passes through
        assert {k: v for k, v in g.items() if k != "reason"} == {k: v for k, v in r.items() if k != "reason"}


def test_sampled_reasons_follow_the_seed(env):
    args = ("--model", env["ckpt"], "--input", env["pairs"], "--mode", "reason", "--max_new_tokens", 4, "--do_sample")
    first, again, other = (read_jsonl(run(*args, "--seed", seed)[1]) for seed in (1, 1, 2))
    assert [g["reason"] for g in first] == [g["reason"] for g in again]
    assert [g["reason"] for g in first] != [g["reason"] for g in other]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_stdin_and_stdout(env, as_bytes):
    records = env["records"][:3] + [{"query": "grüne Jacke", "document": "ein Regenmantel ☂", "id": "ü"}]
    # blank lines are skipped; bytes: a byte-order mark and CRLF line ends are accepted
    text = "\n" + "\n\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n"
    stdin = ("\ufeff" + text.replace("\n", "\r\n")).encode() if as_bytes else text
    code, stdout, stderr = run("--model", env["ckpt"], "--input", "-", "--output", "-", stdin=stdin)
    assert code == 0, stderr
    assert "ü" in stdout  # UTF-8 out, not \\u escapes
    assert_scored(read_jsonl(stdout), records, env["model"].predict(_pairs(records)), exact=True)


def test_empty_input_writes_nothing(env):
    code, stdout, stderr = run("--model", env["ckpt"], "--input", "-", stdin="\n\n")
    assert code == 0, stderr
    assert stdout == "" and "0 records" in stderr


def test_progress_flags_control_the_loading_bar(env):
    code, _, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--progress")
    assert code == 0 and "Loading weights" in stderr
    code, _, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--no_progress")
    assert code == 0 and "Loading weights" not in stderr


def test_module_entry_runs_as_a_subprocess():
    # --help only: starting Python with torch and transformers is most of the cost of any run
    p = subprocess.run([sys.executable, "-m", "ugd.predict", "--help"], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    assert b"python -m ugd.predict" in p.stdout and b"--doc_vectors" in p.stdout and b"--no_progress" in p.stdout


# ---------------------------------------------------------------------------------------------
# stored document vectors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def count_encodes(monkeypatch):
    """Counts the texts encoded per side, and the backbone runs made outside any query encoding."""
    counts = {"query": 0, "document": 0, "backbone_not_for_queries": 0}
    sides = []
    encode_texts, encode = ugd.serving.inference.encode_texts, UGDModel.encode

    def counting_encode_texts(model, texts, side, **kwargs):
        texts = list(texts)
        counts[side] += len(texts)
        sides.append(side)
        try:
            return encode_texts(model, texts, side, **kwargs)
        finally:
            sides.pop()

    def counting_encode(self, *args, **kwargs):
        if sides[-1:] != ["query"]:
            counts["backbone_not_for_queries"] += 1
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(ugd.serving.inference, "encode_texts", counting_encode_texts)
    monkeypatch.setattr(UGDModel, "encode", counting_encode)
    return counts


def test_doc_vectors_are_stored_then_reused_without_encoding_documents(env, tmp_path, count_encodes):
    store = tmp_path / "docs.safetensors"
    records = env["records"]
    distinct_docs = len({r["document"] for r in records})
    distinct_queries = len({r["query"] for r in records})
    expected = env["model"].predict(_pairs(records))
    count_encodes.update(query=0, document=0, backbone_not_for_queries=0)

    code, stdout, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--doc_vectors", store)
    assert code == 0, stderr
    assert store.is_file()
    assert count_encodes["document"] == distinct_docs and count_encodes["query"] == distinct_queries
    assert f"stored {distinct_docs} documents ({distinct_docs} new) in {store}" in stderr
    first = read_jsonl(stdout)
    assert_scored(first, records, expected, exact=False)

    count_encodes.update(query=0, document=0, backbone_not_for_queries=0)
    mtime = store.stat().st_mtime_ns
    code, stdout, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--doc_vectors", store)
    assert code == 0, stderr
    # the second run runs the backbone on the queries only, and leaves the file alone
    assert count_encodes == {"query": distinct_queries, "document": 0, "backbone_not_for_queries": 0}
    assert store.stat().st_mtime_ns == mtime
    assert f"({0} new)" in stderr
    assert [g["probs"] for g in read_jsonl(stdout)] == [g["probs"] for g in first]

    # a new document: only it is encoded, and the file grows by one
    count_encodes.update(query=0, document=0, backbone_not_for_queries=0)
    more = records[:2] + [{"query": records[0]["query"], "document": env["extra"][0]["document"]}]
    code, stdout, stderr = run("--model", env["ckpt"], "--input", "-", "--doc_vectors", store,
                               stdin="".join(json.dumps(r) + "\n" for r in more))
    assert code == 0, stderr
    assert count_encodes["document"] == 1
    assert f"stored {distinct_docs + 1} documents (1 new)" in stderr
    assert_scored(read_jsonl(stdout), more, env["model"].predict(_pairs(more)), exact=False)


def test_documents_mode_builds_and_extends_the_store(env, tmp_path, count_encodes):
    from ugd.serving.doc_vectors import DocumentVectors

    store = tmp_path / "docs.safetensors"
    docs = [{"document": r["document"], "id": i} for i, r in enumerate(env["records"])]  # no query needed
    code, stdout, stderr = run("--model", env["ckpt"], "--input", "-", "--mode", "documents", "--doc_vectors", store,
                               stdin="".join(json.dumps(d) + "\n" for d in docs))
    assert code == 0, stderr
    assert stdout == ""
    n = len({d["document"] for d in docs})
    assert f"stored {n} documents ({n} new) in {store}" in stderr
    assert count_encodes["query"] == 0 and count_encodes["document"] == n

    extra = [{"document": r["document"]} for r in env["extra"]]
    code, _, stderr = run("--model", env["ckpt"], "--input", "-", "--mode", "documents", "--doc_vectors", store,
                          stdin="".join(json.dumps(d) + "\n" for d in docs[:3] + extra))
    assert code == 0, stderr
    k = len({d["document"] for d in extra} - {d["document"] for d in docs})
    assert f"stored {n + k} documents ({k} new)" in stderr

    loaded = DocumentVectors.load(str(store), env["model"])
    texts = [d["document"] for d in docs + extra]
    torch.testing.assert_close(loaded.vectors[loaded.rows(texts)], env["model"].encode_documents(texts),
                               atol=1e-5, rtol=1e-5)


def test_doc_vectors_of_another_model_are_refused(env, tmp_path):
    store = tmp_path / "docs.safetensors"
    code, _, stderr = run("--model", env["other"], "--input", env["pairs"], "--mode", "documents",
                          "--doc_vectors", store)
    assert code == 0, stderr
    before = store.read_bytes()
    for mode in ("two-tower", "documents"):
        code, stdout, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--mode", mode,
                                   "--doc_vectors", store)
        assert code == 2
        assert stdout == ""
        assert stderr.startswith("ugd.predict: error: --doc_vectors") and stderr.count("\n") == 1
        assert "another model" in stderr and "delete the file" in stderr
    assert store.read_bytes() == before  # nothing was written over


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

BAD_LINES = {
    "not json": "bad JSON",
    "[1, 2]": "expected a JSON object, got list",
    '{"document": "a page"}': "missing field 'query'",
    '{"query": "a query", "document": 7}': "field 'document' must be a string",
    '{"query": "  ", "document": "a page"}': "field 'query' is empty",
    '{"query": "a query", "document": ""}': "field 'document' is empty",
}


@pytest.mark.parametrize("bad", list(BAD_LINES))
def test_a_malformed_line_is_an_error_naming_file_and_line(env, tmp_path, bad):
    path = tmp_path / "in.jsonl"
    good = [json.dumps(r) for r in env["records"][:2]]
    path.write_text(f"{good[0]}\n\n{good[1]}\n{bad}\n")  # the blank line still counts: the bad one is line 4
    code, stdout, stderr = run("--model", env["ckpt"], "--input", path)
    assert code == 2
    assert stdout == ""
    assert stderr == f"ugd.predict: error: {path}:4: {stderr.split(':4: ', 1)[1]}"  # one line
    assert BAD_LINES[bad] in stderr and "--skip_bad" in stderr


def test_bad_utf8_names_the_line(env, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(json.dumps(env["records"][0]).encode() + b"\n" + b'{"query": "\xff"}\n')
    code, _, stderr = run("--model", env["ckpt"], "--input", path)
    assert code == 2 and f"{path}:2: not valid UTF-8" in stderr


def test_skip_bad_skips_and_counts(env, tmp_path):
    path = tmp_path / "in.jsonl"
    keep = env["records"][:3]
    lines = [json.dumps(keep[0]), "not json", json.dumps(keep[1]), '{"query": "", "document": "x"}',
             json.dumps(keep[2])]
    path.write_text("\n".join(lines) + "\n")
    code, stdout, stderr = run("--model", env["ckpt"], "--input", path, "--skip_bad")
    assert code == 0, stderr
    assert_scored(read_jsonl(stdout), keep, env["model"].predict(_pairs(keep)), exact=True)
    assert "read 5, kept 3, skipped 2 malformed" in stderr and f"{path}:2: bad JSON" in stderr


def test_documents_mode_needs_only_documents(env):
    code, _, stderr = run("--model", env["ckpt"], "--input", "-", "--mode", "documents", "--doc_vectors",
                          env["root"] / "unused.safetensors", stdin='{"query": "q"}\n')
    assert code == 2 and "<stdin>:1: missing field 'document'" in stderr
    assert not (env["root"] / "unused.safetensors").exists()


@pytest.mark.parametrize("mode", ["two-tower", "single-tower", "reason", "two-tower+store"])
def test_query_only_records_name_the_missing_document(env, tmp_path, mode):
    path = tmp_path / "queries.jsonl"
    path.write_text(json.dumps(env["records"][0]) + "\n" + json.dumps({"query": "red shoes", "id": 7}) + "\n")
    store = tmp_path / "docs.safetensors"
    extra = ["--doc_vectors", store] if mode.endswith("+store") else []
    code, stdout, stderr = run("--model", env["ckpt"], "--input", path, "--mode", mode.split("+")[0], *extra)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"ugd.predict: error: {path}:2: missing field 'document'") and stderr.count("\n") == 1
    assert not store.exists()


@pytest.mark.parametrize("mode", ["two-tower", "single-tower", "reason", "documents"])
def test_an_empty_input_file_gives_an_empty_output_and_a_warning(env, tmp_path, mode):
    # zero records is an answer, not an error (a filter upstream may keep none), but a warning says so
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    out, store = tmp_path / "out.jsonl", tmp_path / "docs.safetensors"
    dest = ["--doc_vectors", store] if mode == "documents" else ["--output", out]
    code, stdout, stderr = run("--model", env["ckpt"], "--input", path, "--mode", mode, *dest)
    assert code == 0, stderr
    assert "0 records" in stderr and f"warning: {path} holds no records" in stderr
    if mode == "documents":
        from ugd.serving.doc_vectors import DocumentVectors

        assert len(DocumentVectors.load(str(store), env["model"])) == 0
    else:
        assert out.read_text() == ""


@pytest.mark.parametrize("mode", ["two-tower", "documents"])
def test_a_store_cut_at_half_its_size_is_one_line(env, tmp_path, mode):
    store = tmp_path / "docs.safetensors"
    code, _, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--mode", "documents",
                          "--doc_vectors", store)
    assert code == 0, stderr
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2])
    code, stdout, stderr = run("--model", env["ckpt"], "--input", env["pairs"], "--mode", mode, "--doc_vectors", store)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"ugd.predict: error: --doc_vectors {store}: {store} could not be read: it is "
                              "truncated or damaged")
    assert stderr.count("\n") == 1 and "delete" in stderr
    assert store.read_bytes() == data[: len(data) // 2]  # refused, not overwritten


# a ugd.predict that is killed (SIGKILL) in the middle of writing the store: safetensors' writer is
# wrapped to write half of the temporary file and kill the process before the rename
KILLED_IN_WRITE = """
import os, signal, sys
import safetensors.torch

def write_half_then_die(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = write_half_then_die
from ugd.predict import cli
sys.exit(cli(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_kill_9_during_a_store_write_then_a_rerun(env, tmp_path, existing):
    store = tmp_path / "docs.safetensors"
    first = env["records"][:3]
    if existing:
        code, _, stderr = run("--model", env["ckpt"], "--input", "-", "--mode", "documents", "--doc_vectors", store,
                              stdin="".join(json.dumps(r) + "\n" for r in first))
        assert code == 0, stderr
        before = store.read_bytes()
    args = ["--model", env["ckpt"], "--input", env["pairs"], "--mode", "documents", "--doc_vectors", str(store),
            "--threads", "1", "--no_progress"]
    p = subprocess.run([sys.executable, "-c", KILLED_IN_WRITE, *args], capture_output=True, timeout=300)
    assert p.returncode == -9, p.stderr.decode()
    leftovers = [f.name for f in tmp_path.iterdir() if f.name.startswith(".docs.safetensors.tmp-")]
    assert len(leftovers) == 1  # the half-written temporary file; the store itself is untouched
    if existing:
        assert store.read_bytes() == before
    else:
        assert not store.exists()

    code, _, stderr = run(*args)
    assert code == 0, stderr
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".docs.safetensors.tmp-")]  # cleaned up
    from ugd.serving.doc_vectors import DocumentVectors

    docs = [r["document"] for r in env["records"]]
    stored = DocumentVectors.load(str(store), env["model"])
    assert len(stored) == len(set(docs))
    torch.testing.assert_close(stored.vectors[stored.rows(docs)], env["model"].encode_documents(docs),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--mode", "fastest"], "unknown --mode 'fastest'"),
    (["--model", "{root}/nowhere"], "no such folder"),
    (["--model", "{root}"], "ugd_config.json is missing"),
    (["--model", "{stm}", "--mode", "reason"], "paradigm 'stm' has no head for --mode reason; use --mode single-tower"),
    (["--model", "{stm}"], "paradigm 'stm' has no head for --mode two-tower"),
    (["--model", "{stm}", "--mode", "documents", "--doc_vectors", "{root}/d.safetensors"],
     "paradigm 'stm' has no head for --mode documents; use --mode single-tower"),
    (["--model", "{shared}", "--mode", "single-tower"],
     "paradigm 'shared-ttm' has no head for --mode single-tower; use --mode two-tower or documents"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--positive_label", "4"], "--positive_label must be a class index in [0, 4)"),
    (["--mode", "single-tower", "--doc_vectors", "d.safetensors"], "--doc_vectors serves --mode two-tower"),
    (["--mode", "documents"], "--mode documents needs --doc_vectors"),
    (["--batch_tokens", "0"], "--batch_tokens must be >= 1"),
    (["--input", "{root}/missing.jsonl"], "cannot read --input"),
    (["--frobnicate"], "unknown arguments ['--frobnicate']"),
])
def test_bad_arguments_exit_2_with_one_line(env, args, message):
    argv = ["--model", env["ckpt"], "--input", env["pairs"]]
    argv += [a.format(root=env["root"], stm=env["stm"], shared=env["shared"]) for a in args]  # later flags win
    code, stdout, stderr = run(*argv)
    assert code == 2
    assert stdout == ""
    assert stderr.startswith("ugd.predict: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr


def test_help_exits_0(capsys):
    assert cli(["--help"]) == 0
    assert "--doc_vectors" in capsys.readouterr().out


def test_console_scripts_point_at_the_clis():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("ugd-")}
    expected = {"ugd-predict": "ugd.predict:cli", "ugd-train": "ugd.train:cli", "ugd-evaluate": "ugd.evaluate:cli",
                "ugd-serve": "ugd.serve:cli"}
    # pyproject.toml is the source; the installed metadata is stale until `pip install -e .` runs again,
    # so both are checked and a stale install says what to do instead of a bare set diff
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == expected
    assert scripts == expected, "installed entry points are stale: run `pip install --no-build-isolation -e .` again"
