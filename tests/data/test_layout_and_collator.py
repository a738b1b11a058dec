"""ugd.data.layout and ugd.data.collator: special tokens, spans, positions, LM targets, packing, paradigms."""

import dataclasses
import warnings

import pytest
import torch

import ugd_ops
from ugd.data.collator import UGDCollator
from ugd.data.packing import budget_batches, pack
from ugd.data.layout import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    LayoutConfig,
    add_special_tokens,
    encode_sample,
    special_token_ids,
)
from ugd import paradigms
from ugd.paradigms import Paradigm, all_paradigms
from ugd.testing import make_test_tokenizer

WORDS = ["how do I reset my password", "the loan was approved", "they match because both ask about passwords"]


@pytest.fixture(scope="module")
def tok():
    t = make_test_tokenizer(WORDS)
    add_special_tokens(t)
    return t


@pytest.fixture(scope="module")
def ids(tok):
    return special_token_ids(tok)


def w(tok, text):
    """Word ids of text (the test tokenizer is word-level)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt(tok):
    return w(tok, LayoutConfig().prompt)


# ---------------------------------------------------------------------------------------------
# special tokens
# ---------------------------------------------------------------------------------------------


def test_add_special_tokens_is_idempotent_and_resizes_a_tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t = make_test_tokenizer()
    n0 = len(t)
    cfg = Qwen2Config(vocab_size=n0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen2ForCausalLM(cfg)
    ids = add_special_tokens(t, model)
    assert set(ids) == {"cls", "gmask", "start", "eos"}
    assert len(t) == n0 + 3
    assert model.get_input_embeddings().weight.shape[0] == n0 + 3
    assert model.get_output_embeddings().weight.shape[0] == n0 + 3
    assert ids["eos"] == t.eos_token_id
    assert sorted([ids["cls"], ids["gmask"], ids["start"]]) == [n0, n0 + 1, n0 + 2]
    for key, text in SPECIAL_TOKENS.items():
        assert t.convert_tokens_to_ids(text) == ids[key]
        assert text in t.all_special_tokens
    # again: nothing added, nothing resized, same ids
    assert add_special_tokens(t, model) == ids
    assert len(t) == n0 + 3
    assert model.get_input_embeddings().weight.shape[0] == n0 + 3
    # the special tokens are never split and are skipped when decoding
    enc = w(t, "how [gMask] do [CLS]")
    assert ids["gmask"] in enc and enc[-1] == ids["cls"]
    assert "[CLS]" not in t.decode(enc, skip_special_tokens=True)


def test_add_special_tokens_never_shrinks_a_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t = make_test_tokenizer()
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(t) + 50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    add_special_tokens(t, model)
    assert model.get_input_embeddings().weight.shape[0] == len(t) + 47


def test_tokenizer_without_eos_is_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="EOS"):
        add_special_tokens(t)


def test_missing_special_tokens_are_reported():
    t = make_test_tokenizer()
    with pytest.raises(ValueError, match="add_special_tokens"):
        special_token_ids(t)
    with pytest.raises(ValueError, match="add_special_tokens"):
        UGDCollator(t)


def test_make_test_tokenizer_knows_given_words():
    t = make_test_tokenizer(["zebra quokka"])
    assert t.unk_token_id not in w(t, "zebra quokka")
    assert t.eos_token is not None and t.pad_token is not None and t.pad_token_id != t.eos_token_id


# ---------------------------------------------------------------------------------------------
# encode_sample
# ---------------------------------------------------------------------------------------------


def test_full_sample_restart_hand_worked(tok, ids):
    cfg = LayoutConfig()
    s = encode_sample(tok, ids, "how do I", "the loan", "they match", 1, config=cfg)
    P = prompt(tok)
    assert len(P) == 8 and P[-1] == ids["cls"] and P[1] == ids["gmask"]
    assert s.spans == (4, 3, 8, 3)
    assert s.input_ids == w(tok, "how do I") + [ids["cls"]] + w(tok, "the loan") + [ids["cls"]] + P + \
        [ids["start"]] + w(tok, "they match")
    assert s.position_ids == [0, 1, 2, 3] + [0, 1, 2] + list(range(7, 18))
    assert s.lm_labels == [IGNORE_INDEX] * 15 + w(tok, "they match") + [ids["eos"]]
    assert s.label == 1
    assert len(s) == 18


def test_full_sample_continuous(tok, ids):
    s = encode_sample(tok, ids, "how do I", "the loan", "they match", 0, config=LayoutConfig(position_mode="continuous"))
    assert s.spans == (4, 3, 8, 3)
    assert s.position_ids == list(range(18))


@pytest.mark.parametrize("mode", ["restart", "continuous"])
@pytest.mark.parametrize(
    "parts, spans, restart_positions",
    [
        ("qdpg", (4, 3, 8, 3), [0, 1, 2, 3, 0, 1, 2] + list(range(7, 18))),
        ("qdp", (4, 3, 8, 0), [0, 1, 2, 3, 0, 1, 2] + list(range(7, 15))),
        ("qd", (4, 3, 0, 0), [0, 1, 2, 3, 0, 1, 2]),
        ("q", (4, 0, 0, 0), [0, 1, 2, 3]),
        ("d", (0, 3, 0, 0), [0, 1, 2]),
    ],
)
def test_parts(tok, ids, parts, spans, restart_positions, mode):
    cfg = LayoutConfig(position_mode=mode)
    s = encode_sample(tok, ids, "how do I", "the loan", "they match", None, config=cfg, parts=parts)
    assert s.spans == spans
    L = sum(spans)
    assert len(s.input_ids) == len(s.position_ids) == len(s.lm_labels) == L
    assert s.position_ids == (restart_positions if mode == "restart" else list(range(L)))
    assert s.label == IGNORE_INDEX
    if "g" not in parts:
        assert s.lm_labels == [IGNORE_INDEX] * L
    full = encode_sample(tok, ids, "how do I", "the loan", "they match", None, config=cfg)
    Lq, Ld = full.spans[:2]
    if parts == "q":
        assert s.input_ids == full.input_ids[:Lq]
    if parts == "d":  # a lone document is encoded exactly as inside the full sequence
        assert s.input_ids == full.input_ids[Lq:Lq + Ld]
        assert s.input_ids == w(tok, "the loan") + [ids["cls"]]
        if mode == "restart":
            assert s.position_ids == full.position_ids[Lq:Lq + Ld]


def test_lm_labels_alignment(tok, ids):
    s = encode_sample(tok, ids, "how", "loan", "both ask about passwords", 1, config=LayoutConfig())
    Lq, Ld, Lp, Lg = s.spans
    A = Lq + Ld + Lp
    r = w(tok, "both ask about passwords")
    assert Lg == len(r) + 1
    assert s.input_ids[A] == ids["start"]
    assert s.lm_labels[A] == r[0]  # the [Start] position predicts the first reason token
    assert s.lm_labels[-1] == ids["eos"]  # the last reason token predicts [EOS]
    assert s.input_ids[A + 1:] == r
    # target of position t is the input of position t + 1 (no shift needed in the loss)
    assert s.lm_labels[A:-1] == s.input_ids[A + 1:]
    assert all(x == IGNORE_INDEX for x in s.lm_labels[:A])
    assert sum(x != IGNORE_INDEX for x in s.lm_labels) == Lg


@pytest.mark.parametrize("reason", [None, ""])
def test_empty_reason_gives_no_g_span(tok, ids, reason):
    s = encode_sample(tok, ids, "how do I", "the loan", reason, 1, config=LayoutConfig())
    assert s.spans == (4, 3, 8, 0)
    assert s.lm_labels == [IGNORE_INDEX] * 15


def test_empty_query_and_document_are_a_lone_cls(tok, ids):
    s = encode_sample(tok, ids, "", "", "they match", 0, config=LayoutConfig())
    assert s.spans[:2] == (1, 1)
    assert s.input_ids[:2] == [ids["cls"], ids["cls"]]
    assert s.position_ids[:2] == [0, 0]


def test_truncation_keeps_cls_and_respects_max_lengths(tok, ids):
    cfg = LayoutConfig(max_query_len=3, max_document_len=2, max_reason_len=3)
    q = "how do I reset my password"
    d = "the loan was approved"
    r = "they match because both ask about passwords"
    s = encode_sample(tok, ids, q, d, r, 1, config=cfg)
    assert s.spans == (3, 2, 8, 3)
    assert s.input_ids[:3] == w(tok, "how do") + [ids["cls"]]  # the beginning is kept
    assert s.input_ids[3:5] == w(tok, "the") + [ids["cls"]]
    assert s.input_ids[13:] == [ids["start"]] + w(tok, "they match")
    assert s.lm_labels[13:] == w(tok, "they match") + [ids["eos"]]
    # the minimum lengths: the spans hold their special token alone
    cfg1 = LayoutConfig(max_query_len=1, max_document_len=1, max_reason_len=1)
    s1 = encode_sample(tok, ids, q, d, r, 1, config=cfg1)
    assert s1.spans == (1, 1, 8, 1)
    assert s1.input_ids[0] == s1.input_ids[1] == ids["cls"]
    assert s1.input_ids[-1] == ids["start"] and s1.lm_labels[-1] == ids["eos"]
    for n in range(1, 9):
        cfg = LayoutConfig(max_query_len=n, max_document_len=n, max_reason_len=n)
        s = encode_sample(tok, ids, q, d, r, 1, config=cfg)
        Lq, Ld, Lp, Lg = s.spans
        assert 1 <= Lq <= n and 1 <= Ld <= n and 1 <= Lg <= n
        assert s.input_ids[Lq - 1] == ids["cls"] and s.input_ids[Lq + Ld - 1] == ids["cls"]
        assert s.input_ids[Lq + Ld + Lp - 1] == ids["cls"]


def test_layout_config_validation_and_serialization():
    cfg = LayoutConfig(max_query_len=8, position_mode="continuous")
    d = dataclasses.asdict(cfg)
    assert d == cfg.to_dict() and LayoutConfig(**d) == cfg
    with pytest.raises(ValueError, match=r"\[gMask\]"):
        LayoutConfig(prompt="the correlation score is [CLS]")
    with pytest.raises(ValueError, match=r"end with \[CLS\]"):
        LayoutConfig(prompt="because [gMask], [CLS] the correlation score is")
    with pytest.raises(ValueError, match="position_mode"):
        LayoutConfig(position_mode="absolute")
    with pytest.raises(ValueError, match="max_query_len"):
        LayoutConfig(max_query_len=0)
    with pytest.raises(ValueError, match="max_reason_len"):
        LayoutConfig(max_reason_len=0)


def test_custom_prompt(tok, ids):
    cfg = LayoutConfig(prompt="[gMask] score [CLS]")
    s = encode_sample(tok, ids, "how", "loan", None, 1, config=cfg)
    assert s.spans[2] == 3
    assert s.input_ids[-3:] == [ids["gmask"]] + w(tok, "score") + [ids["cls"]]


def test_unknown_parts_and_paradigm(tok, ids):
    with pytest.raises(ValueError, match="parts"):
        encode_sample(tok, ids, "how", "loan", config=LayoutConfig(), parts="dq")
    with pytest.raises(ValueError, match="paradigm 'two-tower'"):
        UGDCollator(tok, paradigm="two-tower")


# ---------------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------------

RECORDS = [
    {"query": "how do I", "document": "the loan", "label": 1, "reason": "they match"},
    {"query": "reset", "document": "my password was approved", "label": 0},
    {"query": "", "document": "loan", "label": 1, "reason": "both ask about passwords"},
]


def samples(tok, ids, parts="qdpg", cfg=None):
    cfg = cfg or LayoutConfig()
    return [encode_sample(tok, ids, r["query"], r["document"], r.get("reason"), r["label"], config=cfg, parts=parts)
            for r in RECORDS]


def table_intervals(spans, paradigm):
    """The table of docs/spec.md section 3, written out per row (relative key intervals)."""
    ks, ke = [], []
    for Lq, Ld, Lp, Lg in spans:
        A = Lq + Ld + Lp
        for i in range(A + Lg):
            if i >= A:
                lo, hi = 0, i + 1
            elif paradigm == "stm" or i >= Lq + Ld:
                lo, hi = 0, A
            elif i < Lq:
                lo, hi = 0, Lq
            else:
                lo, hi = Lq, Lq + Ld
            ks.append(lo)
            ke.append(hi)
    return ks, ke


@pytest.mark.parametrize("mask", ["ttm", "stm"])
def test_pack_three_samples(tok, ids, mask):
    ss = samples(tok, ids)
    b = pack(ss, mask)
    assert [s.spans for s in ss] == [(4, 3, 8, 3), (2, 5, 8, 0), (1, 2, 8, 5)]
    assert b["spans"].dtype == torch.int32 and b["spans"].tolist() == [[4, 3, 8, 3], [2, 5, 8, 0], [1, 2, 8, 5]]
    assert b["cu_seqlens"].tolist() == [0, 18, 33, 49]
    assert b["max_seqlen"] == 18 and isinstance(b["max_seqlen"], int)
    T = 49
    for key in ("input_ids", "position_ids", "lm_labels"):
        assert b[key].shape == (1, T) and b[key].dtype == torch.int64
    assert b["input_ids"][0].tolist() == sum((s.input_ids for s in ss), [])
    assert b["position_ids"][0].tolist() == sum((s.position_ids for s in ss), [])
    assert b["lm_labels"][0].tolist() == sum((s.lm_labels for s in ss), [])
    assert b["labels"].dtype == torch.int64 and b["labels"].tolist() == [1, 0, 1]
    assert b["cls_index"].dtype == torch.int64
    assert b["cls_index"].tolist() == [[3, 6, 14], [18 + 1, 18 + 6, 18 + 14], [33 + 0, 33 + 2, 33 + 10]]
    assert (b["input_ids"][0][b["cls_index"]] == ids["cls"]).all()
    ks, ke = table_intervals(b["spans"].tolist(), mask)
    assert b["kv_start"].dtype == torch.int32 and b["kv_start"].tolist() == ks
    assert b["kv_end"].tolist() == ke
    cu, k0, k1 = ugd_ops.row_intervals(b["spans"], mask)
    assert torch.equal(cu, b["cu_seqlens"]) and torch.equal(k0, b["kv_start"]) and torch.equal(k1, b["kv_end"])
    # G positions are exactly where lm_labels are set
    g = b["lm_labels"][0] != IGNORE_INDEX
    assert int(g.sum()) == 3 + 0 + 5


def test_pack_cls_index_is_minus_one_for_empty_spans(tok, ids):
    b = pack(samples(tok, ids, "qd"), "ttm")
    assert b["cls_index"][:, 2].tolist() == [-1, -1, -1]
    assert b["cls_index"].tolist() == [[3, 6, -1], [7 + 1, 7 + 6, -1], [14 + 0, 14 + 2, -1]]
    d = pack(samples(tok, ids, "d"), "bidirectional")
    assert d["cls_index"].tolist() == [[-1, 2, -1], [-1, 3 + 4, -1], [-1, 8 + 1, -1]]
    assert d["kv_start"].tolist() == [0] * 10 and d["kv_end"].tolist() == [3] * 3 + [5] * 5 + [2] * 2


def test_document_cls_in_full_pack_matches_lone_document(tok, ids):
    full = pack(samples(tok, ids), "ttm")
    lone = samples(tok, ids, "d")
    lone_q = samples(tok, ids, "q")
    for b, (d, q) in enumerate(zip(lone, lone_q)):
        i = int(full["cls_index"][b, 1])
        assert int(full["input_ids"][0, i]) == d.input_ids[-1] == ids["cls"]
        cu = int(full["cu_seqlens"][b])
        Lq, Ld = full["spans"][b, :2].tolist()
        assert full["input_ids"][0, cu + Lq:cu + Lq + Ld].tolist() == d.input_ids
        assert full["position_ids"][0, cu + Lq:cu + Lq + Ld].tolist() == d.position_ids
        assert full["input_ids"][0, cu:cu + Lq].tolist() == q.input_ids
        assert int(full["cls_index"][b, 0]) == cu + Lq - 1


def test_pack_errors(tok, ids):
    with pytest.raises(ValueError, match="at least one"):
        pack([], "ttm")
    with pytest.raises(ValueError, match="mask"):
        pack(samples(tok, ids), "diagonal")


# ---------------------------------------------------------------------------------------------
# collator
# ---------------------------------------------------------------------------------------------


# the paradigms whose batch is the default pack of their parts and mask (the embedding paradigms build
# their own batches: tests/paradigms/test_ullme.py, tests/paradigms/test_flipped_kd.py)
@pytest.mark.parametrize("paradigm", sorted(p.name for p in all_paradigms() if type(p).collate is Paradigm.collate))
def test_collator_paradigms(tok, ids, paradigm):
    parts, mask = paradigms.get(paradigm).parts, paradigms.get(paradigm).mask
    batch = UGDCollator(tok, paradigm=paradigm)(RECORDS)
    if paradigm == "ttm":
        assert set(batch) == {"query", "document", "labels"}
        assert batch["labels"].tolist() == [1, 0, 1]
        q, d = batch["query"], batch["document"]
        assert q["spans"].tolist() == [[4, 0, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0]]
        assert d["spans"].tolist() == [[0, 3, 0, 0], [0, 5, 0, 0], [0, 2, 0, 0]]
        assert q["cls_index"][:, 0].tolist() == [3, 5, 6] and (q["cls_index"][:, 1:] == -1).all()
        assert d["cls_index"][:, 1].tolist() == [2, 7, 9] and (d["cls_index"][:, [0, 2]] == -1).all()
        for p in (q, d):  # each span alone, bidirectional
            cu = p["cu_seqlens"].tolist()
            seq_len = torch.tensor([cu[b + 1] - cu[b] for b in range(3)]).repeat_interleave(
                torch.tensor([cu[b + 1] - cu[b] for b in range(3)]))
            assert p["kv_start"].tolist() == [0] * cu[-1]
            assert p["kv_end"].tolist() == seq_len.tolist()
        return
    expected = pack(samples(tok, ids, parts), mask)
    assert set(batch) == set(expected)
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(batch[k], v), k
        else:
            assert batch[k] == v
    Lp = 8 if "p" in parts else 0
    assert batch["spans"][:, 2].tolist() == [Lp] * 3
    assert batch["spans"][:, 3].tolist() == ([3, 0, 5] if "g" in parts else [0, 0, 0])


def test_collator_record_errors_and_missing_label(tok):
    c = UGDCollator(tok, paradigm="ugd-ttm")
    with pytest.raises(ValueError, match="record 1: missing 'document'"):
        c([RECORDS[0], {"query": "how"}])
    with pytest.raises(ValueError, match="'label' must be an int"):
        c([{"query": "how", "document": "loan", "label": "yes"}])
    b = c([{"query": "how", "document": "loan"}])  # inference: no label
    assert b["labels"].tolist() == [IGNORE_INDEX]
    with pytest.raises(ValueError, match="empty"):
        c([])


def test_collator_config_and_lengths(tok):
    cfg = LayoutConfig(max_document_len=2, position_mode="continuous")
    c = UGDCollator(tok, paradigm="stm", layout=cfg)
    b = c(RECORDS)
    assert b["spans"][:, 1].tolist() == [2, 2, 2]
    assert b["position_ids"][0, :12].tolist() == list(range(12))
    assert c.lengths(RECORDS) == [4 + 2 + 8, 2 + 2 + 8, 1 + 2 + 8]
    assert UGDCollator(tok, paradigm="ttm").lengths(RECORDS) == [4 + 3, 2 + 5, 1 + 2]


def test_collator_warns_over_budget(tok):
    c = UGDCollator(tok, paradigm="ugd-ttm", max_tokens=20)
    with pytest.warns(UserWarning, match="max_tokens=20"):
        c(RECORDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c(RECORDS[:1])
    with pytest.raises(ValueError, match="max_tokens"):
        UGDCollator(tok, max_tokens=0)


def test_budget_batches():
    assert budget_batches([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    assert budget_batches([], 10) == []
    assert budget_batches([7, 7, 7], 7) == [[0], [1], [2]]
    with pytest.warns(UserWarning, match="exceed max_tokens=5"):
        out = budget_batches([2, 9, 3, 1], 5)
    assert out == [[0], [1], [2, 3]]
    lengths = [5, 1, 8, 3, 3, 2, 6, 4, 4, 1]
    out = budget_batches(lengths, 9)
    assert sorted(i for b in out for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 9 for b in out)
    with pytest.raises(ValueError, match="max_tokens"):
        budget_batches([1], 0)
    with pytest.raises(ValueError, match="negative"):
        budget_batches([1, -2], 4)
