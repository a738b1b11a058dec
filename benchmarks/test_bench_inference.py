"""Plug-and-play inference (docs/spec.md section 7) against the same model served by stock transformers.

    pytest benchmarks/test_bench_inference.py --benchmark-only
    pytest benchmarks/test_bench_inference.py --benchmark-only --benchmark-json=inference.json

Four figures, each at the median of a few rounds, end to end from text (tokenization, batching,
host-to-device copies and the result's way back are inside the timed region, on both sides):

* documents encoded per second -- ``model.encode_documents(texts)`` (V_D of each document alone,
  packed without padding, ``attn_implementation="ugd"``);
* pairs scored per second, per mode -- ``model.predict(pairs, mode="two_tower")`` (each query and each
  document encoded alone, then FC_t and FC) and ``mode="single_tower"`` (Q D P per pair, V_s), and
  the two-tower heads alone on stored vectors (``model.score_pairs`` on aligned pairs,
  ``model.score_documents`` of a few queries against a ``DocumentVectors`` store, "rank", or against
  V_D as a plain tensor, "rank-tensor"): no backbone runs there, so a stock pipeline runs exactly
  the same code and has no peer;
* reason tokens per second -- ``ugd.serving.generate.generate_reason_ids`` (packed prefill under the
  partition mask, the cache re-batched left-padded, then ``backbone.generate``). Every pair decodes
  exactly ``new_tokens`` tokens on both sides (``min_new_tokens = max_new_tokens``: EOS is suppressed
  until the limit), greedy. The same test with ``max_new_tokens=1`` ("ttft") times the prefill plus
  the first token, so that decoding alone can be told apart.

Peer ("sdpa-padded"): a deep copy of the same model, its backbone switched to
``attn_implementation="sdpa"``, served the way a plain transformers pipeline serves the UGD layout: a
padded ``[B, L]`` batch with a dense additive ``[B, 1, L, L]`` mask of the partition (each span sees
what it sees in training; padding rows see only themselves so that no softmax row is empty).
Documents and single-tower pairs are right-padded and read at their last ``[CLS]``; reason prompts
are left-padded, prefilled with the dense mask in one forward, and ``generate`` continues from that
cache with a 2D padding mask -- the very decode call the UGD path makes. The peer gets the same
help as the UGD path: the same tokenization and truncation (``ugd.data.layout.encode_sample``), inputs
sorted by length, and the same token budget per batch (``batch_tokens``, padding counted). Before a
figure is taken, the peer must agree with the UGD path on the same inputs (vectors, probabilities,
prefill states; the greedy tokens too in fp32), else the test fails and no figure comes out. The
peer and these agreement checks live in ``inference_peers.py``, whose docstring says what each peer
function computes; this file holds the inputs, the benchmarks and the harness checks.

Shapes (as in test_bench_train.py):

* ``qwen2.5-1.5b`` (GPU only, skipped without CUDA): a random-init Qwen2 of Qwen2.5-1.5B's shape, bf16,
  workloads ``qlq`` and ``bq`` of docs/spec.md section 9 (query / document / reason around 31/230/146 and
  12/12/75 tokens): 256 documents, 256 pairs per mode, 32 reasons of the workload's mean reason length.
* ``cpu-small``: 2 layers, hidden 128, fp32, one thread, ``qlq`` with fewer items and 16-token
  reasons; a harness check and a rough CPU figure, not a GPU one.

Texts are random words over a word-level tokenizer built offline (one word = one token; the test
``test_workload_texts_have_the_workload_lengths`` checks it), so the span lengths are exactly
``ugd_ops.workloads.make_spans``'. Its vocabulary is far smaller than the model's, which does not
change the cost of a forward.

Recorded in ``extra_info``: impl, peer, shape, workload, items and tokens per call, ``*_per_s`` at the
median (``docs_per_s``, ``pairs_per_s``, ``tokens_per_s``), the attention backend of the ugd side
(``ugd_ops`` compiled kernel or its pure-PyTorch reference), dtype, and the environment of
conftest.py (GPU, torch, CUDA, date).
"""

from __future__ import annotations

import copy
import functools
import random

import pytest
import torch

import inference_peers as ip
from ugd_ops.workloads import WORKLOADS, make_spans

CUDA = torch.cuda.is_available()

