"""The FastAPI application: endpoints, error bodies, the batcher's lifetime.

    app = create_app(engine, settings)      # engine: ModelEngine (its .store: a DocumentStore or None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every error is ``{"detail": "<one line>"}``, never a traceback: 401 (API key), 404 (unknown document),
409 (no document store, or a text already stored under another id), 413 (a size limit), 422 (malformed
JSON, wrong types, empty texts, an unknown mode, a mode the checkpoint cannot serve), 503 with
``Retry-After`` (the queue is full, or the server is shutting down), 500 ("internal error", the traceback
goes to the server's log only). docs/serving.md documents the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import DynamicBatcher, QueueFull, ShuttingDown
from .engine import ModelEngine, NotServable
from .metrics import MetricsMiddleware, ServerMetrics
from .schemas import (DeleteResponse, DocumentsRequest, DocumentsResponse, ErrorBody, ExplainRequest, ExplainResponse,
                      ExplainResult, HeadScore, Health, PairsRequest, RerankRequest, RerankResponse, RerankResult,
                      ScoreResponse, ScoreResult, SearchHit, SearchRequest, SearchResponse, SearchTimings)
from .security import GuardMiddleware
from .settings import ServeSettings
from .store import StoreError, UnknownDocument

log = logging.getLogger("ugd.serve")


class LimitExceeded(Exception):
    """A request over one of the server's size limits (413)."""


class NoStore(Exception):
    """A document endpoint on a server started without --doc_vectors (409)."""


_ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _where(loc) -> str:
    """``("body", "documents", 3, "str")`` -> ``documents[3]``."""
    # a union's branch names (str, DocumentText, function-after[...]) say nothing to a client: dropped
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and (p[:1].isupper() or "[" in p))]
    where = ""
    for p in parts:
        where += f"[{p}]" if isinstance(p, int) else (f".{p}" if where else str(p))
    return where


