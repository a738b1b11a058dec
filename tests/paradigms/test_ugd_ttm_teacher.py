"""ugd-ttm's choice of teacher (docs/paradigms.md, "Levers on the teacher"): ``teacher_mask stm`` (the own
single tower reads Q and D under the STM mask, a second pass) and ``teacher PATH`` (the KL targets of a
frozen checkpoint). Each output is checked against the same weights run by hand on a batch packed with the
mask the option names, and the KL terms against float64 from the definition. Bad values of both options:
test_ugd_ttm_levers.py, with the other levers' (one table)."""

from __future__ import annotations

import pytest
import torch

from tests.test_model import LAYOUT, RECORDS, collate, make_model
from ugd.data.collator import UGDCollator
from ugd.model import UGDModel
from ugd.modules.packed import gather_rows

PAIRS = [(r["query"], r["document"]) for r in RECORDS]


def kl64(student, teacher):
    """Batch-mean KL(softmax(student) || softmax(teacher)) in float64, from the definition."""
    p = torch.softmax(student.double(), -1)
    q = torch.softmax(teacher.double(), -1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def single_tower_by_hand(model, batch):
    """Logits_s = FC(V_s) of ``model``'s weights on ``batch`` as packed (its own mask)."""
    hidden = model.encode(batch)
    return model.heads.classifier(gather_rows(hidden, batch["cls_index"][:, 2], "single-tower"))


# ---------------------------------------------------------------------------------------------
# teacher_mask
# ---------------------------------------------------------------------------------------------


def test_defaults_are_the_paper_path_exactly():
    model, tok = make_model(seed=3)
    explicit, _ = make_model(seed=3, options={"teacher_mask": "ttm", "teacher": None})
    model.train(), explicit.train()
    batch = collate(tok, "ugd-ttm")
    a, b = model(batch), explicit(batch)
    assert set(a.terms) == set(b.terms)
    for t in a.terms:
        assert torch.equal(a.terms[t], b.terms[t]), t
    assert torch.equal(a.loss, b.loss)
    assert model.paradigm.single_tower_mask_of(model.config) == "ttm"


def test_stm_teacher_reads_q_and_d_under_the_stm_mask_and_leaves_the_two_tower_alone():
    paper, tok = make_model(seed=4)
    model, _ = make_model(seed=4, options={"teacher_mask": "stm"})  # the same weights
    paper.train(), model.train()
    batch = collate(tok, "ugd-ttm")
    a, b = paper(batch), model(batch)
    # the two tower and the reason generator: the TTM pass, unchanged
    torch.testing.assert_close(b.logits_t, a.logits_t, rtol=0, atol=0)
    torch.testing.assert_close(b.terms["gen"], a.terms["gen"], rtol=0, atol=0)
    # the single tower: the same tokens packed with the STM mask (what ugd-stm trains on)
    want = single_tower_by_hand(model, collate(tok, "ugd-stm"))
    torch.testing.assert_close(b.logits_s, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b.logits_s, a.logits_s)
    torch.testing.assert_close(b.terms["kl"].double(), kl64(b.logits_t.detach(), want.detach()), rtol=1e-5, atol=1e-7)
    b.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items() if n.startswith("heads.classifier"))


