"""``python -m ugd.serve``: the model as an HTTP service (FastAPI + uvicorn; the ``serve`` extra). docs/serving.md.

    app        create_app: the endpoints (/v1/rerank, /v1/score, /v1/explain, /v1/search, /v1/documents,
               /health, /metrics), one-line error bodies, the batcher's lifetime
    schemas    the pydantic request and response bodies (the OpenAPI schema)
    batching   DynamicBatcher: concurrent requests for one head in one forward, off the event loop, bounded
    engine     ModelEngine: what the checkpoint serves, and the batched work (the library's own API)
    store      DocumentStore: ids, texts and vectors, each change written atomically
    security   the API key (constant time) and the body-size limit, before any parsing
    metrics    Prometheus counters and histograms of one server
    settings   ServeSettings: the limits and batching flags

Nothing here is imported by ``import ugd``: fastapi is an optional dependency.
"""
