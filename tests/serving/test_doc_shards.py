"""Sharded document encoding (``--shard i/n`` + ``merge-shards``, ``ugd.serving.doc_shards``) on tiny random
checkpoints (CPU): the merged store equals one unsharded build bit for bit, and parts that do not make
up one build (missing, repeated, another checkpoint, another corpus) are one line and exit 2."""

import json

import pytest
import torch
from tests.cli_runs import run_cli
from tests.tiny_checkpoints import save_tiny_checkpoint

from ugd.serving.doc_shards import parse_shard, part_path, shard_bounds
from ugd.serving.doc_vectors import DocumentVectors
from ugd.predict import cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from ugd.data.demo import demo_splits

    root = tmp_path_factory.mktemp("shards")
    records, extra = demo_splits(16, 4)
    corpus = root / "corpus.jsonl"
    # repeated documents: the corpus is the distinct texts, in first-seen order
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records + records[:5]))
    other_corpus = root / "other_corpus.jsonl"
    other_corpus.write_text("".join(json.dumps(r) + "\n" for r in records[:10] + extra))
    return {"root": root, "corpus": str(corpus), "other_corpus": str(other_corpus),
            "docs": list(dict.fromkeys(r["document"] for r in records)),
            "ckpt": save_tiny_checkpoint(root / "ckpt", records + extra, "ugd-ttm", seed=0),
            "other": save_tiny_checkpoint(root / "other", records + extra, "ugd-ttm", seed=1)}


def run(*args):
    """cli(args) in-process: (exit status, stdout, stderr)."""
    return run_cli(cli, args)


def build(env, store, shard=None, *, model="ckpt", corpus="corpus", extra=()):
    args = ["--model", env[model], "--input", env[corpus], "--mode", "documents", "--doc_vectors", store,
            "--no_progress", *extra]
    if shard is not None:
        args += ["--shard", shard]
    code, _, err = run(*args)
    assert code == 0, err
    return err


def build_shards(env, store, n, **kw):
    for i in range(n):
        build(env, store, f"{i}/{n}", **kw)
    return [part_path(str(store), i, n) for i in range(n)]


def merge(store, parts):
    return run("merge-shards", "--doc_vectors", store, *parts)


def assert_one_line_error(code, stdout, stderr, *needles):
    assert code == 2
    assert stdout == ""
    assert stderr.startswith("ugd.predict: error: ") and stderr.count("\n") == 1, stderr
    for needle in needles:
        assert needle in stderr, stderr


def assert_same_store(a, b):
    (sa, ma), (sb, mb) = DocumentVectors.read(str(a)), DocumentVectors.read(str(b))
    assert ma == mb
    assert sa.keys == sb.keys
    # bitwise: on the CPU a text's vector does not depend on the batch it was packed in (measured, fp32 and bf16)
    assert torch.equal(sa.vectors, sb.vectors)


# ---------------------------------------------------------------------------------------------
# a sharded build equals an unsharded one
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_shards_merged_equal_one_unsharded_build(env, tmp_path, n):
    whole = tmp_path / "whole.safetensors"
    build(env, whole)
    store = tmp_path / "docs.safetensors"
    parts = build_shards(env, store, n)
    sizes = [len(DocumentVectors.read(p)[0]) for p in parts]
    assert sizes == [b - a for a, b in (shard_bounds(len(env["docs"]), i, n) for i in range(n))]
    assert sum(sizes) == len(env["docs"])
    assert not store.exists()  # parts only, until the merge
    code, _, err = merge(store, reversed(parts))  # any order
    assert code == 0, err
    assert f"merged {n} shards ({len(env['docs'])} documents)" in err
    assert_same_store(store, whole)


def test_more_shards_than_documents_gives_empty_parts_that_merge(env, tmp_path):
    store = tmp_path / "docs.safetensors"
    parts = build_shards(env, store, 20)  # 16 distinct documents: 4 parts are empty
    assert sum(len(DocumentVectors.read(p)[0]) == 0 for p in parts) == 4
    assert merge(store, parts)[0] == 0
    whole = tmp_path / "whole.safetensors"
    build(env, whole)
    assert_same_store(store, whole)


def test_merge_extends_an_existing_store_as_an_unsharded_run_does(env, tmp_path):
    first = tmp_path / "first.safetensors"
    build(env, first, corpus="other_corpus")
    whole, store = tmp_path / "whole.safetensors", tmp_path / "docs.safetensors"
    for path in (whole, store):
        path.write_bytes(first.read_bytes())
    build(env, whole)
    err = build(env, store, "0/2")
    # the documents the store already holds are copied into the part, not encoded again
    overlap = len(set(env["docs"][:8]) & {json.loads(line)["document"]
                                          for line in open(env["other_corpus"])})
    assert f"({8 - overlap} encoded)" in err
    build(env, store, "1/2")
    assert merge(store, [part_path(str(store), i, 2) for i in range(2)])[0] == 0
    assert_same_store(store, whole)


def test_a_rerun_keeps_a_complete_part(env, tmp_path):
    store = tmp_path / "docs.safetensors"
    build(env, store, "1/2")
    part = part_path(str(store), 1, 2)
    before = open(part, "rb").read()
    assert "kept as it was" in build(env, store, "1/2")
    assert open(part, "rb").read() == before