def test_stm_teacher_is_saved_and_serves_the_single_tower_under_the_stm_mask(tmp_path):
    model, tok = make_model(seed=6, options={"teacher_mask": "stm"})
    model.eval()
    with torch.no_grad():
        want = single_tower_by_hand(model, UGDCollator(tok, paradigm="stm", layout=LAYOUT)(RECORDS))
        packed = model(collate(tok, "ugd-ttm"), compute=("single_tower",)).logits_s
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-6)  # a G span changes nothing for P's rows
    model.save_pretrained(str(tmp_path / "m"))
    loaded = UGDModel.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.config.options == {"teacher_mask": "stm"}
    assert loaded.paradigm.single_tower_mask_of(loaded.config) == "stm"
    torch.testing.assert_close(loaded.predict(PAIRS, mode="single_tower"), torch.softmax(want.float(), -1),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# a frozen teacher checkpoint
# ---------------------------------------------------------------------------------------------


def save_teacher(tmp_path, paradigm="stm", seed=11):
    teacher, tok = make_model(seed=seed, paradigm=paradigm)
    path = str(tmp_path / f"teacher-{paradigm}")
    teacher.save_pretrained(path)
    return path, tok


@pytest.mark.parametrize("options", [{}, {"kl_gate": "margin"}, {"kl_switch": "teacher_ahead", "kl_switch_window": 1}])
def test_frozen_teacher_gives_the_kl_targets(tmp_path, options):
    path, tok = save_teacher(tmp_path)
    paper, _ = make_model(seed=2)
    model, _ = make_model(seed=2, options={"teacher": path, **options})
    paper.train(), model.train()
    batch = collate(tok, "ugd-ttm")
    a, out = paper(batch), model(batch)
    teacher = UGDModel.from_pretrained(path).eval()
    with torch.no_grad():
        z = single_tower_by_hand(teacher, collate(tok, "ugd-stm"))  # the teacher's own (STM) mask
        v = gather_rows(teacher.encode(collate(tok, "ugd-stm")), batch["cls_index"][:, 2], "v_s")
    torch.testing.assert_close(teacher.predict(PAIRS, mode="single_tower"), torch.softmax(z, -1), rtol=1e-4, atol=1e-5)
    # the student's own heads are those of the paper model: only the KL targets changed
    torch.testing.assert_close(out.logits_t, a.logits_t, rtol=0, atol=0)
    torch.testing.assert_close(out.logits_s, a.logits_s, rtol=0, atol=0)
    torch.testing.assert_close(out.terms["cls_s"], a.terms["cls_s"], rtol=0, atol=0)
    labels = batch["labels"]
    if not options:
        torch.testing.assert_close(out.terms["kl"].double(), kl64(out.logits_t.detach(), z), rtol=1e-5, atol=1e-7)
        f_t = model.heads.two_tower_features(out.v_q, out.v_d)
        want_emb = kl64(model.heads.fc_t_kl(f_t).detach(), model.heads.fc_s_kl(v).detach())
        torch.testing.assert_close(out.terms["kl_emb"].double(), want_emb, rtol=1e-5, atol=1e-7)
    acc_teacher = float((z.argmax(-1) == labels).float().mean())
    assert float(out.stats["acc_teacher"]) == pytest.approx(acc_teacher)
    if "kl_switch" in options:  # the switch's running accuracy is the frozen teacher's, not the own single tower's
        assert float(model.heads.kl_running_acc[1]) == pytest.approx(acc_teacher, abs=1e-6)
    out.loss.backward()
    frozen = model.__dict__["_frozen_teacher"]
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert not any("frozen" in n for n, _ in model.named_parameters())


def test_a_student_of_a_frozen_teacher_saves_without_it_and_serves_its_own_towers(tmp_path):
    path, tok = save_teacher(tmp_path)
    model, _ = make_model(seed=2, options={"teacher": path})
    model.train()
    model(collate(tok, "ugd-ttm")).loss.backward()  # the teacher is loaded now
    model.eval()
    model.save_pretrained(str(tmp_path / "student"))
    loaded = UGDModel.from_pretrained(str(tmp_path / "student")).eval()
    assert "_frozen_teacher" not in loaded.__dict__  # inference never loads the teacher
    for mode in ("two_tower", "single_tower"):
        torch.testing.assert_close(loaded.predict(PAIRS, mode=mode), model.predict(PAIRS, mode=mode))
    assert "_frozen_teacher" not in loaded.__dict__


def test_a_teacher_without_a_single_tower_is_refused(tmp_path):
    path, tok = save_teacher(tmp_path, paradigm="shared-ttm")
    model, _ = make_model(seed=2, options={"teacher": path})
    model.train()
    with pytest.raises(ValueError, match="has no single-tower head"):
        model(collate(tok, "ugd-ttm"))


def test_a_missing_teacher_says_which_option(tmp_path):
    model, tok = make_model(seed=2, options={"teacher": str(tmp_path / "no-such-teacher")})
    model.train()
    with pytest.raises(FileNotFoundError, match="ugd-ttm option teacher: .*no-such-teacher.*trained UGD checkpoint"):
        model(collate(tok, "ugd-ttm"))
