"""The paradigm registry (ugd.paradigms): the built-in paradigms, a third-party one plugged in, the
places that ask the registry, old checkpoints, and the absence of import cycles in ugd/."""

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import ugd.modules.attention  # noqa: F401  registers attn_implementation="ugd"
from ugd import paradigms
from ugd.checkpoint import CONFIG_NAME
from ugd.data.collator import UGDCollator
from ugd.data.layout import PARTS, LayoutConfig
from ugd.data.packing import MASKS
from ugd.model import UGDConfig, UGDModel
from ugd.paradigms.base import CAPABILITIES, MODE_NEEDS
from ugd.paradigms.ugd_paradigms import UGDParadigm
from ugd.testing import make_test_tokenizer

UGD_FIVE = {"ugd-ttm", "ugd-stm", "shared-ttm", "ttm", "stm"}
RECORDS = [
    {"query": "red running shoes", "document": "light running shoes in red", "label": 1, "reason": "red shoes"},
    {"query": "cheap flights", "document": "a recipe for lemon cake", "label": 0, "reason": "cake not flights"},
]
LAYOUT = LayoutConfig(max_query_len=16, max_document_len=16, max_reason_len=8)


def make_model(paradigm="ugd-ttm", seed=0, **overrides):
    torch.manual_seed(seed)
    tok = make_test_tokenizer([r["query"] + " " + r["document"] + " " + r["reason"] for r in RECORDS])
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok) + 3, max_position_embeddings=128)
    backbone = AutoModelForCausalLM.from_config(cfg, attn_implementation="ugd")
    config = UGDConfig(paradigm=paradigm, num_labels=2, kl_dim=8, layout=LAYOUT.to_dict(), **overrides)
    return UGDModel.from_backbone(backbone, tok, config), tok


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


def test_builtin_paradigms_are_registered_with_their_old_names():
    assert UGD_FIVE <= set(paradigms.names())
    assert set(paradigms.names(family="ugd")) == UGD_FIVE
    # layouts and terms of docs/spec.md section 6
    assert (paradigms.get("ugd-ttm").parts, paradigms.get("ugd-ttm").mask) == ("qdpg", "ttm")
    assert (paradigms.get("ttm").parts, paradigms.get("ttm").mask) == ("q|d", None)
    assert paradigms.get("ugd-ttm").terms == ("cls_t", "cls_s", "gen", "kl", "kl_emb")
    assert paradigms.get("stm").terms == ("cls_s",)
    assert paradigms.get("ugd-stm").prefill_mask == "stm"


@pytest.mark.parametrize("name", paradigms.names())
def test_every_registered_paradigm_is_well_formed(name):
    p = paradigms.get(name)
    assert p.name == name and p.family and p.description
    assert set(p.capabilities) <= set(CAPABILITIES)
    assert all(t in p.term_weights for t in p.terms)
    assert p.parts in PARTS + ("q|d",) and p.mask in MASKS + (None,)
    if "generate" in p.capabilities:
        assert p.prefill_mask is not None
    if "single_tower" in p.capabilities:
        assert p.single_tower_mask is not None
    cfg = UGDConfig(paradigm=name)  # the defaults are a valid config
    assert set(cfg.active_terms) <= set(p.terms)
    assert p.modes(cfg), f"{name} serves no inference mode"


def test_unknown_paradigm_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown paradigm 'nope'.*ugd-ttm"):
        paradigms.get("nope")
    with pytest.raises(ValueError, match="paradigm must be one of"):
        UGDConfig(paradigm="nope")
    with pytest.raises(ValueError, match="unknown paradigm"):
        UGDCollator(make_test_tokenizer(), paradigm="nope")


def test_register_refuses_duplicates_and_bad_entries():
    with pytest.raises(ValueError, match="already registered"):
        paradigms.register(UGDParadigm("ugd-ttm", "qd", "ttm", ("cls_t",), two_tower=True, single_tower=False,
                                       generative=False, description="x"))
    with pytest.raises(TypeError):
        paradigms.register("ugd-ttm")

    class Bad(UGDParadigm):
        capabilities = frozenset({"teleport"})

    bad = UGDParadigm("bad-one", "qd", "ttm", ("cls_t",), two_tower=True, single_tower=False, generative=False,
                      description="x")
    bad.capabilities = frozenset({"teleport"})
    with pytest.raises(ValueError, match="unknown capabilities"):
        paradigms.register(bad)
    assert "bad-one" not in paradigms.names()