SHAPES = {
    "qwen2.5-1.5b": dict(config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                     num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                     max_position_embeddings=4096, tie_word_embeddings=True),
                         device="cuda", dtype=torch.bfloat16, workloads=("qlq", "bq"), rounds=5, reason_rounds=3,
                         score_rounds=20, docs=256, pairs=256, reasons=32, reason_batch=32, new_tokens=None,
                         batch_tokens=16384, stored_pairs=65536, rank_queries=8, rank_documents=65536),
    "cpu-small": dict(config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048,
                                  tie_word_embeddings=True),
                      device="cpu", dtype=torch.float32, workloads=("qlq",), rounds=3, reason_rounds=3,
                      score_rounds=10, docs=48, pairs=24, reasons=8, reason_batch=8, new_tokens=16,
                      batch_tokens=4096, stored_pairs=8192, rank_queries=4, rank_documents=8192),
}
IMPLS = ("ugd", "sdpa-padded")
NUM_LABELS = 2
VOCAB_WORDS = 2000
CPU_THREADS = 1  # steady figures on a small shared machine

# medians of the reason "ttft" runs, for the decode-only rate of the matching "generate" run
_TTFT: dict[tuple, float] = {}


# ---------------------------------------------------------------------------------------------
# inputs: texts of the workload's lengths, a tokenizer, the model and its peer (inference_peers.py)
# ---------------------------------------------------------------------------------------------


def _words(n: int, rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(VOCAB_WORDS)}" for _ in range(n))


