"""ULLME: the loss pieces on hand-computed cases, gradient flow (detached terms really detached), and
the paradigm end to end on a tiny model (train steps, inference, save/load, refusals)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ugd.paradigms._contrastive import (
    ScoreReadout,
    cosine_matrix,
    dpo_loss,
    generation_kl,
    in_batch_contrastive,
    pack_groups,
    pool,
    sequence_logprobs,
)

# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------


def test_pool_mean_and_last_by_hand():
    h = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # rows (0,1) (2,3) ... (10,11)
    starts, lengths = torch.tensor([0, 2, 5]), torch.tensor([2, 3, 1])
    mean = pool(h, starts, lengths, "mean")
    assert torch.equal(mean, torch.tensor([[1.0, 2.0], [6.0, 7.0], [10.0, 11.0]]))
    last = pool(h, starts, lengths, "last")
    assert torch.equal(last, h[[1, 4, 5]])


def test_pool_rejects_bad_arguments():
    h = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="pooling"):
        pool(h, torch.tensor([0]), torch.tensor([1]), "max")
    with pytest.raises(ValueError, match="at least one token"):
        pool(h, torch.tensor([0]), torch.tensor([0]), "mean")


def test_pool_mean_gradient_spreads_evenly():
    h = torch.randn(5, 3, requires_grad=True)
    pool(h, torch.tensor([1]), torch.tensor([4]), "mean").sum().backward()
    assert torch.allclose(h.grad[0], torch.zeros(3))
    assert torch.allclose(h.grad[1:], torch.full((4, 3), 0.25))


# ---------------------------------------------------------------------------------------------
# contrastive with in-batch negatives
# ---------------------------------------------------------------------------------------------


def test_in_batch_contrastive_by_hand():
    sim = torch.tensor([[0.5, 0.1, -0.2], [0.3, 0.9, 0.0], [0.2, 0.2, 0.2]])
    tau = 0.5
    # rows 0 and 1 are positive pairs; row 2 (a negative pair) only serves as a negative document
    got = in_batch_contrastive(sim, torch.tensor([0, 1]), temperature=tau)
    r0 = -(0.5 / tau - math.log(sum(math.exp(x / tau) for x in (0.5, 0.1, -0.2))))
    r1 = -(0.9 / tau - math.log(sum(math.exp(x / tau) for x in (0.3, 0.9, 0.0))))
    assert got.item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


def test_in_batch_contrastive_exclusion_and_target_kept():
    sim = torch.tensor([[0.5, 0.4, -0.2], [0.3, 0.9, 0.0], [0.2, 0.2, 0.2]])
    exclude = torch.tensor([[True, True, False], [False, False, False], [False, False, False]])
    got = in_batch_contrastive(sim, torch.tensor([0]), temperature=1.0, exclude=exclude)
    # column 1 is excluded for row 0; its own column 0 is kept although marked
    want = -(0.5 - math.log(math.exp(0.5) + math.exp(-0.2)))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_in_batch_contrastive_no_positive_rows_is_zero_and_connected():
    sim = torch.randn(3, 3, requires_grad=True)
    loss = in_batch_contrastive(sim, torch.tensor([], dtype=torch.int64), temperature=0.05)
    assert loss.item() == 0.0
    loss.backward()
    assert sim.grad is not None


# ---------------------------------------------------------------------------------------------
# generation side: log-likelihoods, KL, DPO
# ---------------------------------------------------------------------------------------------


def test_sequence_logprobs_match_log_softmax():
    torch.manual_seed(0)
    T, H, V = 9, 4, 11
    hidden = torch.randn(T, H, dtype=torch.float64)
    head = torch.nn.Linear(H, V, bias=False).double()
    labels = torch.tensor([-100, 3, 4, -100, -100, 7, 1, 2, -100])
    seq_id = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])  # sequence 1 has one target, 2 has two
    total, mean = sequence_logprobs(hidden, head, labels, seq_id, 4)  # sequence 3 has none
    logp = torch.log_softmax(hidden @ head.weight.T, -1)
    tok = torch.stack([logp[i, labels[i]] for i in range(T) if labels[i] != -100])
    want_sum = torch.stack([tok[0] + tok[1], tok[2], tok[3] + tok[4], torch.zeros((), dtype=torch.float64)])
    assert torch.allclose(total.double(), want_sum, atol=1e-5)
    assert torch.allclose(mean.double(), want_sum / torch.tensor([2.0, 1.0, 2.0, 1.0], dtype=torch.float64),
                          atol=1e-5)


def test_sequence_logprobs_gradient_reaches_hidden_and_head():
    torch.manual_seed(1)
    hidden = torch.randn(5, 4, requires_grad=True)
    head = torch.nn.Linear(4, 7, bias=False)
    total, _ = sequence_logprobs(hidden, head, torch.tensor([1, 2, -100, 3, 4]), torch.tensor([0, 0, 0, 1, 1]), 2)
    total.sum().backward()
    assert hidden.grad[2].abs().sum() == 0  # no target there
    assert hidden.grad[[0, 1, 3, 4]].abs().sum() > 0
    assert head.weight.grad.abs().sum() > 0


def test_generation_kl_by_hand_and_generation_side_detached():
    emb = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.4, 0.3]], requires_grad=True)
    gen = torch.tensor([[-1.0, -2.5, -3.0], [-2.0, -1.0, -1.5]], requires_grad=True)
    tau = 0.05
    loss = generation_kl(emb, gen, temperature=tau)
    p = torch.softmax(emb.detach() / tau, -1)
    q = torch.softmax(gen.detach(), -1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert gen.grad is None or gen.grad.abs().sum() == 0  # P_gen is the target: no gradient


def test_generation_kl_shape_check_and_empty():
    with pytest.raises(ValueError, match="same shape"):
        generation_kl(torch.zeros(2, 3), torch.zeros(2, 4), temperature=1.0)
    assert generation_kl(torch.zeros(0, 3), torch.zeros(0, 3), temperature=1.0).item() == 0.0


def test_dpo_by_hand_reference_free_and_with_reference():
    c, r = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0, -1.0])
    got = dpo_loss(c, r, beta=0.5)
    want = -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(-0.5))) / 2
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    ref_c, ref_r = torch.tensor([-1.5, -1.0]), torch.tensor([-1.5, -2.0], requires_grad=True)
    got = dpo_loss(c, r, beta=0.5, ref_chosen=ref_c, ref_rejected=ref_r)
    # log-ratios: (2 - 0) and (-1 - 1)
    want = -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(-1.0))) / 2
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert c.grad is not None and ref_r.grad is None  # the reference is a constant
    assert dpo_loss(torch.zeros(0), torch.zeros(0), beta=0.1).item() == 0.0


def test_score_readout_is_linear_in_the_score():
    head = ScoreReadout(4, scale=10.0)
    s = torch.tensor([0.0, 1.0])
    out = head(s)
    assert torch.allclose(out[0], 10 * head.bias) and torch.allclose(out[1], 10 * (head.weight + head.bias))
    assert out[1].argmax() == 3  # initialised monotone: a high similarity reads as the top class


def test_cosine_matrix():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(cosine_matrix(a, b), torch.tensor([[1.0, 0.0], [2 ** -0.5, 2 ** -0.5]]))


# ---------------------------------------------------------------------------------------------
# packing groups with different masks
# ---------------------------------------------------------------------------------------------


def test_pack_groups_concatenates_layouts():
    import ugd_ops
    from ugd.data.layout import EncodedSample

    def sample(spans):
        n = sum(spans)
        return EncodedSample(list(range(1, n + 1)), list(range(n)), [-100] * n, spans)

    bi = [sample((2, 0, 0, 0)), sample((0, 3, 0, 0))]
    ca = [sample((2, 0, 0, 2))]
    out = pack_groups([(bi, "bidirectional"), (ca, "causal")])
    assert out["cu_seqlens"].tolist() == [0, 2, 5, 9]
    assert out["group_offsets"].tolist() == [0, 2, 3]
    assert out["starts"].tolist() == [0, 2, 5] and out["lengths"].tolist() == [2, 3, 4]
    _, ks, ke = ugd_ops.row_intervals([[2, 0, 0, 0], [0, 3, 0, 0]], "bidirectional")
    _, ks2, ke2 = ugd_ops.row_intervals([[2, 0, 0, 2]], "causal")
    assert torch.equal(out["kv_start"], torch.cat([ks, ks2])) and torch.equal(out["kv_end"], torch.cat([ke, ke2]))
    mask = ugd_ops.dense_mask(out["cu_seqlens"], out["kv_start"], out["kv_end"])
    assert mask[0, 1] and not mask[0, 2]  # sample 0 bidirectional, sees only itself
    assert mask[6, 5] and not mask[5, 6]  # sample 2 causal


# ---------------------------------------------------------------------------------------------
# the paradigm on a tiny model
# ---------------------------------------------------------------------------------------------

RECORDS = [
    {"query": "red running shoes", "document": "light running shoes in red for road races", "label": 1},
    {"query": "red running shoes", "document": "a recipe for lemon cake with fresh lemons", "label": 0},
    {"query": "lemon cake", "document": "bake a lemon cake in one hour", "label": 1},
    {"query": "cheap flights", "document": "cheap flights to rome and paris every day", "label": 1},
    {"query": "cheap flights", "document": "red shoes for kids", "label": 0},
    {"query": "blue jacket", "document": "a warm blue jacket for winter", "label": 1},
]


def make_model(paradigm="ullme", seed=0, attn="ugd", **options):
    from transformers import AutoModelForCausalLM, Qwen2Config

    import ugd.modules.attention  # noqa: F401
    from ugd.data.layout import LayoutConfig
    from ugd.model import UGDConfig, UGDModel
    from ugd.testing import make_test_tokenizer

    torch.manual_seed(seed)
    tok = make_test_tokenizer([r["query"] + " " + r["document"] for r in RECORDS])
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok) + 3, max_position_embeddings=256)
    backbone = AutoModelForCausalLM.from_config(cfg, attn_implementation="ugd")
    layout = LayoutConfig(max_query_len=16, max_document_len=24, max_reason_len=16)
    model = UGDModel.from_backbone(backbone, tok, UGDConfig(paradigm=paradigm, num_labels=2, layout=layout.to_dict(),
                                                            options=options))
    if attn != "ugd":
        model.backbone.set_attn_implementation(attn)
    return model, tok


def make_batch(model, tok, records=RECORDS):
    from ugd.data.collator import UGDCollator
    from ugd.data.layout import LayoutConfig

    collator = UGDCollator(tok, paradigm=model.config.paradigm, layout=LayoutConfig(**model.config.layout),
                           model_config=model.config)
    return collator(records)


def test_collated_batch_layout():
    model, tok = make_model(candidates=3)
    batch = make_batch(model, tok)
    B = len(RECORDS)
    assert batch["num_pairs"] == B and batch["labels"].tolist() == [r["label"] for r in RECORDS]
    assert batch["cl_rows"].tolist() == [0, 2, 3, 5]
    # row 0's query also has document 1, but that one is a negative: not excluded
    assert not batch["cl_exclude"][0, 1]
    cand = batch["gen_candidates"]
    assert cand.shape == (4, 3) and cand[:, 0].tolist() == [0, 2, 3, 5]
    assert cand[0, 1] == 1  # row 0 ("red running shoes"): its own query's negative (record 1) first
    assert cand[2, 1] == 4  # row 3 ("cheap flights"): its own negative (record 4) first
    assert batch["group_offsets"].tolist() == [0, 2 * B, 2 * B + 12]
    spans = batch["spans"]
    assert (spans[:B, 1:] == 0).all() and (spans[B:2 * B, [0, 2, 3]] == 0).all()  # lone queries, documents
    assert (spans[2 * B:, 3] > 0).all()  # generation sequences: query then [Start] passage
    # the generation targets are exactly the passage tokens then EOS
    lm = batch["lm_labels"][0]
    g0 = int(batch["starts"][2 * B]), int(batch["lengths"][2 * B])
    doc0 = batch["input_ids"][0, int(batch["starts"][B]): int(batch["starts"][B]) + int(batch["lengths"][B]) - 1]
    tgt = lm[g0[0]: g0[0] + g0[1]]
    assert tgt[tgt != -100][:-1].tolist() == doc0.tolist() and tgt[-1] == tok.eos_token_id


def test_collator_reports_truncated_texts_once():
    model, tok = make_model()
    records = [dict(r, document=r["document"] + " red shoes" * 20) for r in RECORDS]
    with pytest.warns(UserWarning, match="documents longer than max_document_len=24") as caught:
        make_batch(model, tok, records)
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1


def test_collator_needs_the_model_config():
    from ugd.data.collator import UGDCollator

    model, tok = make_model()
    with pytest.raises(ValueError, match="model_config"):
        UGDCollator(tok, paradigm="ullme")(RECORDS)


def test_forward_terms_and_gradients():
    model, tok = make_model()
    model.train()
    out = model(make_batch(model, tok))
    assert set(out.terms) == {"cl", "kl_gen", "dpo", "readout"}
    assert all(torch.isfinite(v) for v in out.terms.values())
    assert out.logits_t.shape == (len(RECORDS), 2)
    want = sum(w * out.terms[t] for t, w in (("cl", 1.0), ("kl_gen", 1.0), ("dpo", 0.5), ("readout", 1.0)))
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    emb = model.backbone.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert model.heads.readout.weight.grad.abs().sum() > 0


def test_readout_does_not_train_the_encoder():
    model, tok = make_model(lambda_cl=0.0, lambda_kl=0.0, lambda_dpo=0.0)
    model.train()
    out = model(make_batch(model, tok))
    assert set(out.terms) == {"readout"}
    out.loss.backward()
    assert model.heads.readout.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.backbone.parameters())


def test_kl_term_trains_only_the_embedding_side():
    """GRL's KL: the generation distribution is the target; with only L_KL the LM head (used only to
    score the passages) gets no gradient, the embeddings do."""
    model, tok = make_model(lambda_cl=0.0, lambda_dpo=0.0, readout_weight=0.0)
    model.train()
    out = model(make_batch(model, tok))
    assert set(out.terms) == {"kl_gen"} and out.terms["kl_gen"] > 0
    out.loss.backward()
    # the tied embedding gets gradient through the embedding side; the final norm too
    assert model.backbone.model.norm.weight.grad.abs().sum() > 0
    grads = [p.grad for p in model.backbone.model.layers.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    head = model.backbone.get_output_embeddings().weight
    assert head is not model.backbone.get_input_embeddings().weight  # untied: the head is the generator's only
    assert head.grad is None or head.grad.abs().sum() == 0  # P_gen is detached: the generator learns nothing


def test_packed_terms_equal_eager_dense_mask():
    a, tok = make_model(attn="ugd")
    b, _ = make_model(attn="eager")
    a.train(), b.train()
    batch = make_batch(a, tok)
    oa, ob = a(batch), b(batch)
    for t in oa.terms:
        torch.testing.assert_close(oa.terms[t], ob.terms[t], atol=1e-5, rtol=1e-5)


def test_generation_scores_equal_a_plain_causal_forward():
    """The passage likelihoods computed inside the packed forward equal those of the generation
    sequence run alone through the causal LM (transformers' own attention)."""
    model, tok = make_model()
    model.eval()
    batch = make_batch(model, tok)
    B = len(RECORDS)
    with torch.no_grad():
        hidden = model.encode(batch)
        _, mean = model.paradigm.generation_scores(model, batch, hidden)
        ref = make_model(attn="eager")[0].eval()
        for g in range(3):
            k = 2 * B + g
            s, n = int(batch["starts"][k]), int(batch["lengths"][k])
            ids = batch["input_ids"][:, s: s + n]
            labels = batch["lm_labels"][0, s: s + n]
            logits = ref.backbone(input_ids=ids).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            keep = labels != -100
            want = logp[keep.nonzero()[:, 0], labels[keep]].mean()
            torch.testing.assert_close(mean.reshape(-1)[g], want, atol=1e-4, rtol=1e-4)


def test_no_generation_sequences_without_grl():
    model, tok = make_model(lambda_kl=0.0, lambda_dpo=0.0)
    batch = make_batch(model, tok)
    assert batch["gen_rows"].numel() == 0 and batch["group_offsets"][-1] == 2 * len(RECORDS)
    model.train()
    assert set(model(batch).terms) == {"cl", "readout"}


def test_batch_without_relevant_pairs():
    model, tok = make_model()
    model.train()
    out = model(make_batch(model, tok, [r for r in RECORDS if r["label"] == 0]))
    assert out.terms["cl"].item() == 0.0 and out.terms["kl_gen"].item() == 0.0
    out.loss.backward()


def test_bad_options_are_refused():
    from ugd.model import UGDConfig

    with pytest.raises(ValueError, match="candidates"):
        UGDConfig(paradigm="ullme", options={"candidates": 1})
    with pytest.raises(ValueError, match="pooling"):
        UGDConfig(paradigm="ullme", options={"pooling": "max"})
    with pytest.raises(ValueError, match="no option"):
        UGDConfig(paradigm="ullme", options={"margin": 1})
    with pytest.raises(ValueError, match="positive_min_label"):
        UGDConfig(paradigm="ullme", num_labels=2, options={"positive_min_label": 2})
    with pytest.raises(ValueError, match="dpo_reference"):
        UGDConfig(paradigm="ullme", options={"dpo_reference": "frozen"})


def test_dpo_reference_adapters_needs_lora():
    model, tok = make_model(dpo_reference="adapters")
    model.train()
    with pytest.raises(ValueError, match="LoRA"):
        model(make_batch(model, tok))
    model.eval()  # a merged checkpoint evaluated: the reference is gone, DPO is reported reference-free
    with torch.no_grad():
        assert torch.isfinite(model(make_batch(model, tok)).terms["dpo"])


def test_dpo_reference_adapters_with_peft():
    from peft import LoraConfig, get_peft_model

    model, tok = make_model(dpo_reference="adapters", lambda_cl=0.0, lambda_kl=0.0, readout_weight=0.0)
    model.backbone = get_peft_model(model.backbone, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.train()
    out = model(make_batch(model, tok))
    # at initialisation the adapters are zero: policy == reference, the DPO logit is 0
    assert out.terms["dpo"].item() == pytest.approx(math.log(2.0), rel=1e-5)
    out.loss.backward()


# ---------------------------------------------------------------------------------------------
# serving: the inference API, stored vectors, save/load, refusals
# ---------------------------------------------------------------------------------------------


def check_serving(model, tok, tmp_path, records):
    """Shared by test_flipped_kd: what an embedding paradigm serves and refuses, and its round trip."""
    from ugd import DocumentVectors
    from ugd.model import UGDModel

    model.eval()
    batch = make_batch(model, tok, records)
    with torch.no_grad():
        out = model(batch)
    queries = [r["query"] for r in records]
    documents = [r["document"] for r in records]
    # a text encoded alone at inference is the vector it had inside the training batch
    torch.testing.assert_close(model.encode_queries(queries), out.v_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_documents(documents), out.v_d, atol=1e-5, rtol=1e-5)
    probs = model.predict(list(zip(queries, documents)))
    torch.testing.assert_close(probs, out.logits_t.float().softmax(-1), atol=1e-5, rtol=1e-5)
    store = DocumentVectors.build(model, documents)
    hits = model.rank(queries[0], store, top_k=2)
    assert hits == model.rank(queries[0], documents, top_k=2)
    for mode in ("single_tower",):
        with pytest.raises(ValueError, match="bi-encoder"):
            model.predict(list(zip(queries, documents)), mode=mode)
    with pytest.raises(ValueError, match="bi-encoder"):
        model.generate_reason(list(zip(queries, documents)))
    path = str(tmp_path / "ckpt")
    model.save_pretrained(path)
    loaded = UGDModel.from_pretrained(path)
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.predict(list(zip(queries, documents))), probs, atol=1e-6, rtol=1e-6)
    return path


def test_serving_and_round_trip(tmp_path):
    model, tok = make_model(pooling="mean", temperature=0.1)
    check_serving(model, tok, tmp_path, RECORDS)


def test_predict_cli_refuses_what_ullme_cannot_do(tmp_path):
    import json
    import subprocess
    import sys

    model, tok = make_model()
    path = str(tmp_path / "ckpt")
    model.save_pretrained(path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"query": r["query"], "document": r["document"]}) for r in RECORDS))
    for mode in ("single-tower",):  # (reason: the same check, refused through the API in check_serving)
        r = subprocess.run([sys.executable, "-m", "ugd.predict", "--model", path, "--input", str(data), "--mode", mode],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.startswith("ugd.predict")]
        assert len(lines) == 1 and "bi-encoder" in lines[0] and "two-tower" in lines[0]
    r = subprocess.run([sys.executable, "-m", "ugd.predict", "--model", path, "--input", str(data)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert len(rows) == len(RECORDS) and len(rows[0]["probs"]) == 2


def test_train_cli_trains_and_evaluates_ullme(tmp_path, capsys):
    """python -m ugd.train --paradigm ullme on the demo data (tiny sizes): every term logged, the two-tower
    evaluation printed, a loadable checkpoint; options from --paradigm_options."""
    import json

    from tests.test_train import run_args

    from ugd.model import UGDModel
    from ugd.train import main

    summary = main(run_args(tmp_path, "ullme", "--paradigm", "ullme", "--max_steps", "4", "--eval_strategy", "steps",
                            "--eval_steps", "4", "--paradigm_options", json.dumps({"candidates": 3})))
    printed = capsys.readouterr().out
    assert "paradigm ullme" in printed and "two-tower" in printed and "single-tower" not in printed
    assert {"eval_acc_t", "eval_auc_t", "eval_loss_cl", "eval_loss_kl_gen", "eval_loss_dpo"} <= set(summary["eval"])
    model = UGDModel.from_pretrained(str(tmp_path / "ullme"))
    assert model.config.paradigm == "ullme" and model.config.option("candidates") == 3


def test_dpo_term_trains_the_generator():
    model, tok = make_model(lambda_cl=0.0, lambda_kl=0.0, readout_weight=0.0)
    model.train()
    out = model(make_batch(model, tok))
    assert set(out.terms) == {"dpo"}
    out.loss.backward()
    assert model.backbone.get_output_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [{}, {"lambda_dpo": 0.0}, {"readout_weight": 0.0, "lambda_dpo": 0.0}])
def test_unused_parameters_are_exactly_those_without_gradient(options):
    """What DDP is told (find_unused_parameters) matches what a training step leaves without gradient."""
    model, tok = make_model(**options)
    model.train()
    model(make_batch(model, tok)).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    assert set(model.paradigm.unused_parameters(model)) == no_grad
