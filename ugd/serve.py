"""``python -m ugd.serve`` (also ``ugd-serve``): a trained checkpoint as an HTTP service.

    python -m ugd.serve --model outputs/ugd-demo --doc_vectors store.safetensors      # http://127.0.0.1:8000
    curl -s localhost:8000/v1/rerank -H 'Content-Type: application/json' \\
         -d '{"query": "red shoes", "documents": ["acme red shoes", "blue jacket"]}'

Endpoints, batching, limits, auth and scaling out: docs/serving.md. The app lives in
``ugd.serving.http`` (FastAPI + uvicorn: the ``serve`` extra).

It binds 127.0.0.1 unless ``--host`` says otherwise. ``--api_key`` (or ``$UGD_API_KEY``) makes every
``/v1`` call need ``Authorization: Bearer <key>``. The model is read from safetensors only: a
checkpoint with pickled weights is refused. SIGTERM (or Ctrl-C) stops accepting connections, lets the
requests in flight finish (up to ``--drain_timeout`` seconds), then ends the process by that signal
(uvicorn re-raises it once drained: status 143 in a shell, as a supervisor expects).

A problem with the arguments, the checkpoint or the store is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import warnings

import torch

from ._extras import install_hint
from ._files import atomic_text_file
from .model import UGDModel
from .predict import DTYPES, read_checkpoint_config, read_inputs, resolve_device, set_threads
from .serving.inference import DEFAULT_BATCH_TOKENS

PROG = "ugd.serve"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ugd.serve", description="Serve a UGD checkpoint over HTTP "
                                "(docs/serving.md).")
    a = p.add_argument
    a("--model", required=True, help="A UGD checkpoint folder (python -m ugd.train's output, safetensors).")
    a("--doc_vectors", "--doc-vectors", default=None, help="The document store file for /v1/search and "
      "/v1/documents (safetensors; created empty when it does not exist; every change rewrites it atomically).")
    a("--documents", default=None, help="JSON Lines of {\"id\"?, \"document\"}: added to --doc_vectors at start "
      "(ids missing from the store are encoded; a record without an id gets its position in the file, from 0).")
    a("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    a("--port", type=int, default=8000, help="Port (0: any free port; see --port_file).")
    a("--port_file", default=None, help="Write the bound port to this file once the server listens.")
    a("--api_key", default=None, help="Require 'Authorization: Bearer KEY' on every /v1 call (default: "
      "$UGD_API_KEY if set).")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible, else cpu).")
    a("--dtype", default="auto", choices=DTYPES, help="dtype the model is loaded in.")
    a("--threads", type=int, default=None, help="CPU threads for the model (default: as ugd.predict).")
    a("--positive_label", type=int, default=None, help="The class whose probability is the relevance score "
      "(default: the last class).")
    a("--max_batch_size", type=int, default=64, help="Items (pairs, texts) per model forward.")
    a("--max_wait_ms", type=float, default=2.0, help="How long a request waits for others to share its forward.")
    a("--max_queue", type=int, default=256, help="Requests waiting for the model before the server answers 503.")
    a("--max_documents", type=int, default=1000, help="Documents or pairs per call (more: 413).")
    a("--max_chars", type=int, default=20000, help="Characters per text (more: 413).")
    a("--max_body_bytes", type=int, default=8 << 20, help="Bytes per request body (more: 413).")
    a("--max_new_tokens", type=int, default=64, help="Length limit of a generated reason.")
    a("--batch_tokens", type=int, default=DEFAULT_BATCH_TOKENS, help="Token budget of a packed forward.")
    a("--drain_timeout", type=float, default=30.0, help="Seconds SIGTERM waits for the requests in flight.")
    a("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    a("--access_log", action="store_true", help="Log every request (uvicorn's access log).")
    return p


def load_model(path: str, device, dtype: str) -> UGDModel:
    """The checkpoint from safetensors only (``use_safetensors=True``, and a pickled backbone is refused first)."""
    from .serving.http.engine import check_safetensors_only

    config = read_checkpoint_config(path)
    check_safetensors_only(path, config.paradigm_impl.two_backbones)
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "use_safetensors": True}
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}
    model = UGDModel.from_pretrained(path, **kwargs).eval()
    if model.tokenizer is None:
        raise ValueError(f"--model {path} holds no tokenizer; save the checkpoint with its tokenizer")
    return model


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a kept-alive connection waits ~40 ms per response (Nagle against the client's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: any free one)") \
            from None
    sock.listen(2048)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_documents(engine, path: str) -> int:
    """Adds the records of a JSON Lines file to the store (those whose id it lacks); returns how many."""
    records, _ = read_inputs(path, ("document",))
    items = [(str(r.get("id", n)), r["document"]) for n, r in enumerate(records)]
    new = [(i, t) for i, t in items if i not in engine.store]
    if new:
        engine.store.check_upsert(new)
        vectors = engine.run(("document_vectors",), [t for _, t in new])
        engine.store.upsert(new, torch.stack(vectors))
    return len(new)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # transformers' deprecation notice about generate's past_key_values (ugd.serving.generate passes the
    # prefilled cache that way; nothing an operator can change) came with every reason batch: the
    # library's catch_warnings blocks reset Python's once-per-place memory, so "once" would not hold it
    warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
    try:
        import uvicorn

        from .serving.http.app import create_app
        from .serving.http.engine import ModelEngine
        from .serving.http.settings import ServeSettings
        from .serving.http.store import DocumentStore
    except ImportError as e:
        raise ValueError(f"ugd serve needs the 'serve' extra ({e.name} is missing): {install_hint('serve')}") \
            from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("UGD_API_KEY") or None
    settings = ServeSettings(model_name=os.path.basename(os.path.normpath(args.model)), api_key=api_key,
                             max_documents=args.max_documents, max_chars=args.max_chars,
                             max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_new_tokens=args.max_new_tokens).check()
    if args.documents and not args.doc_vectors:
        raise ValueError("--documents adds to the store: name the store file with --doc_vectors")
    cfg = read_checkpoint_config(args.model)  # cheap checks before the (possibly long) load
    if args.positive_label is not None and not 0 <= args.positive_label < cfg.num_labels:
        raise ValueError(f"--positive_label must be a class index in [0, {cfg.num_labels}), got {args.positive_label}")
    device = resolve_device(args.device)
    set_threads(args.threads)
    sock = _bind(args.host, args.port)  # before loading: a taken port fails in a second, not after the load
    model = load_model(args.model, device, args.dtype)
    engine = ModelEngine(model, batch_tokens=args.batch_tokens, positive_label=args.positive_label)
    if args.doc_vectors:
        engine.require("documents")
        engine.store = DocumentStore.open(args.doc_vectors, model)
        if args.documents:
            n = load_documents(engine, args.documents)
            print(f"{PROG}: added {n} documents from {args.documents}", file=sys.stderr)
    app = create_app(engine, settings)
    host, port = sock.getsockname()[:2]
    if not _is_loopback(args.host) and api_key is None:
        print(f"{PROG}: warning: listening on {args.host} without --api_key: anyone who reaches this port can use "
              "the model and change the store", file=sys.stderr)
    if args.port_file:
        with atomic_text_file(args.port_file) as f:
            f.write(f"{port}\n")
    docs = f", {len(engine.store)} documents in {args.doc_vectors}" if engine.store is not None else ""
    print(f"{PROG}: serving {args.model} (paradigm {engine.paradigm}: {', '.join(engine.modes)}{docs}) on "
          f"http://{host}:{port}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(cli())
