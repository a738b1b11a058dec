"""``python -m ugd.serve`` (ugd.serving.http): real HTTP over loopback with httpx, on tiny checkpoints.

* every endpoint answers what the library answers for the same inputs (``model.rank`` / ``predict`` /
  ``generate_reason``, the store's vectors), within fp32 tolerance;
* 32 concurrent clients x 8 requests: all answered, none lost, equal to the sequential answers;
* bad inputs, sizes over the limits and missing or wrong keys: 4xx with one line each, no traceback;
* the dynamic batcher: grouping, the bounded queue (503 + Retry-After), /health while a batch runs,
  errors reported to the request that caused them;
* schemathesis against the served /openapi.json: no 5xx;
* the store: kill -9 during writes leaves a loadable store; a pickled checkpoint is refused, nothing unpickled;
* the command: SIGTERM drains the requests in flight, then the process ends by that signal.

Uvicorn runs in a thread for the in-process tests and as ``python -m ugd.serve`` for the signal tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from tests.cli_runs import one_error_line, run_cli  # noqa: E402
from tests.tiny_checkpoints import NUM_LABELS, save_tiny_checkpoint  # noqa: E402

from ugd.serve import _bind, cli, load_model  # noqa: E402
from ugd.serving.doc_vectors import DocumentVectors  # noqa: E402
from ugd.serving.http.app import create_app  # noqa: E402
from ugd.serving.http.batching import DynamicBatcher, QueueFull  # noqa: E402
from ugd.serving.http.engine import ModelEngine  # noqa: E402
from ugd.serving.http.settings import ServeSettings  # noqa: E402
from ugd.serving.http.store import DocumentStore  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PL = NUM_LABELS - 1  # the server's default positive label: the last class
FP32 = 64 * torch.finfo(torch.float32).eps  # relative to the magnitude of probabilities (<= 1)


def close(a, b, scale=1.0) -> bool:
    return abs(float(a) - float(b)) <= FP32 * max(scale, abs(float(b)))


class LiveServer:
    """An app served by uvicorn in a thread on 127.0.0.1, a free port."""

    def __init__(self, app):
        self.sock = _bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kw):
        return httpx.Client(base_url=self.url, timeout=60, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from ugd.data.demo import demo_splits

    root = tmp_path_factory.mktemp("serve")
    records, extra = demo_splits(16, 4)
    ckpt = save_tiny_checkpoint(root / "ckpt", records + extra, "ugd-ttm", seed=0)
    stm = save_tiny_checkpoint(root / "stm", records + extra, "stm", seed=2)  # single tower only
    model = load_model(ckpt, torch.device("cpu"), "auto")
    engine = ModelEngine(model, store=DocumentStore.open(str(root / "store.safetensors"), model))
    corpus = list(dict.fromkeys([r["document"] for r in records + extra]))
    queries = list(dict.fromkeys(r["query"] for r in records))
    with LiveServer(create_app(engine, ServeSettings(max_new_tokens=8))) as live:
        yield {"root": root, "ckpt": ckpt, "stm": stm, "model": model, "engine": engine, "corpus": corpus,
               "queries": queries, "live": live, "client": live.client()}


# ---------------------------------------------------------------------------------------------
# every endpoint equals the library
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["single_tower", "two_tower"])
def test_rerank_equals_model_rank(env, mode):
    q, docs = env["queries"][0], env["corpus"][:7]
    r = env["client"].post("/v1/rerank", json={"query": q, "documents": docs, "mode": mode, "top_n": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    want = env["model"].rank(q, docs, top_k=None, mode=mode, positive_label=PL)
    scores = dict(want)
    assert body["mode"] == mode and len(body["results"]) == 5
    got = body["results"]
    assert [x["relevance_score"] for x in got] == sorted((x["relevance_score"] for x in got), reverse=True)
    for x in got:
        assert close(x["relevance_score"], scores[x["index"]]), (x, scores[x["index"]])
        assert x["document"] == {"text": docs[x["index"]]}
    assert {x["index"] for x in got} == {i for i, _ in want[:5]} or \
        close(want[4][1], want[5][1])  # a near-tie at the cut may go either way


def test_rerank_defaults_cohere_shape_and_documents_as_objects(env):
    q, docs = env["queries"][1], env["corpus"][:4]
    r = env["client"].post("/v1/rerank", json={"model": "whatever", "query": q, "return_documents": False,
                                               "documents": [{"text": d} for d in docs], "rank_fields": ["text"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "single_tower"  # a cross-encoder, where the checkpoint has one
    assert sorted(x["index"] for x in body["results"]) == [0, 1, 2, 3]
    assert all(x["document"] is None for x in body["results"])


def test_score_gives_both_heads_equal_to_predict(env):
    pairs = [(env["queries"][i % 3], env["corpus"][i]) for i in range(5)]
    r = env["client"].post("/v1/score", json={"pairs": [{"query": q, "document": d} for q, d in pairs]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["positive_label"] == PL
    for mode in ("two_tower", "single_tower"):
        want = env["model"].predict(pairs, mode=mode)
        got = torch.tensor([x[mode]["probabilities"] for x in body["results"]])
        torch.testing.assert_close(got, want, rtol=0, atol=FP32)
        assert [x[mode]["score"] for x in body["results"]] == got[:, PL].tolist()


def test_explain_equals_generate_reason(env):
    pairs = [(env["queries"][i % 2], env["corpus"][i]) for i in range(3)]
    r = env["client"].post("/v1/explain", json={"pairs": [{"query": q, "document": d} for q, d in pairs],
                                                "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    want = env["model"].generate_reason(pairs, max_new_tokens=6)
    assert [x["reason"] for x in r.json()["results"]] == want


def test_documents_then_search_is_the_cascade(env):
    c, model, corpus = env["client"], env["model"], env["corpus"]
    r = c.post("/v1/documents", json={"documents": [{"id": f"doc{i}", "text": t} for i, t in enumerate(corpus)]})
    assert r.status_code == 200, r.text
    assert r.json()["total"] >= len(corpus)
    q = env["queries"][2]
    r = c.post("/v1/search", json={"query": q, "k1": 8, "k2": 4, "k3": 2, "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    # stage 1: the two tower over the stored vectors, as model.rank over the same texts
    ranked = model.rank(q, corpus, top_k=None, mode="two_tower", positive_label=PL)
    by_text = {corpus[i]: s for i, s in ranked}
    candidates = [corpus[i] for i, _ in ranked[:8]]
    hits = body["results"]
    assert len(hits) == 4 and body["store_size"] == len(env["engine"].store)
    for h in hits:
        assert h["document"] == corpus[int(h["id"][3:])]
        assert close(h["retrieval_score"], by_text[h["document"]])
        assert h["document"] in candidates or close(h["retrieval_score"], ranked[7][1])
    # stage 2: the single tower's order of those candidates
    st = model.predict([(q, h["document"]) for h in hits], mode="single_tower")[:, PL]
    for h, s in zip(hits, st):
        assert close(h["rerank_score"], s)
    assert [h["rerank_score"] for h in hits] == sorted((h["rerank_score"] for h in hits), reverse=True)
    # stage 3: reasons for the top k3 only
    assert [h["reason"] for h in hits[:2]] == model.generate_reason([(q, h["document"]) for h in hits[:2]],
                                                                     max_new_tokens=5)
    assert all(h["reason"] is None for h in hits[2:])
    t = body["timings"]
    assert min(t.values()) >= 0 and t["total_ms"] >= t["retrieve_ms"] + t["rerank_ms"]


def test_document_changes_persist_atomically_and_reload(env):
    c, model = env["client"], env["model"]
    path = env["engine"].store.path
    r = c.post("/v1/documents", json={"documents": [{"id": "x/1", "text": "a brand new red wool scarf"},
                                                    {"text": "another new blue wool hat"}]})
    assert r.status_code == 200, r.text
    auto_id = r.json()["ids"][1]
    store = DocumentStore.open(path, model)
    assert "x/1" in store and store.text(auto_id) == "another new blue wool hat"
    assert len(DocumentVectors.load(path, model)) == len(store)  # ugd.predict reads the same file
    # the stored vector is the one the model gives that text
    v = model.encode_documents(["a brand new red wool scarf"])
    torch.testing.assert_close(store.vectors[store.ids.index("x/1")], v[0], rtol=0, atol=FP32 * v.abs().max())
    r = c.post("/v1/documents", json={"documents": [{"id": "x/1", "text": "a replaced red wool scarf"}]})
    assert r.json()["replaced"] == 1
    assert c.delete("/v1/documents/x/1").status_code == 200
    r = c.delete("/v1/documents/x/1")
    assert r.status_code == 404 and r.json()["detail"] == "no document with id 'x/1' in the store"
    assert "x/1" not in DocumentStore.open(path, model)
    r = c.post("/v1/documents", json={"documents": [{"id": "dupe", "text": "another new blue wool hat"}]})
    assert r.status_code == 409 and "same text" in r.json()["detail"]


def test_health_metrics_and_openapi(env):
    c = env["client"]
    h = c.get("/health").json()
    assert h["live"] and h["ready"] and h["paradigm"] == "ugd-ttm"
    assert set(h["modes"]) >= {"two_tower", "single_tower", "reason"}
    text = c.get("/metrics").text
    for name in ("ugd_requests_total", "ugd_request_seconds_bucket", "ugd_batch_size_bucket", "ugd_queue_depth",
                 "ugd_batch_seconds_count"):
        assert name in text, name
    assert 'endpoint="/v1/rerank"' in text
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/rerank", "/v1/score", "/v1/explain", "/v1/search", "/v1/documents", "/health"} <= set(paths)


# ---------------------------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------------------------


def test_32_concurrent_clients_get_the_sequential_answers(env):
    queries, corpus = env["queries"], env["corpus"]
    bodies = [{"query": queries[i % len(queries)], "documents": corpus[i % 5: i % 5 + 3 + i % 4],
               "mode": ("single_tower", "two_tower")[i % 2]} for i in range(32 * 8)]
    c = env["client"]
    sequential = {}
    for b in bodies:  # each distinct request once, alone
        key = json.dumps(b, sort_keys=True)
        if key not in sequential:
            sequential[key] = c.post("/v1/rerank", json=b).json()["results"]

    async def client(k, http):
        out = []
        for j in range(8):
            b = bodies[k * 8 + j]
            r = await http.post("/v1/rerank", json=b)
            out.append((b, r.status_code, r.json()))
        return out

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=env["live"].url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(client(k, http) for k in range(32)))

    batches_before = _batch_count(c)
    answers = [a for per_client in asyncio.run(main()) for a in per_client]
    assert len(answers) == 256 and all(status == 200 for _, status, _ in answers)
    for b, _, got in answers:
        want = {x["index"]: x["relevance_score"] for x in sequential[json.dumps(b, sort_keys=True)]}
        assert len(got["results"]) == len(want)
        for x in got["results"]:
            assert close(x["relevance_score"], want[x["index"]])
    # the batcher grouped them: fewer forwards than requests
    assert _batch_count(c) - batches_before < 256


def _batch_count(c) -> float:
    text = c.get("/metrics").text
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("ugd_batch_size_count"))


# ---------------------------------------------------------------------------------------------
# bad inputs, limits, auth
# ---------------------------------------------------------------------------------------------


def _one_line_error(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in r.text
    for n in needles:
        assert n in detail, (n, detail)
    return detail


BAD = [
    (b'{"query": "shoes", "documents": ["a"', 422, "not valid JSON"),
    (b'{"query": 7, "documents": ["a"]}', 422, "query: Input should be a valid string"),
    (b'{"query": "shoes", "documents": "one string"}', 422, "documents"),
    (b'{"query": "shoes", "documents": []}', 422, "documents: List should have at least 1 item"),
    (b'{"query": "shoes", "documents": ["fine", "  "]}', 422, "documents[1]: is empty"),
    (b'{"query": "shoes", "documents": ["a"], "mode": "cross"}', 422, "mode: Input should be"),
    (b'{"query": "shoes", "documents": ["a"], "top_n": 0}', 422, "top_n"),
    (b'{"documents": ["a"]}', 422, "query is required"),
    (b'[1, 2]', 422, "must be a JSON object"),
]


@pytest.mark.parametrize("body,status,needle", BAD, ids=[b[2] for b in BAD])
def test_bad_inputs_give_one_line_4xx(env, body, status, needle):
    r = env["client"].post("/v1/rerank", content=body, headers={"content-type": "application/json"})
    _one_line_error(r, status, needle)


def test_a_mode_the_checkpoint_cannot_serve_gives_the_paradigms_message(env, tmp_path):
    model = load_model(env["stm"], torch.device("cpu"), "auto")
    with LiveServer(create_app(ModelEngine(model))) as live, live.client() as c:
        r = c.post("/v1/rerank", json={"query": "q a", "documents": ["d b"], "mode": "two_tower"})
        _one_line_error(r, 422, "paradigm 'stm' cannot serve mode two-tower", "it serves: single-tower")
        assert c.post("/v1/rerank", json={"query": "q a", "documents": ["d b"]}).status_code == 200
        r = c.post("/v1/search", json={"query": "q a"})
        _one_line_error(r, 409, "no document store", "--doc_vectors")
        r = c.post("/v1/score", json={"pairs": [{"query": "q a", "document": "d b"}]})
        assert set(r.json()["results"][0]) == {"index", "two_tower", "single_tower"}
        assert r.json()["results"][0]["two_tower"] is None


def test_limits_and_api_key(env, monkeypatch):
    settings = ServeSettings(api_key="s3cret-key", max_documents=3, max_chars=40, max_body_bytes=600,
                             max_new_tokens=4)
    with LiveServer(create_app(env["engine"], settings)) as live, live.client() as c:
        ok = {"Authorization": "Bearer s3cret-key"}
        body = {"query": "red shoes", "documents": ["a red shoe", "a blue hat"]}
        r = c.post("/v1/rerank", json=body)
        _one_line_error(r, 401, "API key is missing", "Authorization: Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        _one_line_error(c.post("/v1/rerank", json=body, headers={"Authorization": "Bearer s3cret-kez"}), 401,
                        "API key is wrong")
        _one_line_error(c.post("/v1/rerank", json=body, headers={"Authorization": "Basic s3cret-key"}), 401)
        # the key is checked before the body is read: malformed JSON without a key is a 401 too
        _one_line_error(c.post("/v1/rerank", content=b"{", headers={"content-type": "application/json"}), 401)
        assert c.post("/v1/rerank", json=body, headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200  # not /v1
        _one_line_error(c.post("/v1/rerank", json={**body, "documents": ["d"] * 4}, headers=ok), 413,
                        "4 documents or pairs", "--max_documents")
        _one_line_error(c.post("/v1/rerank", json={**body, "documents": ["x" * 41]}, headers=ok), 413,
                        "document 0 has 41 characters", "--max_chars")
        _one_line_error(c.post("/v1/rerank", json={**body, "documents": ["y" * 30] * 30}, headers=ok), 413,
                        "larger than the server's limit of 600 bytes")

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(40):
                yield b" " * 50
        _one_line_error(c.post("/v1/rerank", content=chunked(), headers=ok), 413, "600 bytes")
        _one_line_error(c.post("/v1/explain", json={"pairs": [{"query": "a", "document": "b"}], "max_new_tokens": 9},
                               headers=ok), 413, "--max_new_tokens")
    from ugd.serving.http.security import key_matches
    assert key_matches("Bearer k", "k") and key_matches("bearer  k ", "k") and not key_matches("Bearer", "k")


# ---------------------------------------------------------------------------------------------
# the batcher
# ---------------------------------------------------------------------------------------------


def test_batcher_groups_by_head_keeps_order_and_isolates_errors():
    calls = []

    def run(head, items):
        calls.append((head, list(items)))
        if "bad" in items:
            raise ValueError("bad item")
        return [(head, x) for x in items]

    async def main():
        b = DynamicBatcher(run, max_batch_size=8, max_wait_ms=50, max_queue=100)
        b.start()
        try:
            jobs = [b.submit(("a",), [i, i + 100]) for i in range(3)] + [b.submit(("b",), [7])] + \
                   [b.submit(("a",), ["bad"])]
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            b.stop()

    out = asyncio.run(main())
    assert out[:4] == [[(("a",), 0), (("a",), 100)], [(("a",), 1), (("a",), 101)], [(("a",), 2), (("a",), 102)],
                       [(("b",), 7)]]
    assert isinstance(out[4], ValueError)  # only the request that caused it
    assert calls[0] == (("a",), [0, 100, 1, 101, 2, 102, "bad"])  # one forward for the five 'a' requests
    assert all(len(items) <= 8 for _, items in calls)


class _Gated(ModelEngine):
    """The real engine, whose forwards wait for a gate: a batch that runs as long as a test wants."""

    def __init__(self, model):
        super().__init__(model)
        self.gate, self.entered = threading.Event(), threading.Event()

    def run(self, head, items):
        self.entered.set()
        assert self.gate.wait(60)
        return super().run(head, items)


def test_health_answers_during_a_batch_and_a_full_queue_gives_503(env):
    engine = _Gated(env["model"])
    settings = ServeSettings(max_queue=2, max_wait_ms=0, retry_after_s=3)
    body = {"query": "red shoes", "documents": ["a red shoe"]}
    with LiveServer(create_app(engine, settings)) as live, live.client() as c:
        results = []
        threads = [threading.Thread(target=lambda: results.append(live.client().post("/v1/rerank", json=body)))
                   for _ in range(3)]
        threads[0].start()
        assert engine.entered.wait(30)  # the first is in its forward, held
        for t in threads[1:]:
            t.start()
        deadline = time.time() + 30
        while c.get("/health").json()["queue_depth"] < 2:  # /health answers while the batch runs
            assert time.time() < deadline
            time.sleep(0.02)
        r = c.post("/v1/rerank", json=body)
        _one_line_error(r, 503, "at capacity")
        assert r.headers["retry-after"] == "3"
        engine.gate.set()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200, 200]


# ---------------------------------------------------------------------------------------------
# schemathesis
# ---------------------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(env, tmp_path):
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        pytest.skip("schemathesis is not installed")
    model = env["model"]
    engine = ModelEngine(model, store=DocumentStore.open(str(tmp_path / "fuzz.safetensors"), model))
    settings = ServeSettings(max_documents=16, max_chars=200, max_new_tokens=4, max_body_bytes=64 << 10)
    with LiveServer(create_app(engine, settings)) as live:
        proc = subprocess.run([exe, "run", f"{live.url}/openapi.json", "--checks", "not_a_server_error",
                               "--max-examples", "8", "--seed", "1", "--request-timeout", "60",
                               "--phases", "examples,coverage,fuzzing", "--max-failures", "1"],
                              capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its database there
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# safety: the store under kill -9, safetensors only
# ---------------------------------------------------------------------------------------------

_WRITER = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from ugd.serving.http.store import DocumentStore
path, fingerprint, layout, paradigm, hidden = sys.argv[2:7]
s = DocumentStore(path, [], [], torch.empty(0, int(hidden)), fingerprint=fingerprint, layout=layout, paradigm=paradigm)
i = 0
while True:
    i += 1
    s.upsert([(f"id{i}", f"text number {i} " + "pad " * 2000)], torch.randn(1, int(hidden)))
    if i % 3 == 0:
        s.delete(f"id{i - 1}")
    print(i, flush=True)
"""


