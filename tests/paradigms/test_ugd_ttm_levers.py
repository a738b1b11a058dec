"""ugd-ttm's distillation levers (docs/paradigms.md, "Levers on the teacher"): the per-sample KL gate,
the KL warm-up, the teacher-ahead switch, and the interaction positions that give the single tower under the TTM mask more room.
Each is checked against an independent computation (float64, written here), and the paper's settings
must stay bit-identical to the ungated path."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.test_model import LAYOUT, RECORDS, collate, make_model
from tests.test_train import run_args
from ugd.data.collator import UGDCollator
from ugd.data.layout import LayoutConfig, add_special_tokens, encode_sample
from ugd.model import UGDConfig, UGDModel
from ugd.modules.losses import distillation_loss
from ugd.paradigms.ugd_paradigms import kl_gate, kl_ramp, kl_switch_factor, running_acc, running_acc_update
from ugd.train import main


def kl_rows64(student, teacher, temperature=1.0):
    """KL(softmax(student/T) || softmax(teacher/T)) per row, in float64, from the definition."""
    p = torch.softmax(student.double() / temperature, -1)
    q = torch.softmax(teacher.double() / temperature, -1)
    return (p * (p.log() - q.log())).sum(-1)


# ---------------------------------------------------------------------------------------------
# the gate and the gated loss
# ---------------------------------------------------------------------------------------------


def test_gates_pick_the_samples_their_definitions_name():
    torch.manual_seed(0)
    logits_t, logits_s = torch.randn(17, 3), torch.randn(17, 3)
    labels = torch.randint(0, 3, (17,))
    labels[[2, 11]] = -100
    assert kl_gate("none", logits_t, logits_s, labels) is None
    correct = kl_gate("correct", logits_t, logits_s, labels)
    margin = kl_gate("margin", logits_t, logits_s, labels)
    for i in range(17):
        y = int(labels[i])
        if y == -100:
            assert correct[i] == 0 and margin[i] == 0
            continue
        assert correct[i] == float(int(logits_s[i].argmax()) == y)
        p_s = torch.softmax(logits_s[i].double(), -1)[y]
        p_t = torch.softmax(logits_t[i].double(), -1)[y]
        assert margin[i] == float(bool(p_s > p_t))
    assert 0 < margin.sum() < 15  # a random draw has both kinds
    with pytest.raises(ValueError, match="unknown kl_gate"):
        kl_gate("sometimes", logits_t, logits_s, labels)


@pytest.mark.parametrize("n", [1, 17, 127])
def test_gated_kl_is_the_gated_rows_over_the_whole_batch(n):
    torch.manual_seed(n)
    student = torch.randn(n, 4, requires_grad=True)
    teacher = torch.randn(n, 4)
    gate = (torch.rand(n) < 0.5).float()
    got = distillation_loss(student, teacher, temperature=2.0, detach=True, gate=gate)
    want = (kl_rows64(student.detach(), teacher, 2.0) * gate.double()).sum() / n
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    got.backward()
    # a sample outside the gate gets no gradient at all
    assert torch.all(student.grad[gate == 0] == 0)
    # an all-open gate is the paper's batch mean
    ones = distillation_loss(student, teacher, temperature=2.0, detach=True, gate=torch.ones(n))
    plain = distillation_loss(student, teacher, temperature=2.0, detach=True)
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=1e-7)


def test_ramp():
    assert kl_ramp(0, None) == 1.0 and kl_ramp(0, 7) == 1.0
    assert [kl_ramp(4, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="training_step"):
        kl_ramp(4, None)


# ---------------------------------------------------------------------------------------------
# the levers inside the model
# ---------------------------------------------------------------------------------------------


def test_paper_settings_are_the_ungated_path_exactly():
    """kl_gate none and no warm-up (the defaults) give bit-identical terms and loss to explicit options."""
    model, tok = make_model(seed=3)
    explicit, _ = make_model(seed=3, options={"kl_gate": "none", "kl_warmup_steps": 0})
    model.train(), explicit.train()
    batch = collate(tok, "ugd-ttm")
    a, b = model(batch), explicit(batch)
    for t in a.terms:
        assert torch.equal(a.terms[t], b.terms[t]), t
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("gate", ["correct", "margin"])
def test_model_kl_terms_follow_the_gate(gate):
    model, tok = make_model(seed=5, options={"kl_gate": gate}, kl_temperature=1.5)
    model.train()
    batch = collate(tok, "ugd-ttm")
    out = model(batch)
    labels = batch["labels"]
    g = kl_gate(gate, out.logits_t.detach(), out.logits_s.detach(), labels)
    want = (kl_rows64(out.logits_t.detach(), out.logits_s.detach(), 1.5) * g.double()).sum() / len(labels)
    torch.testing.assert_close(out.terms["kl"].double(), want, rtol=1e-5, atol=1e-7)
    assert float(out.stats["kl_gate"]) == pytest.approx(float(g.mean()))
    acc_t = float((out.logits_t.argmax(-1) == labels).float().mean())
    assert float(out.stats["acc_t"]) == pytest.approx(acc_t)


def test_warmup_scales_only_the_kl_weights():
    model, tok = make_model(seed=2, options={"kl_warmup_steps": 4})
    batch = collate(tok, "ugd-ttm")
    model.eval()
    with torch.no_grad():  # an evaluation before any training step: the full weights, no error
        t = model(batch).terms
        torch.testing.assert_close(model(batch).loss, t["cls_t"] + t["cls_s"] + t["gen"] + 10 * (t["kl"] + t["kl_emb"]),
                                   rtol=1e-6, atol=1e-6)
    model.train()
    with pytest.raises(ValueError, match="training_step"):
        model(batch)
    model.training_step = 0
    out = model(batch)
    t = out.terms
    want = t["cls_t"] + t["cls_s"] + t["gen"] + 0.25 * 10 * (t["kl"] + t["kl_emb"])
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    model.training_step = 9
    out = model(batch)
    t = out.terms
    torch.testing.assert_close(out.loss, t["cls_t"] + t["cls_s"] + t["gen"] + 10 * (t["kl"] + t["kl_emb"]),
                               rtol=1e-6, atol=1e-6)


def test_gate_without_logit_kl_still_gates_the_embedding_kl():
    """lam = 0 and beta = 0: no term needs the single-tower logits, yet the gate does."""
    model, tok = make_model(seed=4, lam=0, beta=0, options={"kl_gate": "margin"})
    model.train()
    out = model(collate(tok, "ugd-ttm"))
    assert "kl_emb" in out.terms and "kl" not in out.terms and "kl_gate" in out.stats
    out.loss.backward()


@pytest.mark.parametrize("options,match", [
    ({"kl_gate": "always"}, "kl_gate must be one of"),
    ({"kl_warmup_steps": -1}, "kl_warmup_steps must be an int"),
    ({"kl_warmup_steps": 2.5}, "kl_warmup_steps must be an int"),
    ({"kl_switch": "later"}, "kl_switch must be one of"),
    ({"kl_switch_window": 0}, "kl_switch_window must be an int"),
    ({"kl_switch_window": True}, "kl_switch_window must be an int"),
    ({"kl_switch_lead": -0.01}, "kl_switch_lead must be a number in"),
    ({"kl_switch_lead": 1}, "kl_switch_lead must be a number in"),
    ({"kl_switch_lead": "0.05"}, "kl_switch_lead must be a number in"),
    ({"kl_switch_lead": False}, "kl_switch_lead must be a number in"),
    ({"teacher_mask": "full"}, "teacher_mask must be one of ttm, stm"),
    ({"teacher_mask": None}, "teacher_mask must be one of"),
    ({"teacher": 3}, "option teacher must be null"),
    ({"teacher": ""}, "option teacher must be null"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        UGDConfig(paradigm="ugd-ttm", options=options)


@pytest.mark.parametrize("paradigm,options", [("ugd-stm", {"kl_gate": "margin"}),
                                              ("shared-ttm", {"teacher_mask": "stm"})])
def test_options_belong_to_ugd_ttm_only(paradigm, options):
    with pytest.raises(ValueError, match="has no option"):
        UGDConfig(paradigm=paradigm, options=options)


# ---------------------------------------------------------------------------------------------
# interaction positions
# ---------------------------------------------------------------------------------------------


def _tok():
    _, tok = make_model()
    return tok


@pytest.mark.parametrize("fill", ["gmask", "query"])
def test_interaction_positions_open_the_p_span(fill):
    tok = _tok()
    ids = add_special_tokens(tok)
    base = LayoutConfig(max_query_len=16, max_document_len=24, max_reason_len=16)
    more = LayoutConfig(max_query_len=16, max_document_len=24, max_reason_len=16, interaction_positions=2,
                        interaction_fill=fill)
    rec = RECORDS[0]
    a = encode_sample(tok, ids, rec["query"], rec["document"], rec["reason"], 1, config=base)
    b = encode_sample(tok, ids, rec["query"], rec["document"], rec["reason"], 1, config=more)
    lq, ld, lp, lg = a.spans
    assert b.spans == (lq, ld, lp + 2, lg)
    assert b.input_ids[:lq + ld] == a.input_ids[:lq + ld]  # Q and D untouched
    extra = b.input_ids[lq + ld:lq + ld + 2]
    assert extra == ([ids["gmask"]] * 2 if fill == "gmask" else a.input_ids[:2])
    assert b.input_ids[lq + ld + 2:] == a.input_ids[lq + ld:]
    assert b.lm_labels[-lg:] == a.lm_labels[-lg:]
    # more positions than query tokens: the whole query, no more
    many = LayoutConfig(max_query_len=16, max_document_len=24, interaction_positions=50, interaction_fill="query")
    c = encode_sample(tok, ids, rec["query"], rec["document"], None, 1, config=many)
    assert c.spans[2] == lp + lq - 1


def test_interaction_positions_leave_the_two_tower_unchanged_and_change_the_single_tower():
    model, tok = make_model(seed=7)
    model.eval()
    more = LayoutConfig(**{**LAYOUT.__dict__, "interaction_positions": 3, "interaction_fill": "query"})
    with torch.no_grad():
        a = model(collate(tok, "ugd-ttm"), compute=("two_tower", "single_tower"))
        b = model(UGDCollator(tok, paradigm="ugd-ttm", layout=more)(RECORDS), compute=("two_tower", "single_tower"))
    torch.testing.assert_close(a.logits_t, b.logits_t, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.logits_s, b.logits_s)


def test_interaction_layout_is_saved_and_served(tmp_path):
    layout = {**LAYOUT.__dict__, "interaction_positions": 2, "interaction_fill": "gmask"}
    model, tok = make_model(seed=8)
    model.config.layout = layout
    model.eval()
    with torch.no_grad():
        packed = model(UGDCollator(tok, paradigm="ugd-ttm", layout=LayoutConfig(**layout))(RECORDS),
                       compute=("single_tower",)).logits_s
    model.save_pretrained(str(tmp_path / "m"))
    loaded = UGDModel.from_pretrained(str(tmp_path / "m"))
    assert loaded.config.layout["interaction_positions"] == 2
    served = loaded.predict([(r["query"], r["document"]) for r in RECORDS], mode="single_tower")
    torch.testing.assert_close(served, torch.softmax(packed.float(), -1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"interaction_positions": -1}, "interaction_positions must be an int"),
    ({"interaction_positions": True}, "interaction_positions must be an int"),
    ({"interaction_fill": "document"}, "interaction_fill must be one of"),
])
def test_bad_interaction_layout(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayoutConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# through python -m ugd.train: options, flags, the schedule on the Trainer's step, the logged mechanism
# ---------------------------------------------------------------------------------------------


def test_train_cli_logs_teacher_and_student_and_ramps_the_kl(tmp_path):
    out = tmp_path / "run"
    main(run_args(tmp_path, "run", "--max_steps", "4", "--paradigm", "ugd-ttm", "--interaction_positions", "3",
                  "--interaction_fill", "query", "--paradigm_options",
                  json.dumps({"kl_gate": "margin", "kl_warmup_steps": 4})))
    with open(os.path.join(out, "ugd_config.json")) as f:
        cfg = json.load(f)
    assert cfg["options"] == {"kl_gate": "margin", "kl_warmup_steps": 4}
    assert cfg["layout"]["interaction_positions"] == 3 and cfg["layout"]["interaction_fill"] == "query"
    with open(os.path.join(out, "ugd_run_summary.json")) as f:
        logs = [e for e in json.load(f)["log_history"] if "loss" in e]
    assert [e["train_kl_ramp"] for e in logs] == [0.25, 0.5, 0.75, 1.0]
    for e in logs:
        assert 0 <= e["train_kl_gate"] <= 1 and 0 <= e["train_acc_t"] <= 1 and 0 <= e["train_acc_s"] <= 1


# ---------------------------------------------------------------------------------------------
# the teacher-ahead switch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 17])
def test_running_accuracies_are_bias_corrected_moving_averages(window):
    """Against the average written out in float64: sum_k d^(n-1-k) a_k (1 - d) / (1 - d^n), d = 1 - 1/window."""
    g = torch.Generator().manual_seed(window)
    acc = torch.rand(40, 2, generator=g, dtype=torch.float64)
    state = torch.zeros(3)
    d = 1 - 1 / window
    for n in range(1, 41):
        running_acc_update(state, acc[n - 1, 0].float(), acc[n - 1, 1].float(), window)
        got = running_acc(state, window)
        if n < window:
            assert got is None
            continue
        w = torch.tensor([d ** (n - 1 - k) for k in range(n)], dtype=torch.float64) * (1 - d) / (1 - d ** n)
        want = (w[:, None] * acc[:n]).sum(0)
        assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
    assert float(state[2]) == min(40, 10 * window)  # the count stops at 10 windows


def test_switch_factor():
    state = torch.zeros(3)
    assert kl_switch_factor("none", None, 5, True) == 1.0
    assert kl_switch_factor("teacher_ahead", state, 5, False) == 1.0  # evaluated before any training batch
    assert kl_switch_factor("teacher_ahead", state, 5, True) == 0.0  # no teacher is trusted before a window
    for _ in range(5):
        running_acc_update(state, torch.tensor(0.6), torch.tensor(0.5), 5)
    assert kl_switch_factor("teacher_ahead", state, 5, True) == 0.0  # the student is ahead
    assert kl_switch_factor("teacher_ahead", state, 5, False) == 0.0
    for _ in range(20):
        running_acc_update(state, torch.tensor(0.6), torch.tensor(0.9), 5)
    assert kl_switch_factor("teacher_ahead", state, 5, True) == 1.0
    # a lead: the teacher (0.9 - 0.6 = 0.3 ahead, bias-corrected) must lead by more than it
    assert kl_switch_factor("teacher_ahead", state, 5, True, lead=0.25) == 1.0
    assert kl_switch_factor("teacher_ahead", state, 5, True, lead=0.35) == 0.0
    with pytest.raises(ValueError, match="unknown kl_switch"):
        kl_switch_factor("soon", state, 5, True)
    with pytest.raises(ValueError, match="kl_running_acc"):
        kl_switch_factor("teacher_ahead", None, 5, True)


def test_model_distils_only_while_the_teacher_is_ahead():
    model, tok = make_model(seed=6, options={"kl_switch": "teacher_ahead", "kl_switch_window": 2})
    plain, _ = make_model(seed=6)
    assert "kl_running_acc" in model.heads.state_dict() and "kl_running_acc" not in plain.heads.state_dict()
    batch = collate(tok, "ugd-ttm")
    labels = batch["labels"]

    def no_kl(t):
        return t["cls_t"] + t["cls_s"] + t["gen"]

    model.eval()
    with torch.no_grad():  # before any training batch an evaluation reports the full objective; no update
        t = model(batch).terms
        torch.testing.assert_close(model(batch).loss, no_kl(t) + 10 * (t["kl"] + t["kl_emb"]), rtol=1e-6, atol=1e-6)
    assert float(model.heads.kl_running_acc[2]) == 0
    model.train()
    for step in range(2):  # the first window: no KL, and the batches counted
        out = model(batch)
        torch.testing.assert_close(out.loss, no_kl(out.terms), rtol=1e-6, atol=1e-6)
        assert float(out.stats["kl_switch"]) == 0.0 and float(model.heads.kl_running_acc[2]) == step + 1
    acc_t = float((out.logits_t.argmax(-1) == labels).float().mean())
    acc_s = float((out.logits_s.argmax(-1) == labels).float().mean())
    assert running_acc(model.heads.kl_running_acc, 2) == pytest.approx((acc_t, acc_s), abs=1e-6)
    # the teacher ahead (set by hand): the KL terms train with their full weights
    model.heads.kl_running_acc.copy_(torch.tensor([0.1, 0.9, 20.0]))
    out = model(batch)
    assert float(out.stats["kl_switch"]) == 1.0
    torch.testing.assert_close(out.loss, no_kl(out.terms) + 10 * (out.terms["kl"] + out.terms["kl_emb"]),
                               rtol=1e-6, atol=1e-6)
    # a lead of 0.5 is more than this teacher's (0.1 -> 0.55 is 0.45 ahead): no KL
    model.config.options["kl_switch_lead"] = 0.5
    model.heads.kl_running_acc.copy_(torch.tensor([0.1, 0.55, 20.0]))
    out = model(batch)
    assert float(out.stats["kl_switch"]) == 0.0
    model.config.options["kl_switch_lead"] = 0.0
    # the student ahead: no KL gradient reaches the two tower's KL projection
    model.heads.kl_running_acc.copy_(torch.tensor([0.9, 0.1, 20.0]))
    model.zero_grad()
    model(batch).loss.backward()
    assert model.heads.fc_t_kl.weight.grad is None or not model.heads.fc_t_kl.weight.grad.any()


def test_switch_state_is_saved_and_a_resumed_run_switches_alike(tmp_path):
    import shutil

    from tests.test_train import RESUME, train_losses
    from safetensors.torch import load_file

    options = ["--paradigm", "ugd-ttm", "--paradigm_options",
               json.dumps({"kl_switch": "teacher_ahead", "kl_switch_window": 2})]
    main(run_args(tmp_path, "reference", *RESUME, *options))
    ref_dir = tmp_path / "reference"
    ref = train_losses(ref_dir / "checkpoint-10")
    assert [ref[s]["train_kl_switch"] for s in (1, 2)] == [0.0, 0.0]  # the first window never distils
    assert all(ref[s]["train_kl_switch"] in (0.0, 1.0) for s in ref)
    heads = load_file(str(ref_dir / "ugd_heads.safetensors"))
    assert float(heads["kl_running_acc"][2]) == 10
    (tmp_path / "resumed").mkdir()
    shutil.copytree(ref_dir / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    main(run_args(tmp_path, "resumed", *RESUME, *options, "--resume_from_checkpoint", "true"))
    resumed = train_losses(tmp_path / "resumed" / "checkpoint-10")
    for step in range(6, 11):
        assert resumed[step]["train_kl_switch"] == ref[step]["train_kl_switch"], step
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-6), step
    torch.testing.assert_close(load_file(str(tmp_path / "resumed" / "ugd_heads.safetensors"))["kl_running_acc"],
                               heads["kl_running_acc"], atol=1e-6, rtol=0)


def test_switch_state_round_trips_through_save_and_load(tmp_path):
    model, _ = make_model(seed=7, options={"kl_switch": "teacher_ahead"})
    model.heads.kl_running_acc.copy_(torch.tensor([0.25, 0.5, 60.0]))
    model.save_pretrained(str(tmp_path / "m"))
    loaded = UGDModel.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(loaded.heads.kl_running_acc, model.heads.kl_running_acc)
    assert loaded.config.options == {"kl_switch": "teacher_ahead"}
