"""Hostile but fair use of the train -> serve path on the CPU. Damaged checkpoints are refused
naming the file (never silent wrong answers, never a traceback), non-finite outputs are an error and the
JSON stays valid, the document-store fingerprint covers the backbone, concurrent store writers keep each
other's documents, ``--threads``, the length limits in training, and the small things (flag names,
spelling, file modes, no staging folder left behind). CLI items run through ``cli`` (exit status and the
one line on stderr); the concurrent writers are two real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from tests.cli_runs import one_error_line, run_cli
from tests.tiny_checkpoints import TINY_BACKBONE, save_tiny_checkpoint

from ugd.checkpoint import CheckpointFileError
from ugd.model import UGDModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from ugd.data.demo import demo_splits

    root = tmp_path_factory.mktemp("reliability")
    records, extra = demo_splits(24, 8)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": i, "query": r["query"], "document": r["document"]}) + "\n"
                             for i, r in enumerate(records)))
    return {"root": root, "records": records, "pairs": str(pairs),
            "ckpt": save_tiny_checkpoint(root / "ckpt", records + extra, "ugd-ttm", seed=0),
            "other": save_tiny_checkpoint(root / "other", records + extra, "ugd-ttm", seed=1)}


def predict(*args, stdin: str | None = None):
    """``ugd.predict.cli(args)`` in-process: (exit status, stdout, stderr)."""
    from ugd.predict import cli

    threads = [] if "--threads" in args else ["--threads", "1"]
    return run_cli(cli, [*args, "--no_progress", *threads], stdin=stdin)


def one_line_error(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ugd.predict: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in err
    return lines[0]


def copy_ckpt(env, tmp_path, name="ckpt") -> str:
    dst = tmp_path / name
    shutil.copytree(env["ckpt"], dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------
# 1a, 2a: damaged checkpoint files are refused, naming the file
# ---------------------------------------------------------------------------------------------


def test_missing_tokenizer_json_is_refused_not_an_empty_tokenizer(env, tmp_path):
    ckpt = copy_ckpt(env, tmp_path)
    os.remove(os.path.join(ckpt, "tokenizer.json"))
    code, out, err = predict("--model", ckpt, "--input", env["pairs"])
    assert code == 2 and out == ""
    one_line_error(err, os.path.join(ckpt, "tokenizer.json"), "missing")
    with pytest.raises(CheckpointFileError, match="tokenizer.json"):
        UGDModel.from_pretrained(ckpt)


def test_tokenizer_of_another_model_is_refused(env, tmp_path):
    ckpt = copy_ckpt(env, tmp_path)
    cfg_file = os.path.join(ckpt, "ugd_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["special_token_ids"]["cls"] += 1  # the tokenizer no longer maps [CLS] where the model learned it
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    code, _, err = predict("--model", ckpt, "--input", env["pairs"])
    assert code == 2
    one_line_error(err, "tokenizer.json", "does not belong")


@pytest.mark.parametrize("name", ["model.safetensors", "ugd_heads.safetensors"])
@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "header"])
def test_damaged_weight_file_is_one_line_naming_it(env, tmp_path, name, damage):
    ckpt = copy_ckpt(env, tmp_path)
    path = os.path.join(ckpt, name)
    if damage == "missing":
        os.remove(path)
    elif damage == "empty":
        open(path, "wb").close()
    elif damage == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # the header's length field overwritten
        with open(path, "r+b") as f:
            f.write(b"\xff" * 8)
    code, out, err = predict("--model", ckpt, "--input", env["pairs"])
    assert code == 2 and out == ""
    one_line_error(err, path, "missing" if damage == "missing" else "empty" if damage == "empty" else "truncated")
    with pytest.raises(CheckpointFileError, match=name):
        UGDModel.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------------------
# 1b: non-finite outputs are an error; the JSON output is always valid
# ---------------------------------------------------------------------------------------------


def _overwrite_tensor_data(path: str, byte: bytes = b"\xff") -> None:
    """Same size, header intact, every tensor byte overwritten (0xffffffff is a NaN in fp32)."""
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        size = os.path.getsize(path)
        f.seek(8 + n)
        f.write(byte * (size - 8 - n))


@pytest.mark.parametrize("mode", ["two-tower", "single-tower"])
def test_corrupted_weights_give_an_error_not_nan_predictions(env, tmp_path, mode):
    ckpt = copy_ckpt(env, tmp_path)
    _overwrite_tensor_data(os.path.join(ckpt, "model.safetensors"))
    out_file = tmp_path / "scored.jsonl"
    code, out, err = predict("--model", ckpt, "--input", env["pairs"], "--mode", mode, "--output", out_file)
    assert code == 2 and out == ""
    one_line_error(err, "non-finite", ckpt)
    assert not out_file.exists()  # nothing written
    code, _, err = predict("--model", ckpt, "--input", env["pairs"], "--doc_vectors", tmp_path / "s.safetensors")
    assert code == 2
    one_line_error(err, "non-finite")
    assert not (tmp_path / "s.safetensors").exists()  # no NaN vectors stored


def test_nan_in_the_input_is_a_bad_line_so_the_output_stays_json(env):
    code, out, err = predict("--model", env["ckpt"], "--input", "-",
                             stdin='{"query": "red shoes", "document": "red shoes", "weight": NaN}\n')
    assert code == 2 and out == ""
    one_line_error(err, "<stdin>:1", "NaN")
    code, out, err = predict("--model", env["ckpt"], "--input", "-", "--skip_bad",
                             stdin='{"query": "a", "document": "b", "w": Infinity}\n'
                                   '{"query": "red", "document": "shoes"}\n')
    assert code == 0
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in the output"))
            for line in out.splitlines()]
    assert len(rows) == 1 and all(p == p for p in rows[0]["probs"])


def test_write_jsonl_never_writes_bare_nan(tmp_path):
    from ugd.data.records import write_jsonl

    with pytest.raises(ValueError):
        write_jsonl([{"x": float("nan")}], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# 1c: the store fingerprint covers the backbone
# ---------------------------------------------------------------------------------------------


def test_store_refuses_heads_of_this_run_with_the_backbone_of_another(env, tmp_path):
    store = tmp_path / "docs.safetensors"
    code, _, err = predict("--model", env["ckpt"], "--input", env["pairs"], "--mode", "documents",
                           "--doc_vectors", store)
    assert code == 0, err
    mixed = copy_ckpt(env, tmp_path, "mixed")
    shutil.copy(os.path.join(env["other"], "model.safetensors"), os.path.join(mixed, "model.safetensors"))
    code, out, err = predict("--model", mixed, "--input", env["pairs"], "--doc_vectors", store)
    assert code == 2 and out == ""
    one_line_error(err, str(store), "another model")
    # the same checkpoint still accepts it, also loaded in another dtype
    a = UGDModel.from_pretrained(env["ckpt"])
    assert a.fingerprint() == UGDModel.from_pretrained(env["ckpt"], dtype=torch.bfloat16).fingerprint()
    assert a.fingerprint() != UGDModel.from_pretrained(mixed).fingerprint()


def test_fingerprint_follows_backbone_weights_and_config(env):
    model = UGDModel.from_pretrained(env["ckpt"])
    before = model.fingerprint()
    with torch.no_grad():  # a backbone weight changed in memory: a new name
        next(model.backbone.parameters()).add_(0.5)
    changed = model.fingerprint()
    assert changed != before
    model.backbone.config.rope_theta = 1234.0  # changes V_D without touching a weight
    assert model.fingerprint() != changed
    model2 = UGDModel.from_pretrained(env["ckpt"])
    model2.config.lam = 3.0  # a loss weight does not change V_D
    assert model2.fingerprint() == before


# ---------------------------------------------------------------------------------------------
# 3: concurrent store writers
# ---------------------------------------------------------------------------------------------


def test_two_stores_merged_into_one_file_keep_both(env, tmp_path):
    from ugd.serving.doc_vectors import DocumentVectors

    model = UGDModel.from_pretrained(env["ckpt"]).eval()
    path = str(tmp_path / "docs.safetensors")
    docs = sorted({r["document"] for r in env["records"]})
    a, b = DocumentVectors.empty(model), DocumentVectors.empty(model)  # both opened before either saved
    a.add(model, docs[:10], show_progress=False)
    b.add(model, docs[5:], show_progress=False)
    assert a.merge_into_file(path, model) == 0
    assert b.merge_into_file(path, model) == 5  # a's documents that b lacked
    stored = DocumentVectors.load(path, model)
    assert len(stored) == len(docs) and all(d in stored for d in docs)
    fresh = DocumentVectors.build(model, docs, show_progress=False)
    torch.testing.assert_close(stored.vectors[stored.rows(docs)], fresh.vectors[fresh.rows(docs)])


def test_concurrent_predict_processes_do_not_lose_documents(env, tmp_path):
    inputs = []
    for k in range(2):
        f = tmp_path / f"corpus{k}.jsonl"
        f.write_text("".join(json.dumps({"document": f"document {k} number {i} red shoes"}) + "\n" for i in range(400)))
        inputs.append(f)
    store = tmp_path / "docs.safetensors"
    env_vars = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-m", "ugd.predict", "--model", env["ckpt"], "--input", str(f),
                               "--mode", "documents", "--doc_vectors", str(store), "--threads", "1", "--no_progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_vars, cwd=tmp_path)
             for f in inputs]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    from ugd.serving.doc_vectors import DocumentVectors

    stored = DocumentVectors.load(str(store))
    assert len(stored) == 800
    assert oct(os.stat(store).st_mode & 0o777) == oct(0o666 & ~_umask())


# ---------------------------------------------------------------------------------------------
# 4: --threads
# ---------------------------------------------------------------------------------------------


def test_threads_flag_and_default(env, monkeypatch):
    from ugd.predict import cli, default_threads, set_threads

    n = torch.get_num_threads()
    try:
        code = cli(["--model", env["ckpt"], "--input", env["pairs"], "--output", os.devnull, "--no_progress",
                    "--threads", "2"])
        assert code == 0 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cores = len(os.sched_getaffinity(0))
        assert default_threads() == max(1, min(4, cores // 2))
        assert set_threads(None) == default_threads() == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_threads(None) == 1  # the environment wins over the default
    finally:
        torch.set_num_threads(n)
    code, _, err = predict("--model", env["ckpt"], "--input", env["pairs"], "--threads", "0")
    assert code == 2
    one_line_error(err, "--threads must be >= 1")


# ---------------------------------------------------------------------------------------------
# 6: small things
# ---------------------------------------------------------------------------------------------


def test_model_naming_a_file_says_it_is_a_file(env):
    code, _, err = predict("--model", env["pairs"], "--input", env["pairs"])
    assert code == 2
    one_line_error(err, "is a file, not a folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_store_and_outputs_follow_the_umask(env, tmp_path, mask):
    old = os.umask(mask)
    try:
        store, scored = tmp_path / "docs.safetensors", tmp_path / "scored.jsonl"
        code, _, err = predict("--model", env["ckpt"], "--input", env["pairs"], "--doc_vectors", store,
                               "--output", scored)
        assert code == 0, err
    finally:
        os.umask(old)
    for f in (store, scored):
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~mask, f


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_checkpoint_weight_files_follow_the_umask(env, tmp_path, mask):
    model = UGDModel.from_pretrained(env["ckpt"])
    old = os.umask(mask)
    try:
        model.save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(old)
    weights = sorted((tmp_path / "ckpt").rglob("*.safetensors"))
    assert weights
    for f in weights:
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~mask, f


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads the umask from Linux /proc")
def test_reading_the_umask_leaves_it_alone(tmp_path, monkeypatch):
    # os.umask(0) to read it would give files other threads create meanwhile mode 0666
    from ugd import _files

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask was called"))
        assert _files.new_file_mode(tmp_path / "new.jsonl") == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_encode_queries_warning_is_spelled_right(env):
    model = UGDModel.from_pretrained(env["ckpt"]).eval()
    with pytest.warns(UserWarning, match="encode_queries"):
        model.encode_queries(["shoes " * 100], show_progress=False)


def test_checkpoint_file_names_agree_with_the_model():
    import ugd.checkpoint as cf
    import ugd.model as m

    assert (cf.HEADS_NAME, cf.DOCUMENT_BACKBONE_DIR) == (m.HEADS_NAME, m.DOCUMENT_BACKBONE_DIR)


# ---------------------------------------------------------------------------------------------
# training: missing data file, flag names, damaged checkpoint on resume, staging folder, lengths
# ---------------------------------------------------------------------------------------------

TRAIN = ["--backbone_config", json.dumps(TINY_BACKBONE), "--cpu_threads", "1", "--per_device_train_batch_size", "8",
         "--max_query_len", "16", "--max_document_len", "40", "--max_reason_len", "16", "--kl_dim", "16",
         "--disable_tqdm", "true", "--report_to", "none", "--num_reasons", "0", "--eval_strategy", "no",
         "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no"]


def train_cli(tmp_path, *args):
    """``ugd.train.cli`` in-process: (exit status, stderr)."""
    from ugd.train import cli

    code, _, err = run_cli(cli, [*TRAIN, "--output_dir", tmp_path / "run", *args])
    return code, err


def one_line_train_error(err: str, *needles: str) -> str:
    return one_error_line(err, "ugd.train: error: ", *needles)


def _data_file(tmp_path, records, name="train.jsonl", extra_lines=()):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return f


def test_missing_train_file_is_one_line(tmp_path):
    code, err = train_cli(tmp_path, "--train_file", tmp_path / "does-not-exist.jsonl")
    assert code == 2
    one_line_train_error(err, "--train_file", "does-not-exist.jsonl", "no such file")


def test_malformed_line_names_the_cli_flag(env, tmp_path):
    f = _data_file(tmp_path, env["records"][:8], extra_lines=["{not json\n"])
    code, err = train_cli(tmp_path, "--train_file", f)
    assert code == 2
    line = one_line_train_error(err, f"{f}:9", "--skip_bad_records")
    assert "skip_bad=True" not in line


def test_resume_from_a_truncated_checkpoint_is_one_line_naming_the_file(env, tmp_path):
    from ugd.training.trainer import STAGING_DIR

    f = _data_file(tmp_path, env["records"])
    code, err = train_cli(tmp_path, "--train_file", f, "--max_steps", "2", "--save_strategy", "steps",
                          "--save_steps", "1")
    assert code == 0, err
    run = tmp_path / "run"
    assert not (run / STAGING_DIR).exists()  # no empty staging folder left behind
    weights = run / "checkpoint-2" / "model.safetensors"
    os.truncate(weights, 100)
    code, err = train_cli(tmp_path, "--train_file", f, "--max_steps", "3", "--resume_from_checkpoint", "true")
    assert code == 2
    one_line_train_error(err, str(weights), "truncated")


def test_a_very_long_document_is_reported_once_and_reasons_still_show(env, tmp_path):
    records = [dict(r) for r in env["records"][:16]]
    records[0]["document"] = "word " * 40000  # 200 000 characters
    f = _data_file(tmp_path, records)
    from ugd.train import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the default layout (512-token documents) on the random-init backbone, reasons shown at the end
        summary = main(["--backbone_config", json.dumps(TINY_BACKBONE), "--cpu_threads", "1", "--train_file", str(f),
                        "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_train_batch_size", "8",
                        "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
                        "--num_reasons", "1", "--max_new_tokens", "4"])
    notices = [w for w in caught if "UGDCollator" in str(w.message) and "truncated" in str(w.message)]
    assert len(notices) == 1 and "max_document_len=512" in str(notices[0].message)
    assert len(summary["reasons"]) == 1
    assert (tmp_path / "run" / "ugd_run_summary.json").is_file()


def test_a_layout_beyond_the_backbones_positions_is_a_config_error(env, tmp_path):
    f = _data_file(tmp_path, env["records"])
    small = dict(TINY_BACKBONE, max_position_embeddings=64)
    code, err = train_cli(tmp_path, "--train_file", f, "--backbone_config", json.dumps(small), "--max_steps", "1")
    assert code == 2
    one_line_train_error(err, "max_position_embeddings=64", "--max_document_len")


def test_starting_from_a_backbone_with_truncated_weights_is_one_line(env, tmp_path):
    from transformers import AutoModelForCausalLM

    from ugd.data.demo import build_tokenizer, tiny_backbone_config

    folder = tmp_path / "backbone"
    tok = build_tokenizer(env["records"])
    AutoModelForCausalLM.from_config(tiny_backbone_config(len(tok), **TINY_BACKBONE)).save_pretrained(folder)
    tok.save_pretrained(folder)
    os.truncate(folder / "model.safetensors", 50)
    f = _data_file(tmp_path, env["records"])
    code, err = train_cli(tmp_path, "--train_file", f, "--model_name_or_path", folder, "--max_steps", "1")
    assert code == 2
    one_line_train_error(err, str(folder / "model.safetensors"), "truncated")
