"""The d2llm paradigm (ugd/paradigms/d2llm.py): its losses on hand-computed cases and their gradient
flow (teacher sides detached), PMA and IEM, the student's precomputable vectors, serving and refusing,
save/load, a separately loaded teacher, and a short run of python -m ugd.train --paradigm d2llm."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config

import ugd.modules.attention  # noqa: F401  registers attn_implementation="ugd"
from ugd import DocumentVectors, paradigms
from ugd.data.collator import UGDCollator
from ugd.data.layout import LayoutConfig
from ugd.model import UGDConfig, UGDModel
from ugd.paradigms.d2llm import (
    IEM,
    PMA,
    contrastive_imitation,
    feature_imitation,
    imitation_kl,
    rank_imitation,
    relevance,
)
from ugd.testing import make_test_tokenizer

RECORDS = [
    {"query": "red running shoes", "document": "light running shoes in red", "label": 1},
    {"query": "cheap flights", "document": "a recipe for lemon cake with fresh lemons", "label": 0},
    {"query": "lemon cake", "document": "bake a lemon cake", "label": 1},
    {"query": "blue rain jacket", "document": "a blue jacket for rain and wind in the hills", "label": 1},
]
PAIRS = [(r["query"], r["document"]) for r in RECORDS]
LAYOUT = LayoutConfig(max_query_len=16, max_document_len=16, max_reason_len=8)


def make_model(seed=0, tok=None, **options):
    torch.manual_seed(seed)
    tok = tok or make_test_tokenizer([r["query"] + " " + r["document"] for r in RECORDS])
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok) + 3, max_position_embeddings=128)
    backbone = AutoModelForCausalLM.from_config(cfg, attn_implementation="ugd")
    config = UGDConfig(paradigm="d2llm", num_labels=2, layout=LAYOUT.to_dict(), options=options)
    return UGDModel.from_backbone(backbone, tok, config), tok


def batch_of(tok, records=RECORDS):
    return UGDCollator(tok, paradigm="d2llm", layout=LAYOUT)(records)


# ---------------------------------------------------------------------------------------------
# the losses, by hand
# ---------------------------------------------------------------------------------------------


def test_relevance_is_p_yes_for_two_classes_and_the_scaled_expected_grade_beyond():
    z = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    torch.testing.assert_close(relevance(z), torch.tensor([0.75]))
    z4 = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    torch.testing.assert_close(relevance(z4), torch.tensor([(0.2 * 1 + 0.3 * 2 + 0.4 * 3) / 3]))


def test_contrastive_imitation_by_hand():
    s = torch.tensor([[0.9, 0.2], [0.4, 0.5]])
    t = torch.tensor([0.5, 1.0])
    tau = 0.5
    # row 0: weighted own score 0.5 * 0.9 = 0.45 against 0.2; row 1: 1.0 * 0.5 = 0.5 against 0.4
    l0 = -math.log(math.exp(0.45 / tau) / (math.exp(0.45 / tau) + math.exp(0.2 / tau)))
    l1 = -math.log(math.exp(0.5 / tau) / (math.exp(0.5 / tau) + math.exp(0.4 / tau)))
    torch.testing.assert_close(contrastive_imitation(s, t, tau), torch.tensor((l0 + l1) / 2))


def test_rank_imitation_by_hand():
    s = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.5, 0.6], [0.0, 0.4, 0.2]])
    t = torch.tensor([0.8, 0.6, 0.1])
    tau = 0.25
    diag = [0.9, 0.5, 0.2]
    md, mt = sum(diag) / 3, float(t.mean())
    eps = 1e-2  # pearson()'s bound on the gradient of a nearly constant side
    cov = sum((a - md) * (b - mt) for a, b in zip(diag, t.tolist()))
    rho = cov / math.sqrt((sum((a - md) ** 2 for a in diag) + eps) * (sum((b - mt) ** 2 for b in t.tolist()) + eps))
    bpr = 0.0
    for i in range(3):
        for j in range(3):
            if i != j:
                bpr += float(t[i]) * -math.log(1 / (1 + math.exp(-(diag[i] - float(s[i, j])) / tau)))
    expected = (1 - rho) + 0.5 * bpr / 6
    got = rank_imitation(s, t, tau, bpr_weight=0.5)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert float(rank_imitation(s[:1, :1], t[:1], tau)) == 0.0  # one pair: nothing to rank


def test_feature_imitation_by_hand():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # orthogonal: cos matrix = I
    student = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # parallel: cos matrix = all ones
    torch.testing.assert_close(feature_imitation(student, teacher), torch.tensor(0.5))  # two off-diagonal 1s of 4
    torch.testing.assert_close(feature_imitation(teacher * 3, teacher), torch.tensor(0.0))


def test_imitation_kl_by_hand():
    zs = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    zt = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    p, q = zs.softmax(-1), zt.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(imitation_kl(zs, zt), expected)


@pytest.mark.parametrize("loss", ["ci", "ri", "fi", "kl"])
def test_teacher_sides_are_detached_and_the_student_learns(loss):
    torch.manual_seed(0)
    s = torch.rand(4, 4, requires_grad=True)
    t = torch.rand(4, requires_grad=True)
    fs, ft = torch.randn(4, 6, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    zs, zt = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    value, student, teacher = {
        "ci": lambda: (contrastive_imitation(s, t, 0.1), s, t),
        "ri": lambda: (rank_imitation(s, t, 0.1), s, t),
        "fi": lambda: (feature_imitation(fs, ft), fs, ft),
        "kl": lambda: (imitation_kl(zs, zt), zs, zt),
    }[loss]()
    g_student, g_teacher = torch.autograd.grad(value, (student, teacher), allow_unused=True)
    assert g_teacher is None
    assert g_student is not None and g_student.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# PMA and IEM
# ---------------------------------------------------------------------------------------------


def test_pma_ignores_padding():
    torch.manual_seed(0)
    pma = PMA(8, 2)
    x = torch.randn(1, 3, 8)
    padded = torch.cat([x, torch.randn(1, 4, 8) * 100], 1)
    mask = torch.tensor([[True] * 3 + [False] * 4])
    torch.testing.assert_close(pma(x, torch.ones(1, 3, dtype=torch.bool)), pma(padded, mask))
    with pytest.raises(ValueError, match="pma_heads=3 must divide"):
        PMA(8, 3)


@pytest.mark.parametrize("variant", ["asymmetric", "symmetric"])
def test_iem_parts_equal_the_whole_and_symmetric_is_order_free(variant):
    torch.manual_seed(0)
    iem = IEM(6, 5, 3, variant)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    logits, rep = iem(a, b)
    w = iem.first
    pre = F.linear(torch.cat([a, b], -1), w.weight, w.bias)  # the MLP written out
    direct = iem.out(F.relu(iem.branch(F.relu(pre))))
    if variant == "asymmetric":
        torch.testing.assert_close(logits, direct)
        assert not torch.allclose(logits, iem(b, a)[0])
    else:
        pre2 = F.linear(torch.cat([b, a], -1), w.weight, w.bias)
        torch.testing.assert_close(logits, (direct + iem.out(F.relu(iem.branch(F.relu(pre2))))) / 2)
        torch.testing.assert_close(logits, iem(b, a)[0])
    # all pairs from parts broadcast
    grid, _ = iem.from_parts(iem.part(a, "query")[:, None], iem.part(b, "document")[None, :])
    torch.testing.assert_close(grid[1, 2], iem(a[1:2], b[2:3])[0][0])


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


def test_registered_with_its_options_and_capabilities():
    p = paradigms.get("d2llm")
    assert (p.parts, p.mask) == ("qdp", "ttm") and p.terms == ("teacher", "ci", "ri", "fi", "kl")
    assert p.modes(UGDConfig(paradigm="d2llm")) == ["two_tower", "documents", "single_tower"]
    ext = UGDConfig(paradigm="d2llm", options={"teacher": "/some/teacher"})
    assert "single_tower" not in p.modes(ext) and "teacher" not in ext.active_terms
    for bad, message in (({"search": "sideways"}, "search must be one of"), ({"pma_heads": 0}, "pma_heads"),
                         ({"temperature": 0}, "temperature must be > 0"), ({"ci_weight": -1}, "must be a number >= 0"),
                         ({"nope": 1}, "has no option")):
        with pytest.raises(ValueError, match=message):
            UGDConfig(paradigm="d2llm", options=bad)


def test_forward_trains_every_term_and_the_teacher_only_through_its_own_ce():
    model, tok = make_model()
    model.train()
    out = model(batch_of(tok))
    assert set(out.terms) == {"teacher", "ci", "ri", "fi", "kl"}
    assert all(torch.isfinite(v) for v in out.terms.values())
    w = {"teacher": 1.0, "ci": 0.1, "ri": 0.1, "fi": 1.0, "kl": 1.0}  # the default weights
    torch.testing.assert_close(out.loss, sum(w[k] * v for k, v in out.terms.items()))
    # without the teacher's CE, nothing reaches the teacher's classifier (it is only read, detached)
    model, tok = make_model(teacher_weight=0.0)
    model.train()
    out = model(batch_of(tok))
    assert "teacher" not in out.terms
    out.loss.backward()
    assert model.heads.teacher_classifier.weight.grad is None
    assert model.heads.iem.first.weight.grad.abs().sum() > 0 and model.heads.pma.seed.grad.abs().sum() > 0


def test_unused_parameters_are_exactly_those_without_gradient():
    model, tok = make_model()
    model.train()
    model(batch_of(tok)).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == set(model.paradigm.unused_parameters(model))


def test_student_vectors_are_precomputable_and_serving_matches_training():
    model, tok = make_model(seed=1)
    model.eval()
    batch = batch_of(tok)
    with torch.no_grad():
        out = model(batch, compute=("two_tower", "single_tower"))
    v_q = model.encode_queries([q for q, _ in PAIRS])
    v_d = model.encode_documents([d for _, d in PAIRS])
    torch.testing.assert_close(v_q, out.v_q, atol=1e-5, rtol=1e-5)  # each text alone == inside Q D P
    torch.testing.assert_close(v_d, out.v_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.predict(PAIRS), out.logits_t.softmax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.predict(PAIRS, mode="single_tower"), out.logits_s.softmax(-1), atol=1e-5,
                               rtol=1e-5)
    store = DocumentVectors.build(model, [d for _, d in PAIRS])
    hits = model.rank(PAIRS[0][0], store, top_k=None)
    texts = model.rank(PAIRS[0][0], [d for _, d in PAIRS], top_k=None)
    assert [i for i, _ in hits] == [i for i, _ in texts]
    torch.testing.assert_close(torch.tensor([s for _, s in hits]), torch.tensor([s for _, s in texts]))


def test_refuses_what_it_cannot_serve():
    model, _ = make_model()
    with pytest.raises(ValueError, match="no generative task.*does not write reasons"):
        model.generate_reason(PAIRS[:1])
    from ugd import predict

    with pytest.raises(ValueError, match="has no head for --mode reason.*use --mode two-tower or single-tower or "
                                         "documents"):
        predict.check_servable(UGDConfig(paradigm="d2llm"), "reason")


@pytest.mark.parametrize("search", ["asymmetric", "symmetric"])
def test_save_and_load_round_trip(tmp_path, search):
    model, tok = make_model(seed=2, search=search, pma_heads=2, iem_hidden=12)
    model.eval()
    before = (model.predict(PAIRS), model.predict(PAIRS, mode="single_tower"))
    model.save_pretrained(str(tmp_path))
    loaded = UGDModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.options == {"search": search, "pma_heads": 2, "iem_hidden": 12}
    torch.testing.assert_close(loaded.predict(PAIRS), before[0])
    torch.testing.assert_close(loaded.predict(PAIRS, mode="single_tower"), before[1])


@pytest.mark.parametrize("teacher_paradigm", ["stm", "ugd-ttm"])  # its own mask (stm) or the student's (ttm)
def test_a_separately_loaded_teacher(tmp_path, teacher_paradigm):
    tok = make_test_tokenizer([r["query"] + " " + r["document"] for r in RECORDS])
    torch.manual_seed(5)
    cfg = Qwen2Config(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok) + 3, max_position_embeddings=128)
    teacher = UGDModel.from_backbone(AutoModelForCausalLM.from_config(cfg, attn_implementation="ugd"), tok,
                                     UGDConfig(paradigm=teacher_paradigm, num_labels=2, layout=LAYOUT.to_dict()))
    teacher.save_pretrained(str(tmp_path / "teacher"))
    model, _ = make_model(seed=3, tok=tok, teacher=str(tmp_path / "teacher"))
    assert model.heads.teacher_classifier is None
    model.train()
    batch = batch_of(tok)
    out = model(batch)
    assert set(out.terms) == {"ci", "ri", "fi", "kl"}
    # the teacher's logits are those of the teacher checkpoint on the same pairs
    teacher = UGDModel.from_pretrained(str(tmp_path / "teacher")).eval()
    probs = teacher.predict(PAIRS, mode="single_tower")
    torch.testing.assert_close(out.logits_s.softmax(-1), probs, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    frozen = model.__dict__["_frozen_teacher"]
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert not any(n.startswith("_frozen") for n, _ in model.named_parameters())  # not part of the model
    with pytest.raises(ValueError, match="separate checkpoint"):
        model.predict(PAIRS, mode="single_tower")
    model.save_pretrained(str(tmp_path / "student"))
    loaded = UGDModel.from_pretrained(str(tmp_path / "student"))  # loads without the teacher
    torch.testing.assert_close(loaded.eval().predict(PAIRS), model.eval().predict(PAIRS))


def test_train_cli_runs_d2llm_briefly(tmp_path, capsys):
    from ugd.train import main

    args = ["--backbone_config", json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                             "num_attention_heads": 4, "num_key_value_heads": 2}),
            "--cpu_threads", "1", "--demo_train_size", "64", "--demo_eval_size", "32",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32", "--max_query_len", "16",
            "--max_document_len", "40", "--disable_tqdm", "true", "--report_to", "none", "--num_reasons", "3",
            "--eval_strategy", "no", "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1",
            "--save_strategy", "no", "--max_steps", "2", "--paradigm", "d2llm",
            "--paradigm_options", '{"search": "symmetric", "pma_heads": 2}', "--output_dir", str(tmp_path / "d2")]
    summary = main(args)
    ev = summary["eval"]
    assert {"eval_acc_t", "eval_auc_t", "eval_acc_s", "eval_auc_s", "eval_loss_ci"} <= set(ev)
    assert summary["reasons"] == []  # d2llm writes no reasons, and the run does not try
    model = UGDModel.from_pretrained(str(tmp_path / "d2"))
    assert model.config.paradigm == "d2llm" and model.config.options == {"search": "symmetric", "pma_heads": 2}

    # python -m ugd.predict serves what d2llm can do and refuses the rest with one line, exit 2
    from ugd.predict import cli

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": i, "query": q, "document": d}) + "\n" for i, (q, d) in
                             enumerate(PAIRS[:2])))
    for mode in ("two-tower", "single-tower"):
        out = tmp_path / f"{mode}.jsonl"
        assert cli(["--model", str(tmp_path / "d2"), "--input", str(pairs), "--output", str(out), "--mode", mode,
                    "--no_progress"]) == 0
        got = [json.loads(line) for line in out.read_text().splitlines()]
        want = model.predict(PAIRS[:2], mode=mode.replace("-", "_"))
        torch.testing.assert_close(torch.tensor([g["probs"] for g in got]), want, atol=1e-5, rtol=1e-5)
    store = tmp_path / "docs.safetensors"
    assert cli(["--model", str(tmp_path / "d2"), "--input", str(pairs), "--mode", "documents", "--doc_vectors",
                str(store), "--no_progress"]) == 0
    assert cli(["--model", str(tmp_path / "d2"), "--input", str(pairs), "--output", str(tmp_path / "s.jsonl"),
                "--doc_vectors", str(store), "--no_progress"]) == 0
    capsys.readouterr()
    assert cli(["--model", str(tmp_path / "d2"), "--input", str(pairs), "--mode", "reason"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no head for --mode reason" in err and "does not write reasons" in err


def test_a_few_steps_lower_the_teacher_ci_and_kl_terms():
    model, tok = make_model(seed=4)
    model.train()
    batch = batch_of(tok)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = model(batch)
        if first is None:
            first = {k: float(v.detach()) for k, v in out.terms.items()}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in model(batch).terms.items()}
    for term in ("teacher", "ci", "kl"):
        assert last[term] < first[term], f"{term}: {first[term]:.4f} -> {last[term]:.4f}"