def test_kill_9_during_store_writes_leaves_a_loadable_store(env, tmp_path):
    model = env["model"]
    empty = DocumentVectors.empty(model)
    path = tmp_path / "killed.safetensors"
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, REPO, str(path), empty.fingerprint, empty.layout,
                                 empty.paradigm, str(empty.vectors.shape[1])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline(), proc.stderr.read().decode()[-2000:]  # at least one write done
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        store = DocumentStore.open(str(path), model)  # the old or the new store, whole
        assert len(store) >= 1 and len(store.ids) == len(store.texts) == store.vectors.shape[0]
        assert all(store.text(i).startswith(f"text number {i[2:]} ") for i in store.ids)
    # the next write removes the temporaries the killed writers left
    store.upsert([("last", "the last text")], torch.randn(1, empty.vectors.shape[1]))
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_only_safetensors_are_loaded_nothing_is_unpickled(env, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    with monkeypatch.context() as m:
        m.setattr(pickle, "load", refuse)
        m.setattr(pickle, "loads", refuse)
        m.setattr(pickle, "Unpickler", refuse)
        m.setattr(torch, "load", refuse)
        model = load_model(env["ckpt"], torch.device("cpu"), "auto")
    assert model.fingerprint() == env["model"].fingerprint()
    pickled = tmp_path / "pickled"
    shutil.copytree(env["ckpt"], pickled)
    state = {k: v for k, v in model.backbone.state_dict().items()}
    os.remove(pickled / "model.safetensors")
    torch.save(state, pickled / "pytorch_model.bin")
    code, _, err = run_cli(cli, ["--model", pickled, "--port", "0"])
    assert code == 2
    one_error_line(err, "ugd.serve: error: ", "loads safetensors only, never pickles")


def test_cli_errors_are_one_line(env, tmp_path):
    code, _, err = run_cli(cli, ["--model", tmp_path / "nowhere"])
    assert code == 2
    one_error_line(err, "ugd.serve: error: ", "no such folder")
    code, _, err = run_cli(cli, ["--model", env["ckpt"], "--max_queue", "0"])
    assert code == 2
    one_error_line(err, "ugd.serve: error: ", "--max_queue must be an integer >= 1")
    (tmp_path / "vectors.safetensors").write_bytes(b"")
    vec = tmp_path / "v.safetensors"
    DocumentVectors.build(env["model"], ["one document"]).save(str(vec))
    code, _, err = run_cli(cli, ["--model", env["ckpt"], "--doc_vectors", vec, "--port", "0"])
    assert code == 2
    one_error_line(err, "ugd.serve: error: ", "without their texts", "--documents")


# ---------------------------------------------------------------------------------------------
# the command: SIGTERM drains
# ---------------------------------------------------------------------------------------------


def test_sigterm_drains_requests_in_flight_then_exits(env, tmp_path):
    port_file = tmp_path / "port"
    docs = tmp_path / "corpus.jsonl"
    docs.write_text("".join(json.dumps({"id": f"c{i}", "document": t}) + "\n" for i, t in enumerate(env["corpus"])))
    cmd = [sys.executable, "-m", "ugd.serve", "--model", env["ckpt"], "--port", "0", "--port_file", str(port_file),
           "--doc_vectors", str(tmp_path / "s.safetensors"), "--documents", str(docs), "--threads", "1",
           "--max_new_tokens", "48", "--max_wait_ms", "200", "--log_level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": REPO})
    try:
        deadline = time.time() + 120
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/health").json()["documents"] == len(env["corpus"])
        pairs = [{"query": q, "document": d} for q in env["queries"][:4] for d in env["corpus"][:6]]
        results = []

        def slow():  # 24 reasons of up to 48 tokens, after a 200 ms batching wait: in flight at the signal
            with httpx.Client(base_url=url, timeout=120) as c:
                results.append(c.post("/v1/explain", json={"pairs": pairs, "max_new_tokens": 48}))

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        code = proc.wait(60)
        err = proc.stderr.read().decode()
        assert results and results[0].status_code == 200, (results, err[-2000:])
        assert len(results[0].json()["results"]) == len(pairs)
        # uvicorn re-raises the signal once drained: the process ends as SIGTERM asked (143 in a shell)
        assert code == -signal.SIGTERM and "Traceback" not in err, err[-3000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        proc.kill()
        proc.wait()


def test_the_listening_socket_says_it_is_tcp():
    # asyncio sets TCP_NODELAY only on sockets created with proto IPPROTO_TCP; without it every response on a
    # kept-alive connection waited ~40 ms (Nagle against the client's delayed ACK)
    import socket

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
