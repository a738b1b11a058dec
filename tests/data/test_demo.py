"""ugd.data.demo: the generated demo set is deterministic, balanced, tokenizable and learnable."""

import collections
import re

import pytest
import torch

from ugd.data import demo as demo_data
from ugd.data.collator import UGDCollator
from ugd.data.records import read_records, write_jsonl
from ugd.data.demo import build_tokenizer, demo_splits, generate_records, tiny_backbone_config
from ugd.data.layout import LayoutConfig, add_special_tokens


def words(text):
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def test_records_shape_and_reasons():
    records = generate_records(200, seed=3)
    assert len(records) == 200
    for r in records:
        assert set(r) == {"query", "document", "label", "reason"}
        assert r["label"] in (0, 1, 2, 3)
        assert 2 <= len(r["query"].split()) <= 8
        assert 8 <= len(r["document"].split()) <= 25
        assert 5 <= len(r["reason"].split()) <= 15, r["reason"]
    assert generate_records(0) == []
    with pytest.raises(ValueError):
        generate_records(-1)


def test_long_pages():
    short, long = generate_records(100, seed=4), generate_records(100, seed=4, long_pages=True)
    assert [r["label"] for r in short] == [r["label"] for r in long]
    assert sum(len(r["document"].split()) for r in long) > 1.5 * sum(len(r["document"].split()) for r in short)
    assert demo_splits(10, 5, long_pages=True)[1] == generate_records(5, seed=1, long_pages=True)


def test_determinism():
    assert generate_records(50, seed=1) == generate_records(50, seed=1)
    assert generate_records(50, seed=1) != generate_records(50, seed=2)
    train, ev = demo_splits(100, 20, seed=0)
    assert (train, ev) == demo_splits(100, 20, seed=0)
    assert len(train) == 100 and len(ev) == 20
    assert train[:20] != ev  # disjoint seeds
    assert demo_splits(10, 10, seed=1)[0] not in (train[:10], ev[:10])


def test_vocabulary_words_have_one_role():
    """Product modifiers, category heads and colours never occur in the noise text (templates,
    features, attributes, brands), so sharing such a word always means what the label says."""
    d = demo_data
    facts = set(d.COLOURS) | set(d.CATEGORIES) | {m for ms in d.CATEGORIES.values() for m in ms}
    noise = [*sum(d.FEATURES.values(), ()), *d.FILLERS, *d.TITLE_TEMPLATES, *d.CLOSING_TEMPLATES,
             *(t for t, _ in d.QUERY_TEMPLATES), *d.QUERY_ATTRIBUTES, *d.AUDIENCES, *d.PAGE_ATTRIBUTES, *d.BRANDS]
    assert not facts & {w for t in noise for w in words(t)}
    modifiers = [m for ms in d.CATEGORIES.values() for m in ms]
    assert len(modifiers) == len(set(modifiers))


@pytest.mark.parametrize("n", [4, 401, 1000])
def test_labels_balanced(n):
    counts = collections.Counter(r["label"] for r in generate_records(n, seed=5))
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_relevance_facts_are_shared_words():
    """The label is a function of which product words the query and the page share."""
    heads = set(demo_data.CATEGORIES)
    for r in generate_records(200, seed=7) + generate_records(200, seed=8, long_pages=True):
        q, d = set(words(r["query"])), set(words(r["document"]))
        colour = next(w for w in words(r["query"]) if w in demo_data.COLOURS)
        head = next(w for w in words(r["query"]) if w in heads)
        modifier = next(w for w in words(r["query"]) if w in demo_data.CATEGORIES[head])
        same_head = head in d
        same_product = same_head and modifier in d
        label = 3 if same_product and colour in d else 2 if same_product else 1 if same_head else 0
        assert label == r["label"], r


def test_round_trip_through_jsonl(tmp_path):
    records = generate_records(40, seed=0)
    write_jsonl(records, tmp_path / "demo.jsonl")
    back, stats = read_records(tmp_path / "demo.jsonl", num_labels=demo_data.NUM_LABELS)
    assert back == records and stats.kept == 40


