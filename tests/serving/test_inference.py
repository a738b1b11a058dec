"""Plug-and-play inference (docs/spec.md section 7) on tiny random backbones, CPU, fp32.

The API's results equal the training forward's heads on the same pairs; lone query/document vectors
equal those inside full training sequences; scoring from stored vectors runs no backbone on
documents; batched cached greedy generation equals recomputing the whole sequence without a cache;
bad inputs give clear errors; over-long texts are truncated with a warning.
"""

import copy
import functools
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from ugd import DocumentVectors
from ugd.data.collator import UGDCollator
from ugd.data.packing import pack
from ugd.data.demo import build_tokenizer, demo_splits, tiny_backbone_config
from ugd.serving.generate import generate_reason_ids, prompt_samples
from ugd.data.layout import EncodedSample, LayoutConfig
from ugd.model import UGDConfig, UGDModel

LAYOUT = LayoutConfig(max_query_len=16, max_document_len=40, max_reason_len=16)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            initializer_range=0.3)  # a wide init: an untrained model then writes varied tokens, not one repeated
RECORDS, _ = demo_splits(12, 1)


@functools.lru_cache(maxsize=None)
def _base_tokenizer():
    return build_tokenizer(RECORDS)


def _tokenizer():
    # a fresh copy per model: from_backbone adds the special tokens to it (same seed -> same weights)
    return copy.deepcopy(_base_tokenizer())


def make_model(paradigm="ugd-ttm", seed=0, family="qwen2", **cfg):
    torch.manual_seed(seed)
    tok = _tokenizer()
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config(len(tok) + 3, family=family, **TINY),
                                                attn_implementation="ugd")
    config = UGDConfig(paradigm=paradigm, num_labels=4, kl_dim=8, layout=dict(LAYOUT.to_dict(), **cfg))
    return UGDModel.from_backbone(backbone, tok, config).eval()


@functools.lru_cache(maxsize=None)
def cached_model(paradigm="ugd-ttm"):
    return make_model(paradigm)


def pairs(n=6, start=0):
    return [(r["query"], r["document"]) for r in RECORDS[start: start + n]]


def training_outputs(model, ps, compute):
    collator = UGDCollator(model.tokenizer, paradigm=model.config.paradigm, layout=LAYOUT)
    batch = collator([{"query": q, "document": d, "reason": r["reason"]} for (q, d), r in zip(ps, RECORDS)])
    with torch.no_grad():
        return model(batch, compute=compute)