def test_options_are_checked_by_the_paradigm():
    with pytest.raises(ValueError, match="has no option"):
        UGDConfig(paradigm="ugd-ttm", options={"temperature": 1.0})
    assert UGDConfig.from_dict({"paradigm": "stm"}).options == {}


def test_check_mode_names_what_the_paradigm_serves():
    stm = paradigms.get("stm")
    cfg = UGDConfig(paradigm="stm")
    assert stm.modes(cfg) == ["single_tower"]
    with pytest.raises(ValueError, match="serves: single-tower"):
        stm.check_mode(cfg, "two_tower")
    assert set(MODE_NEEDS) == {"two_tower", "documents", "single_tower", "reason"}
    assert paradigms.get("ugd-ttm").modes(UGDConfig()) == ["two_tower", "documents", "single_tower", "reason"]


# ---------------------------------------------------------------------------------------------
# a third-party paradigm: one module, one registry entry
# ---------------------------------------------------------------------------------------------


class HalfWeights(UGDParadigm):
    """A made-up paradigm for the test: the stm layout, CE on the single tower with an option weight."""

    options = {"ce_weight": 0.5}
    term_weights = {"cls_s": "ce_weight"}


@pytest.fixture
def plugged():
    p = paradigms.register(HalfWeights("test-half-stm", "qdp", "stm", ("cls_s",), two_tower=False, single_tower=True,
                                       generative=False, description="test paradigm"))
    yield p
    paradigms.unregister(p.name)


def test_a_new_paradigm_plugs_into_config_collator_model_and_inference(plugged, tmp_path):
    assert "test-half-stm" in paradigms.names() and (plugged.parts, plugged.mask) == ("qdp", "stm")
    model, tok = make_model("test-half-stm", options={"ce_weight": 0.25})
    assert model.paradigm is plugged and model.config.weight("cls_s") == 0.25
    collator = UGDCollator(tok, paradigm="test-half-stm", layout=LAYOUT, model_config=model.config)
    assert collator.model_config is model.config and collator.paradigm is plugged
    assert UGDCollator(tok, paradigm=plugged, layout=LAYOUT).paradigm is plugged  # the object itself
    batch = collator(RECORDS)
    model.train()
    out = model(batch)
    assert set(out.terms) == {"cls_s"}
    torch.testing.assert_close(out.loss, 0.25 * out.terms["cls_s"])
    model.eval()
    probs = model.predict([(r["query"], r["document"]) for r in RECORDS], mode="single_tower")
    assert probs.shape == (2, 2)
    with pytest.raises(ValueError, match="has no two-tower head"):
        model.predict([("a", "b")])
    model.save_pretrained(str(tmp_path))
    loaded = UGDModel.from_pretrained(str(tmp_path))
    assert loaded.config.options == {"ce_weight": 0.25}
    torch.testing.assert_close(loaded.predict([(r["query"], r["document"]) for r in RECORDS], mode="single_tower"),
                               probs)


def test_train_and_predict_ask_the_registry(plugged):
    from ugd import predict
    from ugd.training import args

    parser = args._make_parser()
    action = next(a for a in parser._actions if a.dest == "paradigm")
    assert "test-half-stm" in action.choices and "ugd-ttm" in action.choices
    predict.check_servable(UGDConfig(paradigm="test-half-stm"), "single_tower")
    with pytest.raises(ValueError, match="has no head for --mode two-tower; use --mode single-tower"):
        predict.check_servable(UGDConfig(paradigm="test-half-stm"), "two_tower")
    assert args.paradigm_options('{"ce_weight": 2}') == {"ce_weight": 2}
    with pytest.raises(args.ConfigError, match="JSON object"):
        args.paradigm_options("[1]")