def test_shard_auto_reads_the_launchers_rank(env, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    store = tmp_path / "docs.safetensors"
    assert "shard 1/3" in build(env, store, "auto")
    assert (tmp_path / "docs.part-00001-of-00003.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# parts that do not make up one build
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(env, tmp_path_factory):
    """The parts of two builds of 2 shards (this checkpoint / the other one), one of 3 shards and one of
    another corpus."""
    root = tmp_path_factory.mktemp("parts")
    return {"ok": build_shards(env, root / "ok.safetensors", 2),
            "other_model": build_shards(env, root / "m.safetensors", 2, model="other"),
            "three": build_shards(env, root / "three.safetensors", 3),
            "other_corpus": build_shards(env, root / "c.safetensors", 2, corpus="other_corpus")}


@pytest.mark.parametrize("pick, message", [
    pytest.param(lambda p: p["ok"][:1], "shard 1/2 is missing (1 of 2): build it with --shard 1/2 ",
                 id="missing"),
    pytest.param(lambda p: p["three"][1:], "build it with --shard 0/3 ", id="missing-first"),
    pytest.param(lambda p: [p["ok"][0], p["ok"][0], p["ok"][1]], "shard 0/2 is given twice", id="duplicated"),
    pytest.param(lambda p: [p["ok"][0], p["other_model"][1]], "was made by another checkpoint", id="other-checkpoint"),
    pytest.param(lambda p: [p["ok"][0], p["other_corpus"][1]], "was built from another corpus", id="other-corpus"),
    pytest.param(lambda p: [p["ok"][0], p["three"][1]], "is shard 1/3 but", id="other-n"),
])
def test_parts_of_different_builds_are_refused(env, parts, tmp_path, pick, message):
    store = tmp_path / "docs.safetensors"
    assert_one_line_error(*merge(store, pick(parts)), message)
    assert not store.exists()  # nothing is written unless every check passes


def test_a_whole_store_is_not_a_part_and_a_part_is_not_a_store(env, parts, tmp_path):
    whole = tmp_path / "whole.safetensors"
    build(env, whole)
    assert_one_line_error(*merge(tmp_path / "out.safetensors", [str(whole), parts["ok"][1]]), "is not a shard part")
    code, out, err = run("--model", env["ckpt"], "--input", env["corpus"], "--doc_vectors", parts["ok"][0])
    assert_one_line_error(code, out, err, "is shard 0/2 of a sharded build", "merge-shards")


def test_merge_into_a_store_of_another_checkpoint_is_refused(env, parts, tmp_path):
    store = tmp_path / "docs.safetensors"
    build(env, store, model="other")
    before = store.read_bytes()
    assert_one_line_error(*merge(store, parts["ok"]), "holds vectors of another checkpoint")
    assert store.read_bytes() == before


def test_a_truncated_part_is_refused(env, parts, tmp_path):
    cut = tmp_path / "docs.part-00001-of-00002.safetensors"
    data = open(parts["ok"][1], "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(*merge(tmp_path / "docs.safetensors", [parts["ok"][0], cut]), "is truncated or damaged")


def test_a_stale_part_of_another_build_is_not_overwritten(env, tmp_path):
    store = tmp_path / "docs.safetensors"
    build(env, store, "0/2", model="other")
    part = part_path(str(store), 0, 2)
    before = open(part, "rb").read()
    code, out, err = run("--model", env["ckpt"], "--input", env["corpus"], "--mode", "documents", "--doc_vectors",
                         store, "--shard", "0/2")
    assert_one_line_error(code, out, err, "already holds shard 0/2 of another build", "delete it")
    assert open(part, "rb").read() == before


@pytest.mark.parametrize("args, message", [
    (["--shard", "2/2"], "need n >= 1 and 0 <= i < n"),
    (["--shard", "1-2"], "--shard must be i/n"),
    (["--shard", "0/0"], "need n >= 1"),
    (["--shard", "auto"], "RANK and WORLD_SIZE, which are not set"),
    (["--shard", "0/2", "--mode", "two-tower"], "--shard serves --mode documents only"),
])
def test_bad_shard_arguments_exit_2_with_one_line(env, tmp_path, monkeypatch, args, message):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, err = run("--model", env["ckpt"], "--input", env["corpus"], "--mode", "documents", "--doc_vectors",
                         tmp_path / "d.safetensors", *args)
    assert_one_line_error(code, out, err, message)


def test_merge_without_parts_is_a_usage_error(tmp_path, capsys):
    assert cli(["merge-shards", "--doc_vectors", str(tmp_path / "d.safetensors")]) == 2
    assert "the following arguments are required: parts" in capsys.readouterr().err


def test_parse_shard_and_part_path():
    assert parse_shard(" 3 / 8 ") == (3, 8)
    assert parse_shard("auto", {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert part_path("out/docs.safetensors", 1, 4) == "out/docs.part-00001-of-00004.safetensors"
    assert part_path("docs", 0, 1) == "docs.part-00000-of-00001.safetensors"
    m = 10
    assert [i for n in (1, 3, 7, 12) for k in range(n) for i in range(*shard_bounds(m, k, n))] == list(range(m)) * 4