class CountForwards:
    """Counts forwards of a module (a backbone's decoder)."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------
# equal to the training forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, paradigm", [("two_tower", p) for p in ("ugd-ttm", "shared-ttm", "ttm")]
                         + [("single-tower", p) for p in ("ugd-ttm", "ugd-stm", "stm")])
def test_predict_equals_training_heads(mode, paradigm):
    model = cached_model(paradigm)
    ps = pairs()
    tower = mode.replace("-", "_")
    out = training_outputs(model, ps, (tower,))
    probs = model.predict(ps, mode=mode, show_progress=False)
    logits = out.logits_t if tower == "two_tower" else out.logits_s
    torch.testing.assert_close(probs, logits.float().softmax(-1), rtol=1e-5, atol=1e-6)
    assert probs.shape == (len(ps), 4) and probs.dtype == torch.float32


def test_lone_vectors_equal_those_inside_full_training_sequences():
    model = cached_model("ugd-ttm")
    ps = pairs(8)
    out = training_outputs(model, ps, ("two_tower", "single_tower"))  # Q D P G sequences, TTM mask
    v_q = model.encode_queries([q for q, _ in ps], show_progress=False, batch_tokens=40)  # several batches
    v_d = model.encode_documents([d for _, d in ps], show_progress=False)
    torch.testing.assert_close(v_q, out.v_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_d, out.v_d, rtol=1e-5, atol=1e-5)
    as_numpy = model.encode_documents([d for _, d in ps], show_progress=False, return_numpy=True)
    assert as_numpy.shape == tuple(v_d.shape) and str(as_numpy.dtype) == "float32"


def test_single_tower_computes_no_reason_tokens():
    model = cached_model("ugd-ttm")
    ps = pairs(3)
    seen = []
    handle = model.backbone.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        model.predict(ps, mode="single_tower", show_progress=False)
    finally:
        handle.remove()
    samples = prompt_samples(model, model.tokenizer, ps)  # Q D P only
    assert seen == [sum(len(s) for s in samples)]


# ---------------------------------------------------------------------------------------------
# stored vectors and ranking
# ---------------------------------------------------------------------------------------------


def test_scoring_from_stored_vectors_matches_and_runs_no_backbone():
    model = cached_model("ugd-ttm")
    ps = pairs(6)
    docs = [d for _, d in ps]
    store = DocumentVectors.build(model, docs, show_progress=False)
    v_q = model.encode_queries([ps[0][0], ps[1][0]], show_progress=False)
    with CountForwards(model.backbone.get_decoder()) as count:
        grid = model.score_documents(v_q, store)  # [2, M, C]
        aligned = model.score_pairs(v_q[[0] * len(docs)], store.vectors)
        hits = model.rank(ps[0][0], store, top_k=3)  # encodes the query only
    assert count.n == 1
    torch.testing.assert_close(grid[0], aligned, rtol=1e-5, atol=1e-6)
    expected = model.predict([(ps[0][0], d) for d in docs], show_progress=False)[:, -1]  # the default class
    torch.testing.assert_close(grid[0, :, -1], expected, rtol=1e-5, atol=1e-6)
    assert [i for i, _ in hits] == expected.argsort(descending=True)[:3].tolist()
    assert hits[0][1] == pytest.approx(float(expected.max()), rel=1e-5)
    # texts give the same ranking, and top_k=None returns all of them
    assert [i for i, _ in model.rank(ps[0][0], docs, top_k=None, show_progress=False)] == \
        expected.argsort(descending=True).tolist()


def test_rank_single_tower_orders_by_single_tower_probability():
    model = cached_model("ugd-ttm")
    ps = pairs(5)
    docs = [d for _, d in ps]
    probs = model.predict([(ps[0][0], d) for d in docs], mode="single_tower", show_progress=False)
    hits = model.rank(ps[0][0], docs, top_k=2, mode="single_tower", positive_label=2, show_progress=False)
    assert [i for i, _ in hits] == probs[:, 2].argsort(descending=True)[:2].tolist()
    # no positive_label: the last class, as ugd.predict and ugd serve default
    default = model.rank(ps[0][0], docs, top_k=None, mode="single_tower", show_progress=False)
    assert [i for i, _ in default] == probs[:, -1].argsort(descending=True).tolist()


def test_document_vectors_store_round_trip_and_incremental_add(tmp_path):
    model = cached_model("ugd-ttm")
    docs = [d for _, d in pairs(6)]
    store = DocumentVectors.build(model, docs[:4] + docs[:2], show_progress=False)  # duplicates encoded once
    assert len(store) == 4 and docs[0] in store and docs[5] not in store
    path = str(tmp_path / "docs.safetensors")
    store.save(path)
    loaded = DocumentVectors.load(path, model)
    assert loaded.keys == store.keys and torch.equal(loaded.vectors, store.vectors)
    with CountForwards(model.backbone.get_decoder()) as count:
        rows = loaded.add(model, docs, show_progress=False)
    assert count.n == 1 and len(loaded) == 6 and rows.tolist() == [0, 1, 2, 3, 4, 5]
    assert loaded.rows(["never stored"]).tolist() == [-1]
    torch.testing.assert_close(loaded.vectors, model.encode_documents(docs, show_progress=False))


def test_document_vectors_refuse_another_model_and_another_layout(tmp_path):
    model = cached_model("ugd-ttm")
    path = str(tmp_path / "docs.safetensors")
    DocumentVectors.build(model, [d for _, d in pairs(2)], show_progress=False).save(path)
    other = make_model("ugd-ttm", seed=1)
    with pytest.raises(ValueError, match="another model"):
        DocumentVectors.load(path, other)
    store = DocumentVectors.load(path)
    with pytest.raises(ValueError, match="another model"):
        other.rank("a query", store)
    changed = make_model("ugd-ttm", max_document_len=20)
    with pytest.raises(ValueError, match="layout"):
        DocumentVectors.load(path, changed)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not be read"):
        DocumentVectors.load(str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError):
        DocumentVectors.load(str(tmp_path / "missing.safetensors"))


def test_fingerprint_follows_the_checkpoint_not_the_dtype(tmp_path):
    model = make_model("ugd-ttm", seed=2)
    model.save_pretrained(str(tmp_path / "ckpt"))
    fp32 = UGDModel.from_pretrained(str(tmp_path / "ckpt"))
    bf16 = UGDModel.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert model.fingerprint() == fp32.fingerprint() == bf16.fingerprint()
    assert bf16.heads.classifier.weight.dtype == torch.bfloat16
    assert fp32.to(torch.bfloat16).fingerprint() == model.fingerprint()  # a later dtype change keeps it too
    with torch.no_grad():  # weights changed after loading: a new name
        fp32.heads.classifier.weight.add_(1.0)
    assert fp32.fingerprint() != model.fingerprint()
    before = model.fingerprint()
    with torch.no_grad():  # an in-memory model: remembered, and renamed when a head changes
        model.heads.fc_t[0].bias.mul_(2.0)
    assert model.fingerprint() != before


def test_from_pretrained_serves_with_its_saved_tokenizer(tmp_path):
    model = make_model("ugd-ttm", seed=3)
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = UGDModel.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.tokenizer is not None
    ps = pairs(4)
    for mode in ("two_tower", "single_tower"):
        torch.testing.assert_close(loaded.predict(ps, mode=mode, show_progress=False),
                                   model.predict(ps, mode=mode, show_progress=False))
    assert loaded.generate_reason(ps[:2], max_new_tokens=4) == model.generate_reason(ps[:2], max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# reason generation
# ---------------------------------------------------------------------------------------------


def recompute_greedy(model, pair, steps):
    """Greedy tokens by running Q D P [Start] g1..gk under the partition mask at every step, no cache."""
    tok = model.tokenizer
    s = prompt_samples(model, tok, [pair])[0]
    start, eos = tok.convert_tokens_to_ids("[Start]"), tok.eos_token_id
    Lq, Ld, Lp, _ = s.spans
    out = []
    for _ in range(steps):
        n = len(out)
        seq = EncodedSample(input_ids=s.input_ids + [start] + out,
                            position_ids=s.position_ids + [s.position_ids[-1] + 1 + i for i in range(n + 1)],
                            lm_labels=[-100] * (len(s) + 1 + n), spans=(Lq, Ld, Lp, 1 + n))
        with torch.no_grad():
            hidden = model.encode(pack([seq], model.paradigm.prefill_mask))
            token = int(model.backbone.get_output_embeddings()(hidden[-1]).argmax())
        if token == eos:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("paradigm", ["ugd-ttm", "ugd-stm"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_batched_cached_greedy_equals_recomputation_without_cache(paradigm, family):
    model = make_model(paradigm, family=family)
    ps = pairs(5)  # different lengths: the re-batched cache is left-padded
    got = generate_reason_ids(model, model.tokenizer, ps, max_new_tokens=6, batch_size=3)  # two batches
    expected = [recompute_greedy(model, p, 6) for p in ps]
    assert got == expected
    assert sum(len(g) for g in got) > 10 and len({tuple(g) for g in got}) > 1  # a real check: varied tokens


def test_generation_prefills_once_packed_then_decodes_one_token_per_step():
    model = cached_model("ugd-ttm")
    ps = pairs(3)
    shapes = []
    handle = model.backbone.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        generate_reason_ids(model, model.tokenizer, ps, max_new_tokens=4, min_new_tokens=4)
    finally:
        handle.remove()
    prompt_tokens = sum(len(s) for s in prompt_samples(model, model.tokenizer, ps))
    # one packed prefill of Q D P (no padding), then [Start] and 3 more single-token steps on the cache
    assert shapes == [(1, prompt_tokens)] + [(3, 1)] * 4


def test_generation_stops_at_eos_per_pair_and_passes_generate_keywords():
    model = cached_model("ugd-ttm")
    eos = model.tokenizer.eos_token_id

    class EosAfter(LogitsProcessor):
        """Forces EOS for batch row 0 from its third new token on."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] >= self.prompt + 2:
                scores[0] = float("-inf")
                scores[0, eos] = 0.0
            return scores

    ps = pairs(2)
    proc = EosAfter()
    proc.prompt = max(len(s) for s in prompt_samples(model, model.tokenizer, ps)) + 1
    ids = generate_reason_ids(model, model.tokenizer, ps, max_new_tokens=6,
                              logits_processor=LogitsProcessorList([proc]))
    order = sorted(range(2), key=lambda i: len(prompt_samples(model, model.tokenizer, [ps[i]])[0]))
    assert len(ids[order[0]]) == 2 and eos not in ids[order[0]]  # batch row 0 is the shorter prompt
    assert len(ids[order[1]]) == 6