# ---------------------------------------------------------------------------------------------
# old checkpoints, unchanged behaviour
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_written_before_the_registry_still_loads(tmp_path):
    model, tok = make_model("ugd-ttm", seed=3)
    model.eval()
    batch = UGDCollator(tok, paradigm="ugd-ttm", layout=LAYOUT)(RECORDS)
    with torch.no_grad():
        before = model(batch, compute=("two_tower", "single_tower"))
    model.save_pretrained(str(tmp_path))
    cfg_file = os.path.join(tmp_path, CONFIG_NAME)
    with open(cfg_file) as f:
        saved = json.load(f)
    assert saved.pop("options") == {}
    with open(cfg_file, "w") as f:  # exactly the fields an older ugd wrote
        json.dump(saved, f)
    loaded = UGDModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        after = loaded(batch, compute=("two_tower", "single_tower"))
    torch.testing.assert_close(before.logits_t, after.logits_t)
    torch.testing.assert_close(before.logits_s, after.logits_s)
    assert sorted(loaded.heads.state_dict()) == sorted(model.heads.state_dict())


# ---------------------------------------------------------------------------------------------
# no import cycles
# ---------------------------------------------------------------------------------------------


def _ugd_imports(path: Path, module: str, package_root: Path) -> set:
    """The ugd modules ``module`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ugd"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ugd":
                continue
            for a in node.names:  # "from . import paradigms" imports a module; "from .x import y" imports x
                sub = f"{target}.{a.name}"
                out.add(sub if _exists(sub, package_root) else target)
    return out


def _exists(module: str, root: Path) -> bool:
    rel = Path(*module.split("."))
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def test_no_import_cycles_in_ugd():
    root = Path(ugd.__file__).resolve().parent.parent
    graph = {}
    for path in (root / "ugd").rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        # the root package's __init__ only re-exports; every submodule import passes through it anyway
        graph[module] = {m for m in _ugd_imports(path, module, root) if m != "ugd" and m != module}
    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt in graph and not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node != "ugd" and not state.get(node):
            visit(node, [])
    assert "ugd.serving.inference" not in graph["ugd.model"] or "ugd.model" not in graph["ugd.serving.inference"]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_compare_script_writes_a_table(tmp_path):
    """benchmarks/compare_paradigms.py (the docs/paradigms.md table), one tiny row."""
    import importlib.util

    root = Path(ugd.__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("compare_paradigms", root / "benchmarks" / "compare_paradigms.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    tiny = ["--backbone_config", json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                             "num_attention_heads": 4, "num_key_value_heads": 2}),
            "--demo_train_size", "32", "--demo_eval_size", "16", "--per_device_train_batch_size", "8"]
    assert compare.main(["--steps", "1", "--out", str(tmp_path), "--only", "shared-ttm", "--", *tiny]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| shared-ttm |" in table and "1 steps per row" in table
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["steps"] == 1 and 0 <= row["acc_t"] <= 1 and row["acc_s"] is None


def test_train_defaults_is_a_base_attribute():
    """``ugd.train`` reads ``paradigm_impl.train_defaults`` of every paradigm: {} unless one sets it."""
    assert paradigms.Paradigm.train_defaults == {}
    for name in paradigms.names():
        assert isinstance(paradigms.get(name).train_defaults, dict), name
    assert paradigms.get("ugd-ttm").train_defaults == {}


@pytest.mark.parametrize("record, message", [
    (["q", "d"], "record 3: expected a mapping with 'query' and 'document', got list"),
    ({"document": "d"}, "record 3: missing 'query' (a record is {shape})"),
    ({"query": "q", "document": 7}, "record 3: 'document' must be a string, got int"),
    ({"query": "q", "document": "d", "label": "x"}, "record 3: 'label' must be an int, got 'x'"),
])
def test_record_errors_of_collator_and_embedding_paradigms(record, message):
    """The collator and the embedding paradigms check records with the same code (ugd.data.layout.record_texts,
    record_label): the same messages, each naming what its records hold."""
    from ugd.paradigms._embedding import pair_fields

    with pytest.raises(ValueError) as e:
        UGDCollator._fields(record, 3)
    assert str(e.value) == message.format(shape="{'query', 'document', 'label', 'reason'?}")
    with pytest.raises(ValueError) as e:
        pair_fields(record, 3)
    assert str(e.value) == message.format(shape="{'query', 'document', 'label'}")
    assert UGDCollator._fields({"query": "q", "document": "d", "label": "2"}, 0) == ("q", "d", None, 2)
    assert pair_fields({"query": "q", "document": "d"}, 0) == ("q", "d", -100)