@functools.lru_cache(maxsize=4)
def workload_texts(workload: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` queries and ``n`` documents (all distinct) whose token counts, [CLS] included, are the
    Lq and Ld of ``make_spans(workload, batch=n, seed=seed)``."""
    spans = make_spans(workload, batch=n, seed=seed)
    rng = random.Random(seed)
    queries = [_words(int(lq) - 1, rng) for lq in spans[:, 0]]
    documents = [_words(int(ld) - 1, rng) for ld in spans[:, 1]]
    return queries, documents


@functools.lru_cache(maxsize=1)
def make_tokenizer():
    """A lowercased word-level tokenizer over ``w0 .. w{VOCAB_WORDS-1}`` and the prompt's words."""
    from ugd.data.demo import build_tokenizer

    return build_tokenizer([], extra_texts=[" ".join(f"w{i}" for i in range(VOCAB_WORDS))])


@functools.lru_cache(maxsize=1)
def build_models(shape_name: str):
    """(ugd model, sdpa-padded peer) of a shape: the same random weights, eval mode, on the shape's device."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    import ugd.modules.attention  # noqa: F401  registers attn_implementation="ugd"
    from ugd.data.layout import LayoutConfig
    from ugd.model import UGDConfig, UGDModel

    shape = SHAPES[shape_name]
    tok = copy.deepcopy(make_tokenizer())  # from_backbone adds the special tokens to it
    torch.manual_seed(0)
    cfg = Qwen2Config(**shape["config"], pad_token_id=0, bos_token_id=None, eos_token_id=2)
    with torch.device(shape["device"]):
        backbone = AutoModelForCausalLM.from_config(cfg, attn_implementation="ugd", dtype=shape["dtype"])
    ucfg = UGDConfig(paradigm="ugd-ttm", num_labels=NUM_LABELS, kl_dim=64, layout=LayoutConfig().to_dict())
    model = UGDModel.from_backbone(backbone, tok, ucfg).to(shape["device"], shape["dtype"]).eval()
    return model, ip.make_peer(model)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# the benchmarks
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _shape(shape_name: str) -> dict:
    shape = SHAPES[shape_name]
    if shape["device"] == "cuda" and not CUDA:
        pytest.skip(f"{shape_name}: needs a CUDA device")
    return shape


def _models(shape_name: str):
    try:
        return build_models(shape_name)
    except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
        pytest.skip(f"{shape_name}: out of GPU memory building the model and its peer")


def _common(bench_record, ugd_backend, model, impl, shape_name, workload, **fields):
    shape = SHAPES[shape_name]
    backend = (ugd_backend("partitioned_attention_fwd", shape["device"], shape=shape) if impl == "ugd"
               else "sdpa (dense mask)")
    return bench_record(shape["device"], impl=impl, peer=ip.PEER, shape=shape_name, workload=workload,
                        dtype=str(shape["dtype"]).removeprefix("torch."), attention_backend=backend,
                        batch_tokens=shape["batch_tokens"], parameters=sum(p.numel() for p in model.parameters()),
                        **fields)


def _run(benchmark, fn, rounds: int):
    try:
        return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
        benchmark.extra_info["oom"] = True
        pytest.skip("out of GPU memory")


def _rate(benchmark, name: str, count: float) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if not stats:
        return None
    median = float(stats.stats.median)
    benchmark.extra_info["median_s"] = median
    benchmark.extra_info[name] = count / median
    return median


def run_encode_documents(benchmark, bench_record, ugd_backend, impl, shape_name, workload):
    shape = _shape(shape_name)
    model, peer = _models(shape_name)
    _, documents = workload_texts(workload, shape["docs"])
    budget = shape["batch_tokens"]
    ip.check_vectors(model, peer, documents[:8], "document", budget)
    if impl == "ugd":
        def call():
            v = model.encode_documents(documents, batch_tokens=budget, show_progress=False, output_device=None)
            _sync(shape["device"])
            return v
    else:
        def call():
            v = ip.peer_encode(peer, documents, "document", budget)
            _sync(shape["device"])
            return v
    tokens = sum(len(d.split()) + 1 for d in documents)
    benchmark.group = f"encode-documents-{shape_name}-{workload}"
    _common(bench_record, ugd_backend, model, impl, shape_name, workload, documents=len(documents), tokens=tokens)
    out = _run(benchmark, call, shape["rounds"])
    assert out.shape == (len(documents), model.heads.classifier.in_features) and bool(torch.isfinite(out).all())
    if _rate(benchmark, "docs_per_s", len(documents)):
        benchmark.extra_info["tokens_per_s"] = tokens / benchmark.extra_info["median_s"]


def run_predict(benchmark, bench_record, ugd_backend, impl, mode, shape_name, workload):
    shape = _shape(shape_name)
    model, peer = _models(shape_name)
    queries, documents = workload_texts(workload, shape["pairs"])
    pairs = list(zip(queries, documents))  # all distinct: no query or document is encoded twice by either side
    budget = shape["batch_tokens"]
    ip.check_predict(model, peer, pairs[:8], mode, budget)
    if impl == "ugd":
        def call():
            return model.predict(pairs, mode=mode, batch_tokens=budget, show_progress=False)
    else:
        def call():
            return ip.peer_predict(peer, pairs, mode, budget)
    benchmark.group = f"predict-{mode}-{shape_name}-{workload}"
    _common(bench_record, ugd_backend, model, impl, shape_name, workload, mode=mode, pairs=len(pairs))
    probs = _run(benchmark, call, shape["rounds"])  # float32 on the CPU: the device is synchronized
    assert probs.shape == (len(pairs), NUM_LABELS) and bool(torch.isfinite(probs).all())
    _rate(benchmark, "pairs_per_s", len(pairs))


def run_scoring(benchmark, bench_record, ugd_backend, kind, shape_name):
    from ugd.serving.doc_vectors import DocumentVectors

    shape = _shape(shape_name)
    model, _ = _models(shape_name)
    w = model.heads.classifier.weight
    H = w.shape[1]
    gen = torch.Generator(device=w.device).manual_seed(0)
    if kind == "stored-pairs":
        n = shape["stored_pairs"]
        v_q = torch.randn((n, H), generator=gen, device=w.device, dtype=w.dtype)
        v_d = torch.randn((n, H), generator=gen, device=w.device, dtype=w.dtype)

        def call():
            return model.score_pairs(v_q, v_d)
        pairs, fields = n, dict(pairs=n)
    else:
        nq, m = shape["rank_queries"], shape["rank_documents"]
        v_q = torch.randn((nq, H), generator=gen, device=w.device, dtype=w.dtype)
        v_d = torch.randn((m, H), generator=gen, device=w.device, dtype=w.dtype)
        if kind == "rank":  # a DocumentVectors store: FC_t's document half is computed once and kept
            empty = DocumentVectors.empty(model)
            documents = DocumentVectors(v_d, [i.to_bytes(20, "big") for i in range(m)], fingerprint=empty.fingerprint,
                                        layout=empty.layout, paradigm=empty.paradigm)
            documents.projected(model)
        else:  # "rank-tensor": V_D as a plain tensor, projected again on every call
            documents = v_d

        def call():
            return model.score_documents(v_q, documents)
        pairs, fields = nq * m, dict(queries=nq, documents=m, pairs=nq * m)
    benchmark.group = f"score-stored-{shape_name}"
    bench_record(shape["device"], impl="ugd", peer="none: heads only, a stock pipeline runs the same code",
                 shape=shape_name, kind=kind, dtype=str(shape["dtype"]).removeprefix("torch."), **fields)
    out = _run(benchmark, call, shape["score_rounds"])  # float32 on the CPU: the device is synchronized
    assert bool(torch.isfinite(out).all())
    _rate(benchmark, "pairs_per_s", pairs)


def run_reason(benchmark, bench_record, ugd_backend, impl, phase, shape_name, workload):
    from ugd.serving.generate import generate_reason_ids

    shape = _shape(shape_name)
    model, peer = _models(shape_name)
    queries, documents = workload_texts(workload, shape["reasons"])
    pairs = list(zip(queries, documents))
    new_tokens = shape["new_tokens"] or WORKLOADS[workload].reason
    limit = 1 if phase == "ttft" else new_tokens
    batch = shape["reason_batch"]
    kwargs = dict(max_new_tokens=limit, batch_size=batch, min_new_tokens=limit)
    ip.check_prefill(model, peer, pairs[:4])
    if model.heads.classifier.weight.dtype == torch.float32:  # greedy tokens agree exactly only in fp32
        a = generate_reason_ids(model, model.tokenizer, pairs[:4], **dict(kwargs, max_new_tokens=4, min_new_tokens=4))
        b = ip.peer_generate_ids(peer, pairs[:4], **dict(kwargs, max_new_tokens=4, min_new_tokens=4))
        assert a == b, f"greedy tokens of the padded peer differ from the UGD path's: {b} vs {a}"
    if impl == "ugd":
        def call():
            return generate_reason_ids(model, model.tokenizer, pairs, show_progress=False, **kwargs)
    else:
        def call():
            return ip.peer_generate_ids(peer, pairs, **kwargs)
    prompt_tokens = sum(len(s) for s in ip.prompts(model, pairs))
    benchmark.group = f"reason-{phase}-{shape_name}-{workload}"
    _common(bench_record, ugd_backend, model, impl, shape_name, workload, phase=phase, pairs=len(pairs),
            batch_size=batch, new_tokens_per_pair=limit, prompt_tokens=prompt_tokens,
            decode="transformers generate, greedy, min_new_tokens = max_new_tokens")
    out = _run(benchmark, call, shape["reason_rounds"])
    generated = sum(len(r) for r in out)
    assert generated == len(pairs) * limit, f"expected {limit} tokens per pair, got {[len(r) for r in out]}"
    benchmark.extra_info["generated_tokens"] = generated
    median = _rate(benchmark, "tokens_per_s", generated)
    if median is None:
        return
    key = (impl, shape_name, workload)
    if phase == "ttft":
        _TTFT[key] = median
        benchmark.extra_info["prefill_tokens_per_s"] = prompt_tokens / median
        benchmark.extra_info["ttft_s_per_batch"] = median / -(-len(pairs) // batch)
    elif key in _TTFT and median > _TTFT[key]:
        # decode only: the tokens after the first, over the time after the ttft run's median
        benchmark.extra_info["decode_tokens_per_s"] = (generated - len(pairs)) / (median - _TTFT[key])


# ---------------------------------------------------------------------------------------------
# tests: cpu-small (CI) and qwen2.5-1.5b (GPU only)
# ---------------------------------------------------------------------------------------------

CPU_SHAPE = "cpu-small"
SCORING = ("stored-pairs", "rank", "rank-tensor")
GPU_SHAPE = "qwen2.5-1.5b"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (Qwen2.5-1.5B shape)")


@pytest.mark.parametrize("workload", SHAPES[CPU_SHAPE]["workloads"])
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_documents_cpu_small(benchmark, bench_record, ugd_backend, cpu_threads, impl, workload):
    run_encode_documents(benchmark, bench_record, ugd_backend, impl, CPU_SHAPE, workload)


@pytest.mark.parametrize("workload", SHAPES[CPU_SHAPE]["workloads"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["two_tower", "single_tower"])
def test_predict_cpu_small(benchmark, bench_record, ugd_backend, cpu_threads, mode, impl, workload):
    run_predict(benchmark, bench_record, ugd_backend, impl, mode, CPU_SHAPE, workload)


@pytest.mark.parametrize("kind", SCORING)
def test_score_stored_cpu_small(benchmark, bench_record, ugd_backend, cpu_threads, kind):
    run_scoring(benchmark, bench_record, ugd_backend, kind, CPU_SHAPE)


@pytest.mark.parametrize("workload", SHAPES[CPU_SHAPE]["workloads"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase", ["ttft", "generate"])  # ttft first: "generate" derives the decode-only rate
def test_reason_cpu_small(benchmark, bench_record, ugd_backend, cpu_threads, phase, impl, workload):
    run_reason(benchmark, bench_record, ugd_backend, impl, phase, CPU_SHAPE, workload)


@pytest.mark.parametrize("workload", SHAPES[GPU_SHAPE]["workloads"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.cuda
@needs_cuda
def test_encode_documents_qwen25_1p5b_gpu(benchmark, bench_record, ugd_backend, impl, workload):  # pragma: no cover
    run_encode_documents(benchmark, bench_record, ugd_backend, impl, GPU_SHAPE, workload)


@pytest.mark.parametrize("workload", SHAPES[GPU_SHAPE]["workloads"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["two_tower", "single_tower"])
@pytest.mark.cuda
@needs_cuda
def test_predict_qwen25_1p5b_gpu(benchmark, bench_record, ugd_backend, mode, impl, workload):  # pragma: no cover
    run_predict(benchmark, bench_record, ugd_backend, impl, mode, GPU_SHAPE, workload)


@pytest.mark.parametrize("kind", SCORING)
@pytest.mark.cuda
@needs_cuda
def test_score_stored_qwen25_1p5b_gpu(benchmark, bench_record, ugd_backend, kind):  # pragma: no cover
    run_scoring(benchmark, bench_record, ugd_backend, kind, GPU_SHAPE)


@pytest.mark.parametrize("workload", SHAPES[GPU_SHAPE]["workloads"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase", ["ttft", "generate"])
@pytest.mark.cuda
@needs_cuda
def test_reason_qwen25_1p5b_gpu(benchmark, bench_record, ugd_backend, phase, impl, workload):  # pragma: no cover
    run_reason(benchmark, bench_record, ugd_backend, impl, phase, GPU_SHAPE, workload)


# ---------------------------------------------------------------------------------------------
# harness checks (not benchmarks: --benchmark-only skips them)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", ["qlq", "bq"])
def test_workload_texts_have_the_workload_lengths(workload):
    """One word is one token: the lone query and document spans have make_spans' Lq and Ld exactly."""
    from ugd.data.layout import LayoutConfig, add_special_tokens, encode_sample

    tok = copy.deepcopy(make_tokenizer())
    ids = add_special_tokens(tok)
    queries, documents = workload_texts(workload, 16)
    spans = make_spans(workload, batch=16, seed=0)
    layout = LayoutConfig()
    for q, d, (lq, ld, lp, _) in zip(queries, documents, spans.tolist()):
        s = encode_sample(tok, ids, q, d, None, None, config=layout, parts="qdp")
        assert s.spans[:3] == (lq, ld, lp) and not s.truncated
        assert ids["eos"] not in s.input_ids and 1 not in s.input_ids  # no EOS, no <unk>


def test_padded_peer_agrees_with_ugd_cpu_small(cpu_threads):
    """The peer of every figure computes what the UGD path computes (cpu-small, fp32), with uneven
    lengths so that padding is exercised, and a wrong peer mask is caught."""
    model, peer = build_models(CPU_SHAPE)
    queries, documents = workload_texts("qlq", 6, seed=3)
    pairs = list(zip(queries, documents))
    budget = 1024  # several padded batches
    ip.check_vectors(model, peer, documents, "document", budget)
    ip.check_vectors(model, peer, queries, "query", budget)
    for mode in ("two_tower", "single_tower"):
        ip.check_predict(model, peer, pairs, mode, budget)
    ip.check_prefill(model, peer, pairs)
    from ugd.serving.generate import generate_reason_ids

    kw = dict(max_new_tokens=5, min_new_tokens=5, batch_size=4)
    ours = generate_reason_ids(model, model.tokenizer, pairs, **kw)
    assert ours == ip.peer_generate_ids(peer, pairs, **kw) and all(len(r) == 5 for r in ours)
    # a peer whose single tower reads with the stm mask (queries see the document) must be rejected
    wrong = copy.deepcopy(peer)
    wrong.config.paradigm = "ugd-stm"
    with pytest.raises(AssertionError, match="single_tower"):
        ip.check_predict(model, wrong, pairs, "single_tower", budget)