def test_generate_reason_text_sampling_and_edge_cases():
    model = cached_model("ugd-ttm")
    ps = pairs(3)
    texts = model.generate_reason(ps, max_new_tokens=5)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    torch.manual_seed(0)
    a = model.generate_reason(ps, max_new_tokens=5, do_sample=True, top_k=5)
    torch.manual_seed(0)
    assert model.generate_reason(ps, max_new_tokens=5, do_sample=True, top_k=5) == a
    assert model.generate_reason(ps, max_new_tokens=0) == ["", "", ""]
    assert model.generate_reason([], max_new_tokens=5) == []


def test_generation_with_the_eager_reference_backbone_matches():
    model = make_model("ugd-ttm", seed=4)
    ps = pairs(3)
    ugd = generate_reason_ids(model, model.tokenizer, ps, max_new_tokens=5)
    model.backbone.set_attn_implementation("eager")  # prefill through the dense-mask reference path
    assert generate_reason_ids(model, model.tokenizer, ps, max_new_tokens=5) == ugd


# ---------------------------------------------------------------------------------------------
# errors and truncation
# ---------------------------------------------------------------------------------------------


def test_clear_errors_for_bad_inputs():
    model = cached_model("ugd-ttm")
    with pytest.raises(ValueError, match="query 1 is empty"):
        model.encode_queries(["fine", "  "])
    with pytest.raises(ValueError, match="single string"):
        model.encode_documents("one text")
    with pytest.raises(ValueError, match="document of pair 0 is empty"):
        model.predict([("a query", "")])
    with pytest.raises(ValueError, match="must be a string"):
        model.predict([("a query", 3)])
    with pytest.raises(ValueError, match="single pair"):
        model.predict(("a query", "a document"))
    with pytest.raises(ValueError, match="unknown mode 'cross'"):
        model.predict(pairs(1), mode="cross")
    with pytest.raises(ValueError, match="unknown mode"):
        model.rank("q", ["d"], mode="reason")
    with pytest.raises(ValueError, match="top_k"):
        model.rank("q", ["d"], top_k=0)
    with pytest.raises(ValueError, match="positive_label"):
        model.rank("q", ["d"], positive_label=4)
    with pytest.raises(ValueError, match="batch_tokens"):
        model.encode_queries(["q"], batch_tokens=0)
    with pytest.raises(ValueError, match="serve mode='two_tower' only"):
        model.rank("q", torch.zeros(2, 32), mode="single_tower")
    with pytest.raises(ValueError, match=r"\[N, 32\]"):
        model.score_pairs(torch.zeros(2, 31), torch.zeros(2, 31))
    with pytest.raises(ValueError, match="beam"):
        model.generate_reason(pairs(1), num_beams=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate_reason(pairs(1), max_new_tokens=10**6)
    with pytest.raises(ValueError, match="has no two-tower head"):
        cached_model("ugd-stm").encode_queries(["q"])
    with pytest.raises(ValueError, match="has no single-tower head"):
        cached_model("shared-ttm").predict(pairs(1), mode="single_tower")
    with pytest.raises(ValueError, match="no generative task"):
        cached_model("stm").generate_reason(pairs(1))
    bare = make_model("ugd-ttm", seed=5)
    bare.tokenizer = None
    with pytest.raises(ValueError, match="model.tokenizer is None"):
        bare.predict(pairs(1))


def test_over_long_texts_are_truncated_with_one_warning():
    model = cached_model("ugd-ttm")
    long_doc = " ".join([RECORDS[0]["document"]] * 10)  # far beyond max_document_len=40 tokens
    with pytest.warns(UserWarning, match="1 documents longer than the layout's max length were truncated"):
        v = model.encode_documents([long_doc, RECORDS[1]["document"]], show_progress=False)
    n = LAYOUT.max_document_len - 1
    cut = model.tokenizer.decode(model.tokenizer(long_doc, add_special_tokens=False)["input_ids"][:n])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kept beginning is not over-long: no warning
        torch.testing.assert_close(model.encode_documents([cut], show_progress=False)[0], v[0])
    with pytest.warns(UserWarning, match="truncated"):
        model.predict([(RECORDS[0]["query"], long_doc)], mode="single_tower", show_progress=False)
