"""UGDModel on tiny random backbones (CPU): equivalence with eager attention and a dense mask,
two-tower consistency, packing, learning, ablations, save/load."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import ugd.modules.attention  # noqa: F401  registers attn_implementation="ugd"
from ugd.data.collator import UGDCollator
from ugd.data.layout import LayoutConfig
from ugd import paradigms
from ugd.model import UGDConfig, UGDModel
from ugd.testing import make_test_tokenizer

RECORDS = [
    {"query": "red running shoes", "document": "light running shoes in red and blue for road races",
     "label": 1, "reason": "the page sells red running shoes"},
    {"query": "cheap flights", "document": "a recipe for lemon cake with fresh lemons", "label": 0,
     "reason": "the page is about cake not flights"},
    {"query": "lemon cake", "document": "bake a lemon cake in one hour", "label": 1, "reason": ""},
]
LAYOUT = LayoutConfig(max_query_len=16, max_document_len=24, max_reason_len=16)


def backbone_config(kind: str, vocab: int):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256)
    return Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)


def make_model(kind="qwen2", paradigm="ugd-ttm", seed=0, **overrides):
    torch.manual_seed(seed)
    tok = make_test_tokenizer([r["query"] + " " + r["document"] + " " + r["reason"] for r in RECORDS])
    backbone = AutoModelForCausalLM.from_config(backbone_config(kind, len(tok) + 3), attn_implementation="ugd")
    cfg = UGDConfig(paradigm=paradigm, num_labels=2, kl_dim=8, layout=LAYOUT.__dict__, **overrides)
    model = UGDModel.from_backbone(backbone, tok, cfg)
    return model, tok


def collate(tok, paradigm, records=RECORDS):
    return UGDCollator(tok, paradigm=paradigm, layout=LAYOUT)(records)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("paradigm", ["ugd-ttm", "ugd-stm"])
def test_ugd_attention_equals_eager_with_dense_mask(kind, paradigm):
    model, tok = make_model(kind, paradigm)
    model.train()
    batch = collate(tok, paradigm)
    eager = copy.deepcopy(model)
    eager.backbone.set_attn_implementation("eager")  # UGDModel.encode then passes a dense 4D mask
    a, b = model(batch), eager(batch)
    assert a.terms.keys() == b.terms.keys() and a.terms
    for t in a.terms:
        torch.testing.assert_close(a.terms[t], b.terms[t], atol=1e-5, rtol=1e-5)
    for name in ("logits_t", "logits_s"):
        if getattr(a, name) is not None:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_two_tower_vectors_equal_lone_encodings():
    model, tok = make_model()
    model.eval()
    full = collate(tok, "ugd-ttm")
    with torch.no_grad():
        out = model(full, compute=("two_tower",))
        coll = UGDCollator(tok, paradigm="ttm", layout=LAYOUT)(RECORDS)  # queries and documents alone
        v_q = model.encode(coll["query"])[coll["query"]["cls_index"][:, 0]]
        v_d = model.encode(coll["document"])[coll["document"]["cls_index"][:, 1]]
    torch.testing.assert_close(out.v_q, v_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.v_d, v_d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("paradigm", ["ugd-ttm", "ugd-stm", "shared-ttm", "stm"])
def test_packed_batch_equals_one_by_one(paradigm):
    model, tok = make_model(paradigm=paradigm)
    model.eval()
    compute = tuple(x for x, ok in (("two_tower", paradigm in ("ugd-ttm", "shared-ttm")),
                                     ("single_tower", paradigm in ("ugd-ttm", "ugd-stm", "stm"))) if ok)
    with torch.no_grad():
        packed = model(collate(tok, paradigm), compute=compute)
        for i, rec in enumerate(RECORDS):
            one = model(collate(tok, paradigm, [rec]), compute=compute)
            for name in ("logits_t", "logits_s"):
                if getattr(packed, name) is not None:
                    torch.testing.assert_close(getattr(packed, name)[i:i + 1], getattr(one, name), atol=1e-5,
                                               rtol=1e-5)


def test_tiny_model_learns_and_every_term_falls():
    model, tok = make_model(seed=1)
    model.train()
    batch = collate(tok, "ugd-ttm")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        out = model(batch)
        if first is None:
            first = {k: v.item() for k, v in out.terms.items()}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = {k: v.item() for k, v in model(batch).terms.items()}
    assert set(first) == {"cls_t", "cls_s", "gen", "kl", "kl_emb"}
    for term in first:
        assert last[term] < first[term], f"{term}: {first[term]:.4f} -> {last[term]:.4f}"


def _heads_run(model, batch, monkeypatch):
    """Names of the head modules that ran in a forward pass ("lm_head": the generation loss ran)."""
    import ugd.paradigms.ugd_paradigms as family  # where the UGD forward calls it

    ran = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: ran.add(n))
             for n, m in model.heads.named_children() if m is not None]
    real = family.generation_loss

    def spy(*args, **kwargs):
        ran.add("lm_head")
        return real(*args, **kwargs)

    monkeypatch.setattr(family, "generation_loss", spy)
    model(batch)
    for h in hooks:
        h.remove()
    monkeypatch.setattr(family, "generation_loss", real)
    return ran


@pytest.mark.parametrize("zeroed,absent", [
    ({}, set()),
    ({"gamma": 0}, {"lm_head"}),
    ({"mu": 0}, {"fc_t_kl", "fc_s_kl"}),
    ({"lam": 0, "mu": 0}, {"fc_t_kl", "fc_s_kl"}),
    ({"alpha": 0, "lam": 0, "mu": 0}, {"fc_t", "fc_t_kl", "fc_s_kl"}),
    ({"beta": 0, "lam": 0, "mu": 0}, {"fc_s_kl", "fc_t_kl"}),
])
def test_ablation_switches_change_which_heads_run(zeroed, absent, monkeypatch):
    model, tok = make_model(**zeroed)
    model.train()
    batch = collate(tok, "ugd-ttm")
    ran = _heads_run(model, batch, monkeypatch)
    full = {"classifier", "fc_t", "fc_t_kl", "fc_s_kl", "lm_head"}
    assert ran == full - absent
    out = model(batch)
    assert set(out.terms) == set(model.config.active_terms)
    if "beta" in zeroed:
        assert out.logits_s is None


@pytest.mark.parametrize("paradigm", paradigms.names(family="ugd"))
def test_every_paradigm_trains_its_terms(paradigm):
    model, tok = make_model(paradigm=paradigm)
    model.train()
    out = model(collate(tok, paradigm))
    assert set(out.terms) == set(paradigms.get(paradigm).terms)
    out.loss.backward()


@pytest.mark.parametrize("detach", [True, False])
def test_detach_switch(detach):
    """With only the logit KL on, the single-tower vector V_s gets a gradient only without detach."""
    model, tok = make_model(detach=detach, alpha=0, beta=0, gamma=0, mu=0)
    model.train()
    out = model(collate(tok, "ugd-ttm"))
    assert set(out.terms) == {"kl"}
    g_s, g_q = torch.autograd.grad(out.loss, (out.v_s, out.v_q), allow_unused=True)
    assert g_q is not None and g_q.abs().sum() > 0  # the two-tower side always learns
    assert (g_s is None) == detach


def test_save_and_load(tmp_path):
    model, tok = make_model()
    model.eval()
    batch = collate(tok, "ugd-ttm")
    with torch.no_grad():
        before = model(batch, compute=("two_tower", "single_tower"))
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    loaded = UGDModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        after = loaded(batch, compute=("two_tower", "single_tower"))
    torch.testing.assert_close(before.logits_t, after.logits_t)
    torch.testing.assert_close(before.logits_s, after.logits_s)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))  # the backbone stays a plain checkpoint
    assert plain.get_input_embeddings().weight.shape[0] == len(tok)


def test_ttm_baseline_has_two_backbones(tmp_path):
    model, tok = make_model(paradigm="ttm")
    assert model.document_backbone is not None and model.document_backbone is not model.backbone
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    loaded = UGDModel.from_pretrained(str(tmp_path))
    assert loaded.document_backbone is not None


def test_bad_config():
    with pytest.raises(ValueError, match="paradigm must be one of"):
        UGDConfig(paradigm="two-tower")
    with pytest.raises(ValueError, match="loss weight mu must be >= 0"):
        UGDConfig(mu=-1)


def test_generation_loss_is_per_sample_mean_then_batch_mean():
    """L_gen (docs/spec.md section 5, paper eq. 3): mean over each sample's reason tokens, then over the
    samples that have a reason."""
    from ugd.modules.losses import generation_loss

    torch.manual_seed(0)
    hidden = torch.randn(9, 6, dtype=torch.float64)
    head = torch.nn.Linear(6, 11, bias=False).double()
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)  # sample 1 (tokens 4-5) has no reason
    labels = torch.tensor([-100, -100, 3, 7, -100, -100, 1, 2, 10])
    got = generation_loss(hidden, head, labels, cu)
    ce = torch.nn.functional.cross_entropy(head(hidden), labels.clamp(min=0), reduction="none")
    want = (ce[2:4].mean() + ce[6:9].mean()) / 2
    torch.testing.assert_close(got, want)