def validation_message(exc: RequestValidationError) -> str:
    """The first validation error as one line: where (``documents[3].text``) and what."""
    errors = exc.errors()
    if not errors:
        return "the request body is not valid"
    e = errors[0]
    where = _where(e.get("loc", ()))
    kind, msg = e.get("type", ""), one_line(e.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "json_invalid":
        err = (e.get("ctx") or {}).get("error", "")
        text = f"the request body is not valid JSON ({err})" if err else "the request body is not valid JSON"
    elif not where and kind == "missing":
        text = "the request body is missing: send a JSON object (Content-Type: application/json)"
    elif not where:
        text = f"the request body must be a JSON object: {msg}"
    elif kind == "missing":
        text = f"{where} is required"
    else:
        text = f"{where}: {msg}"
    # a union reports one error per branch at the same place: count places, not branches
    more = len({_where(x.get("loc", ())) for x in errors} - {where})
    return one_line(text + (f" (and {more} more error{'s' if more > 1 else ''})" if more else ""))


def check_limits(settings: ServeSettings, count: int, texts) -> None:
    if count > settings.max_documents:
        raise LimitExceeded(f"{count} documents or pairs in one call, the server's limit is {settings.max_documents} "
                            "(--max_documents); split the call")
    for what, i, t in texts:
        if len(t) > settings.max_chars:
            raise LimitExceeded(f"{what} {i} has {len(t)} characters, the server's limit is {settings.max_chars} "
                                "(--max_chars); shorten it (the model reads only the beginning anyway)")


def create_app(engine: ModelEngine, settings: ServeSettings | None = None) -> FastAPI:
    settings = (settings or ServeSettings()).check()
    metrics = ServerMetrics()
    batcher = DynamicBatcher(engine.run, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                             max_queue=settings.max_queue, on_batch=metrics.observe_batch)
    metrics.queue_depth.set_function(lambda: batcher.queue_depth)
    metrics.documents.set_function(lambda: len(engine.store) if engine.store is not None else 0)
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            # uvicorn has drained the requests in flight by now (SIGTERM: it stops accepting, then waits)
            state["ready"] = False
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="ugd serve", version="1", lifespan=lifespan,
                  description="UGD text matching over HTTP: the two tower, the single tower and reasons from one "
                              "model. See docs/serving.md.")
    app.state.batcher, app.state.engine, app.state.settings, app.state.metrics = batcher, engine, settings, metrics

    # ------------------------------------------------------------------ errors: one line each

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": one_line(message)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return error(422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "request refused",
                     getattr(exc, "headers", None))

    @app.exception_handler(LimitExceeded)
    async def _limit(request, exc):
        return error(413, str(exc))

    @app.exception_handler(NoStore)
    async def _no_store(request, exc):
        return error(409, "this server has no document store: start it with --doc_vectors PATH (a new path "
                          "starts an empty store)")

    @app.exception_handler(UnknownDocument)
    async def _unknown(request, exc):
        return error(404, str(exc))

    @app.exception_handler(StoreError)
    async def _store(request, exc):
        return error(409, str(exc))

    @app.exception_handler(NotServable)
    async def _not_servable(request, exc):
        return error(422, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request, exc):
        return error(503, str(exc), {"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(ShuttingDown)
    async def _stopping(request, exc):
        return error(503, "the server is shutting down; retry on another replica", {"Retry-After": "1"})

    @app.exception_handler(ValueError)
    async def _value(request, exc):  # the library's own input checks (one line each)
        return error(422, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("internal error on %s", request.url.path)
        return error(500, "internal error (the server's log has the details)")

    # ------------------------------------------------------------------ health and metrics

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        ready = state["ready"] and batcher.alive
        body = Health(live=True, ready=ready, paradigm=engine.paradigm, modes=engine.modes,
                      documents=len(engine.store) if engine.store is not None else None,
                      queue_depth=batcher.queue_depth)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    # ------------------------------------------------------------------ /v1

    v1 = APIRouter(prefix="/v1", responses=_ERRORS)

    def store():
        if engine.store is None:
            raise NoStore()
        return engine.store

    @v1.post("/rerank", response_model=RerankResponse)
    async def rerank(req: RerankRequest):
        texts = [d if isinstance(d, str) else d.text for d in req.documents]
        check_limits(settings, len(texts), [("query", 0, req.query)] + [("document", i, t) for i, t in enumerate(texts)])
        mode = (req.mode or engine.default_rerank_mode()).replace("-", "_")
        engine.require(mode)
        probs = await batcher.submit((mode,), [(req.query, t) for t in texts])
        scores = [float(p[engine.positive_label]) for p in probs]
        order = sorted(range(len(texts)), key=lambda i: -scores[i])[: req.top_n]
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document={"text": texts[i]} if req.return_documents else None) for i in order]
        return RerankResponse(id=uuid.uuid4().hex, model=settings.model_name, mode=mode, results=results)

    def pairs_of(req: PairsRequest) -> list[tuple[str, str]]:
        pairs = [(p.query, p.document) for p in req.pairs]
        check_limits(settings, len(pairs), [(w, i, t) for i, (q, d) in enumerate(pairs)
                                            for w, t in (("query of pair", q), ("document of pair", d))])
        return pairs

    @v1.post("/score", response_model=ScoreResponse)
    async def score(req: PairsRequest):
        pairs = pairs_of(req)
        modes = [m for m in ("two_tower", "single_tower") if engine.serves(m)]
        if not modes:
            engine.require("single_tower")  # the paradigm's message: what it serves instead
        # both heads queued at once: each joins its own batch instead of waiting for the other's
        answers = await asyncio.gather(*(batcher.submit((m,), pairs) for m in modes))
        heads = dict(zip(modes, answers))
        pl = engine.positive_label
        results = [ScoreResult(index=i, **{m: HeadScore(probabilities=[float(x) for x in heads[m][i]],
                                                        score=float(heads[m][i][pl])) for m in modes})
                   for i in range(len(pairs))]
        return ScoreResponse(positive_label=pl, results=results)

    def reason_length(asked: int | None) -> int:
        if asked is None:
            return settings.max_new_tokens
        if asked > settings.max_new_tokens:
            raise LimitExceeded(f"max_new_tokens {asked} is above the server's limit of {settings.max_new_tokens} "
                                "(--max_new_tokens)")
        return asked

    @v1.post("/explain", response_model=ExplainResponse)
    async def explain(req: ExplainRequest):
        pairs = pairs_of(req)
        engine.require("reason")
        reasons = await batcher.submit(("reason", reason_length(req.max_new_tokens)), pairs)
        return ExplainResponse(results=[ExplainResult(index=i, reason=r) for i, r in enumerate(reasons)])

    @v1.post("/search", response_model=SearchResponse)
    async def search(req: SearchRequest):
        docs = store()
        check_limits(settings, 1, [("query", 0, req.query)])
        if req.k1 > settings.max_documents:  # the single tower reranks k1 pairs: the same bound as a rerank call
            raise LimitExceeded(f"k1 {req.k1} is above the server's limit of {settings.max_documents} "
                                "(--max_documents)")
        engine.require("two_tower")
        if req.k2:
            engine.require("single_tower")
        if req.k3:
            engine.require("reason")
        n_tokens = reason_length(req.max_new_tokens)
        t0 = time.perf_counter()
        [(ids, texts, retrieval)] = await batcher.submit(("retrieve",), [(req.query, req.k1)])
        t1 = time.perf_counter()
        order, rerank_scores = list(range(len(ids))), [None] * len(ids)
        if req.k2 and ids:
            probs = await batcher.submit(("single_tower",), [(req.query, t) for t in texts])
            rerank_scores = [float(p[engine.positive_label]) for p in probs]
            order = sorted(order, key=lambda i: -rerank_scores[i])[: req.k2]
        t2 = time.perf_counter()
        reasons: dict[int, str] = {}
        explained = order[: req.k3]
        if explained:
            out = await batcher.submit(("reason", n_tokens), [(req.query, texts[i]) for i in explained])
            reasons = dict(zip(explained, out))
        t3 = time.perf_counter()
        hits = [SearchHit(id=ids[i], document=texts[i] if req.return_documents else None,
                          retrieval_score=float(retrieval[i]), rerank_score=rerank_scores[i], reason=reasons.get(i))
                for i in order]
        ms = lambda a, b: round((b - a) * 1000.0, 3)  # noqa: E731
        return SearchResponse(results=hits, store_size=len(docs),
                              timings=SearchTimings(retrieve_ms=ms(t0, t1), rerank_ms=ms(t1, t2),
                                                    explain_ms=ms(t2, t3), total_ms=ms(t0, t3)))

    @v1.post("/documents", response_model=DocumentsResponse)
    async def add_documents(req: DocumentsRequest):
        docs = store()
        items = [(d.id if d.id is not None else uuid.uuid4().hex, d.text) for d in req.documents]
        check_limits(settings, len(items), [("document", i, t) for i, (_, t) in enumerate(items)])
        engine.require("documents")
        docs.check_upsert(items)  # before any encoding: a refused call costs nothing
        vectors = await batcher.submit(("document_vectors",), [t for _, t in items])
        added, replaced = await run_in_threadpool(docs.upsert, items, torch.stack(vectors))
        return DocumentsResponse(ids=[i for i, _ in items], added=added, replaced=replaced, total=len(docs))

    @v1.delete("/documents/{doc_id:path}", response_model=DeleteResponse)
    async def delete_document(doc_id: str):
        docs = store()
        await run_in_threadpool(docs.delete, doc_id)
        return DeleteResponse(id=doc_id, deleted=True, total=len(docs))

    app.include_router(v1)
    # outermost first: metrics see every answer, the guard's 401/413 included
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


__all__ = ["create_app", "validation_message"]