def test_tokenizer_covers_generated_data_and_the_prompt():
    train, ev = demo_splits(300, 100, seed=0)
    tok = build_tokenizer(train + ev)
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) < 400  # a small word-level vocabulary
    assert build_tokenizer(train + ev).get_vocab() == tok.get_vocab()  # deterministic
    unk = tok.unk_token_id
    for r in train[:100] + ev:
        for key in ("query", "document", "reason"):
            ids = tok(r[key], add_special_tokens=False)["input_ids"]
            assert unk not in ids, (key, r[key])
            assert tok.convert_ids_to_tokens(ids) == words(r[key])  # lowercased words and punctuation
    assert tok("RED Running shoes", add_special_tokens=False)["input_ids"] == \
        tok("red running shoes", add_special_tokens=False)["input_ids"]
    # words never seen map to <unk>; extra_texts adds words
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [unk]
    tok2 = build_tokenizer(train[:10], extra_texts=["zebra crossing"])
    assert unk not in tok2("zebra crossing", add_special_tokens=False)["input_ids"]

    # the UGD special tokens survive the lowercasing normalizer, and the default prompt has no <unk>
    ids = add_special_tokens(tok)
    layout = LayoutConfig(max_query_len=16, max_document_len=80, max_reason_len=24)
    batch = UGDCollator(tok, paradigm="ugd-ttm", layout=layout)(train[:4])
    assert unk not in batch["input_ids"][0].tolist()
    assert (batch["input_ids"][0] == ids["start"]).sum() == 4
    assert batch["labels"].tolist() == [r["label"] for r in train[:4]]
    assert int(batch["spans"][:, 3].min()) >= 6  # every sample has a reason


def test_make_test_tokenizer_unchanged():
    from ugd.testing import DEFAULT_TEXTS, make_test_tokenizer

    tok = make_test_tokenizer(["Zebra"])
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.unk_token_id not in tok("Zebra " + DEFAULT_TEXTS[4], add_special_tokens=False)["input_ids"]
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]  # case-sensitive


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tiny_backbone_config(family, one_thread):
    from transformers import AutoModelForCausalLM

    cfg = tiny_backbone_config(300, family=family)
    assert cfg.model_type == family and cfg.vocab_size == 300 and cfg.tie_word_embeddings
    assert cfg.hidden_size == 128 and cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert tiny_backbone_config(300, num_hidden_layers=3).num_hidden_layers == 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    out = model(input_ids=torch.tensor([[3, 4, 5, 2]]))
    assert out.logits.shape == (1, 4, 300)
    with pytest.raises(ValueError, match="family"):
        tiny_backbone_config(300, family="gpt2")


def overlap_features(records, vocab):
    """[words in both, words only in the query, words only in the page] as 0/1 bags of words."""
    index = {w: i for i, w in enumerate(vocab)}
    V = len(vocab)
    x = torch.zeros(len(records), 3 * V)
    for n, r in enumerate(records):
        q, d = set(words(r["query"])), set(words(r["document"]))
        for offset, group in ((0, q & d), (V, q - d), (2 * V, d - q)):
            for w in group:
                if w in index:
                    x[n, offset + index[w]] = 1.0
    return x, torch.tensor([r["label"] for r in records])


def fit_and_score(xt, yt, xe, ye, steps=200):
    torch.manual_seed(0)
    lin = torch.nn.Linear(xt.shape[1], demo_data.NUM_LABELS)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        return (lin(xe).argmax(1) == ye).float().mean().item()


def test_labels_are_learnable_from_word_overlap(one_thread):
    """A bag-of-words logistic regression on query/page overlap beats chance (25%) by far on held-out
    data: the label is in the text, so a tiny two-tower model can learn it too. The query alone or
    the page alone says nothing: the label is a property of the pair."""
    train, ev = demo_splits(800, 400, seed=0)
    vocab = sorted({w for r in train for w in words(r["query"]) + words(r["document"])})
    xt, yt = overlap_features(train, vocab)
    xe, ye = overlap_features(ev, vocab)
    acc = fit_and_score(xt, yt, xe, ye)
    assert acc > 0.9, acc
    V = len(vocab)
    query_alone = lambda rs: overlap_features([{**r, "document": ""} for r in rs], vocab)[0][:, V:2 * V]
    page_alone = lambda rs: overlap_features([{**r, "query": ""} for r in rs], vocab)[0][:, 2 * V:]
    for side in (query_alone, page_alone):
        assert fit_and_score(side(train), yt, side(ev), ye, steps=100) < 0.4
