"""``python -m ugd.predict``: score or explain (query, document) pairs of a JSONL file with a UGD checkpoint.

    python -m ugd.predict --model out/demo --input pairs.jsonl --output scored.jsonl        # two-tower (also: ugd-predict ...)
    python -m ugd.predict --model out/demo --input pairs.jsonl --mode single-tower
    python -m ugd.predict --model out/demo --input pairs.jsonl --mode reason --max_new_tokens 48
    cat pairs.jsonl | python -m ugd.predict --model out/demo --input - > scored.jsonl

    # two-tower with stored document vectors (docs/spec.md section 7: documents once, stored):
    python -m ugd.predict --model out/demo --input corpus.jsonl --mode documents --doc_vectors docs.safetensors
    python -m ugd.predict --model out/demo --input pairs.jsonl --doc_vectors docs.safetensors

    # the documents of a large corpus encoded by n processes or machines, then merged (ugd.serving.doc_shards):
    python -m ugd.predict --model out/demo --input corpus.jsonl --mode documents \\
        --doc_vectors docs.safetensors --shard 0/2
    python -m ugd.predict --model out/demo --input corpus.jsonl --mode documents \\
        --doc_vectors docs.safetensors --shard 1/2
    python -m ugd.predict merge-shards --doc_vectors docs.safetensors docs.part-*-of-00002.safetensors

Input: JSON Lines, one object a line with the strings "query" and "document" (mode ``documents``
needs only "document"). Other keys ("id", "label", ...) pass through to the output unchanged. Blank
lines are skipped. A malformed line (bad JSON, not an object, a missing, non-string or empty text)
stops the run with ``path:line: problem`` and exit status 2; with ``--skip_bad`` it is skipped and
counted in the summary on stderr instead (so an output line is then not the input line of the same
number: keep an "id" key to join them).

Output: one JSON line per kept record, in input order, the record plus

    two-tower, single-tower   "probs": class probabilities, "pred": their argmax,
                              "score": probs[--positive_label]
    reason                    "reason": the generated text (greedy unless --do_sample)
    documents                 nothing: the vectors go to --doc_vectors

(an input key of the same name, such as a gold "reason", is replaced).

``--doc_vectors PATH`` (two-tower and documents modes): a ``ugd.DocumentVectors`` safetensors file.
When it exists it is loaded and checked against the model (vectors of another checkpoint are
refused); documents not in it yet are encoded, added and the file is saved back (atomically). Stored
documents never go through the backbone again: only the queries are encoded. Several processes may
extend one file at once: the write takes a lock (``PATH.lock``) and merges in what other processes
stored meanwhile, so no documents are lost. A write is atomic (all or nothing, even under kill -9).

``--shard i/n`` (mode documents): this process encodes only shard i of the input's distinct documents
(n contiguous slices in first-seen order) into ``STORE.part-IIIII-of-NNNNN.safetensors``; ``--shard
auto`` takes i/n from RANK/WORLD_SIZE (torchrun, accelerate launch). ``merge-shards --doc_vectors STORE
PARTS...`` checks that the parts are all n shards of one checkpoint and one corpus and writes the store
an unsharded run would have written (docs/inference.md, "Sharded document encoding").

``--threads N``: CPU threads of this process (torch.set_num_threads). Default: ``OMP_NUM_THREADS``
when set, else half the usable cores, at most 4 (``default_threads``): a thread per core in each of
several processes on one machine oversubscribes it and every process becomes ~100x slower, while one
process loses little with half the cores.

A checkpoint whose outputs are not finite (NaN or inf: damaged weights, or a dtype overflow) is an
error: nothing is written, so the output never holds a wrong prediction or invalid JSON.

Output paths are checked before any work (docs/training.md, "Inputs and outputs"): ``--output`` and
``--doc_vectors`` must not be the input, the checkpoint or each other (``merge-shards``: not one of its
parts), nor a folder or unwritable.

Exit status: 0 on success, 2 for a problem with the arguments, the checkpoint or the input (one line
on stderr). A summary (records, mode, seconds, pairs/s) goes to stderr at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from . import paradigms
from ._output_paths import output_problems
from .checkpoint import CONFIG_NAME
from .data.records import MAX_KEPT_ERRORS, BadRecord, DataError, ReadStats, decode_lines, json_object, write_jsonl
from .model import UGDConfig, UGDModel
from .serving.doc_shards import build_part, launcher_device, merge_parts, parse_shard
from .serving.doc_vectors import DocumentVectors
from .serving.inference import DEFAULT_BATCH_TOKENS, unique_texts

MODES = ("two_tower", "single_tower", "reason", "documents")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STDIO = "-"
SCORE_CHUNK = 65536  # pairs scored at once from stored vectors: bounds the [N, H] gathers


@dataclass
class PredictArguments:
    model: str = field(metadata={"help": "A UGD checkpoint folder (written by python -m ugd.train or "
                                         "UGDModel.save_pretrained; it holds ugd_config.json and the tokenizer)."})
    input: str = field(metadata={"help": "JSON Lines of {\"query\", \"document\", ...}; - reads stdin."})
    output: str = field(default=STDIO, metadata={"help": "Where the JSON Lines go; - (default) is stdout. A file is "
                                                         "written atomically."})
    mode: str = field(default="two-tower", metadata={
        "help": "two-tower (default), single-tower, reason, or documents (store document vectors in --doc_vectors "
                "and write nothing else). Underscores work too (two_tower)."})
    doc_vectors: str | None = field(default=None, metadata={
        "help": "A document-vector file (safetensors) to reuse and extend: two-tower and documents modes."})
    shard: str | None = field(default=None, metadata={
        "help": "i/n: encode only shard i (from 0) of n of the documents into a part file beside --doc_vectors "
                "(mode documents; merge the parts with: python -m ugd.predict merge-shards). auto: i/n from "
                "RANK/WORLD_SIZE (torchrun, accelerate launch)."})
    batch_tokens: int = field(default=DEFAULT_BATCH_TOKENS, metadata={
        "help": "Token budget of a packed batch (two-tower, single-tower, documents)."})
    batch_size: int = field(default=16, metadata={"help": "Pairs decoded together (reason mode)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length limit of a reason (reason mode)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample reasons instead of greedy decoding."})
    seed: int = field(default=0, metadata={"help": "Random seed of sampled reasons (--do_sample): same seed, same "
                                                   "input, same device -> same reasons."})
    device: str | None = field(default=None, metadata={
        "help": "cpu, cuda or cuda:N. Default: cuda when a CUDA device is visible, else cpu."})
    dtype: str = field(default="auto", metadata={
        "help": "dtype the model is loaded in: auto (the checkpoint's), float32, bfloat16 or float16."})
    positive_label: int | None = field(default=None, metadata={
        "help": "The class whose probability is \"score\". Default: the last class (\"match\" in binary data, the "
                "top grade of graded data), as ugd serve and model.rank."})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads (torch.set_num_threads). Default: $OMP_NUM_THREADS if set, else half the usable cores, "
                "at most 4, so that several processes on one machine do not oversubscribe it."})
    skip_bad: bool = field(default=False, metadata={
        "help": "Skip malformed input lines (counted on stderr) instead of stopping at the first one."})
    # nargs/const: a bare --progress means True; --no_progress is added by _make_parser
    progress: bool | None = field(default=None, metadata={
        "help": "Show progress bars (--progress / --no_progress). Default: only when stderr is a terminal.",
        "nargs": "?", "const": True})


def _make_parser():
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Defaults in the help, and the module docstring's examples as written."""

    parser = HfArgumentParser(PredictArguments, prog="python -m ugd.predict", description=__doc__,
                              formatter_class=Formatter)
    parser.add_argument("--no_progress", "--no-progress", dest="progress", action="store_false",
                        help="Hide progress bars.")
    return parser


def parse_args(argv: list[str] | None = None) -> PredictArguments:
    args, unknown = _make_parser().parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; see python -m ugd.predict --help")
    args.mode = check_mode(args.mode)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {args.dtype!r}")
    for name, minimum in (("batch_tokens", 1), ("batch_size", 1), ("max_new_tokens", 0), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < minimum:
            raise ValueError(f"--{name} must be >= {minimum}, got {getattr(args, name)}")
    if args.doc_vectors is not None and args.mode not in ("two_tower", "documents"):
        raise ValueError(f"--doc_vectors serves --mode two-tower and documents only (stored vectors are two-tower "
                         f"vectors); drop it for --mode {_show(args.mode)}")
    if args.mode == "documents":
        if args.doc_vectors is None:
            raise ValueError("--mode documents needs --doc_vectors PATH: the file the document vectors are stored in")
        if args.output != STDIO:
            raise ValueError("--mode documents writes only --doc_vectors; drop --output")
    if args.shard is not None:
        if args.mode != "documents":
            raise ValueError(f"--shard serves --mode documents only (it splits the encoding of a corpus's documents); "
                             f"drop it for --mode {_show(args.mode)}")
        args.shard = parse_shard(args.shard)
    # docs/training.md, "Inputs and outputs": no output replaces an input or another output
    problems = output_problems({"--output": args.output, "--doc_vectors": args.doc_vectors},
                               {"--input": args.input, "--model": args.model})
    if problems:
        raise ValueError(problems[0])
    return args


def check_mode(mode: str) -> str:
    m = mode.replace("-", "_")
    if m not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; expected one of {[_show(x) for x in MODES]}")
    return m


def _show(mode: str) -> str:
    return mode.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# checkpoint and device
# ---------------------------------------------------------------------------------------------


def read_checkpoint_config(path: str):
    """The checkpoint's ``UGDConfig``, read before the (possibly large) backbone is loaded."""
    if os.path.isfile(path):
        raise ValueError(f"--model {path} is a file, not a folder: name the checkpoint folder (it holds "
                         "ugd_config.json, the weights and the tokenizer)")
    if not os.path.isdir(path):
        raise ValueError(f"--model {path}: no such folder")
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise ValueError(f"--model {path} is not a UGD checkpoint: {CONFIG_NAME} is missing (train one with "
                         "python -m ugd.train, or write one with UGDModel.save_pretrained)")
    try:
        with open(cfg_file) as f:
            return UGDConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{cfg_file}: not a valid UGD config ({e})") from None


def check_servable(config: UGDConfig, mode: str) -> None:
    """A clear error when the checkpoint (its ``UGDConfig``) cannot serve ``mode``: the paradigm says what
    it serves (``ugd.paradigms``), and the config's options may narrow that."""
    impl, paradigm = config.paradigm_impl, config.paradigm
    usable = [m for m in MODES if m in impl.modes(config)]
    if mode not in usable:
        why = impl.why_not(config, [c for c in paradigms.MODE_NEEDS[mode] if c not in impl.serves(config)])
        raise ValueError(f"this checkpoint's paradigm {paradigm!r} has no head for --mode {_show(mode)}"
                         f"{' (' + why + ')' if why else ''}; use --mode {' or '.join(_show(m) for m in usable)}")


def resolve_device(name: str | None):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":  # ugd_ops has CPU and CUDA kernels only
        raise ValueError(f"--device {name!r}: UGD runs on cpu or cuda only")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def load_model(path: str, device, dtype: str, progress: bool | None = None):
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if device.type == "cuda":  # load straight onto the GPU instead of through host memory
        kwargs["device_map"] = {"": str(device)}
    # transformers' own "Loading weights" bar follows --progress too (it is a global switch: restore it)
    hide = progress is False or (progress is None and not sys.stderr.isatty())
    shown = hf_logging.is_progress_bar_enabled()
    if hide and shown:
        hf_logging.disable_progress_bar()
    try:
        model = UGDModel.from_pretrained(path, **kwargs).eval()
    finally:
        if hide and shown:
            hf_logging.enable_progress_bar()
    if model.tokenizer is None:
        raise ValueError(f"--model {path} holds no tokenizer (tokenizer.json / tokenizer_config.json); save the "
                         "checkpoint with its tokenizer (UGDModel.save_pretrained(path, tokenizer=...))")
    return model


# ---------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------


def _input_lines(path: str):
    if path == STDIO:
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream without bytes underneath (io.StringIO in tests, notebooks)
            for n, line in enumerate(sys.stdin, 1):
                yield n, line.rstrip("\r\n"), None
        else:
            yield from decode_lines(stream)
        return
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"cannot read --input {path}: {e.strerror}") from None
    with f:
        yield from decode_lines(f)


def _parse_line(text: str, fields: tuple[str, ...]) -> dict:
    """The record on one input line; ``BadRecord`` (skippable with --skip_bad) if it is malformed."""
    obj = json_object(text)
    need = " and ".join(repr(k) for k in fields)
    for key in fields:
        if key not in obj:
            raise BadRecord(f"missing field {key!r} (each record needs {need} strings)")
        value = obj[key]
        if not isinstance(value, str):
            raise BadRecord(f"field {key!r} must be a string, got {json.dumps(value, ensure_ascii=False)[:60]}")
        if not value.strip():
            raise BadRecord(f"field {key!r} is empty (or only whitespace); a matching score needs text on both sides")
    return obj


def read_inputs(path: str, fields: tuple[str, ...], *, skip_bad: bool = False):
    """The records of a JSONL file (``-``: stdin) that have non-empty string ``fields``, and a ``ReadStats``.

    A malformed line raises ``DataError`` (``path:line: problem``), or with ``skip_bad`` is counted.
    """
    shown = "<stdin>" if path == STDIO else path
    stats = ReadStats(path=shown, fmt="jsonl")
    records = []
    for n, text, problem in _input_lines(path):
        if text is not None and not text.strip():
            continue
        stats.read += 1
        try:
            if problem is not None:
                raise BadRecord(problem)
            records.append(_parse_line(text, fields))
        except BadRecord as e:
            if not skip_bad:
                raise DataError(shown, n, f"{e} (pass --skip_bad to skip and count malformed lines)") from None
            stats.skipped_malformed += 1
            if len(stats.errors) < MAX_KEPT_ERRORS:
                stats.errors.append(str(DataError(shown, n, str(e))))
    stats.kept = len(records)
    return records, stats


# ---------------------------------------------------------------------------------------------
# the modes
# ---------------------------------------------------------------------------------------------


def _open_store(model, path: str):
    if not os.path.exists(path):
        return DocumentVectors.empty(model)
    try:
        return DocumentVectors.load(path, model)
    except (ValueError, FileNotFoundError) as e:
        advice = "" if "delete it" in str(e) else \
            ". To rebuild it for this model, delete the file (or name a new one) and run again"
        raise ValueError(f"--doc_vectors {path}: {e}{advice}") from None


def _extend_store(model, store, path: str, documents: list[str], args) -> tuple:
    """Adds the documents not stored yet (the only ones encoded) and saves the file when anything was
    added (or it does not exist yet), merging in under a lock what other processes stored meanwhile.
    Returns (row of each document, number of new documents)."""
    before = len(store)
    rows = store.add(model, documents, batch_tokens=args.batch_tokens, show_progress=args.progress)
    added = len(store) - before
    if added or not os.path.exists(path):
        try:
            store.merge_into_file(path, model)  # only appends: ``rows`` stay valid
        except ValueError as e:
            raise ValueError(f"--doc_vectors {path}: {e}") from None
    return rows, added


def score_with_store(model, records: list[dict], args) -> tuple:
    """Two-tower probabilities ``[N, C]`` from ``--doc_vectors``: each distinct query encoded once, each
    document looked up (encoded only when not stored yet), then the heads alone."""
    store = _open_store(model, args.doc_vectors)
    rows, added = _extend_store(model, store, args.doc_vectors, [r["document"] for r in records], args)
    queries, qi = unique_texts([r["query"] for r in records])
    qi = torch.tensor(qi, dtype=torch.int64)
    v_q = model.encode_queries(queries, batch_tokens=args.batch_tokens, show_progress=args.progress,
                               output_device=None)
    probs = torch.empty((len(records), model.config.num_labels), dtype=torch.float32)
    for lo in range(0, len(records), SCORE_CHUNK):
        hi = lo + SCORE_CHUNK
        probs[lo:hi] = model.score_pairs(v_q[qi[lo:hi].to(v_q.device)], store.vectors[rows[lo:hi]])
    return probs, store, added


def check_finite(probs, model_path: str) -> None:
    """Non-finite probabilities come from damaged weights (or an overflow): an error, never a prediction."""
    bad = int((~torch.isfinite(probs).all(-1)).sum())
    if bad:
        raise ValueError(f"the model produced non-finite scores (NaN or inf) for {bad} of {len(probs)} pairs: the "
                         f"weights in --model {model_path} are damaged (or overflow in this dtype); nothing was "
                         "written. Use another checkpoint, or --dtype float32")


def default_threads() -> int:
    """CPU threads when --threads is not given: half the usable cores, at most 4 (see the module docstring)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def set_threads(threads: int | None) -> int:
    """Applies --threads (or the default; $OMP_NUM_THREADS, which torch already follows, wins over it)."""
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            return torch.get_num_threads()
        threads = default_threads()
    torch.set_num_threads(threads)
    return threads


def _add_scores(records: list[dict], probs, positive_label: int) -> None:
    preds = probs.argmax(-1).tolist()
    for r, p, pred in zip(records, probs.tolist(), preds):
        r["probs"] = p
        r["pred"] = pred
        r["score"] = p[positive_label]


def _write(records: list[dict], path: str) -> None:
    if path != STDIO:
        write_jsonl(records, path)
        return
    out = sys.stdout
    for r in records:
        out.write(json.dumps(r, ensure_ascii=False, allow_nan=False))  # bare NaN is not JSON
        out.write("\n")
    out.flush()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Runs one prediction job; returns its summary (also printed to stderr)."""
    args = parse_args(argv)
    # everything cheap is checked before the model is loaded (which may take minutes)
    cfg = read_checkpoint_config(args.model)
    check_servable(cfg, args.mode)
    if args.positive_label is None:
        args.positive_label = cfg.num_labels - 1
    if args.mode in ("two_tower", "single_tower") and not 0 <= args.positive_label < cfg.num_labels:
        raise ValueError(f"--positive_label must be a class index in [0, {cfg.num_labels}), got {args.positive_label}")
    if args.shard is not None and args.device is None:
        args.device = launcher_device()  # torchrun on a GPU machine: one GPU per local process
    device = resolve_device(args.device)
    set_threads(args.threads)
    fields = ("document",) if args.mode == "documents" else ("query", "document")
    records, stats = read_inputs(args.input, fields, skip_bad=args.skip_bad)

    t0 = time.time()
    model = load_model(args.model, device, args.dtype, args.progress)
    t1 = time.time()
    t_load = t1 - t0
    summary = {"mode": _show(args.mode), "records": len(records), "skipped": stats.skipped_malformed}
    if args.shard is not None:
        part = build_part(model, args.doc_vectors, [r["document"] for r in records], *args.shard,
                          batch_tokens=args.batch_tokens, show_progress=args.progress)
    elif args.mode == "documents":
        store = _open_store(model, args.doc_vectors)
        _, added = _extend_store(model, store, args.doc_vectors, [r["document"] for r in records], args)
    elif args.mode == "reason":
        torch.manual_seed(args.seed)  # seeds CUDA too
        reasons = model.generate_reason([(r["query"], r["document"]) for r in records],
                                        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                        batch_size=args.batch_size, show_progress=args.progress)
        for r, text in zip(records, reasons):
            r["reason"] = text
    elif args.doc_vectors is not None:
        probs, store, added = score_with_store(model, records, args)
        check_finite(probs, args.model)
        _add_scores(records, probs, args.positive_label)
    else:
        probs = model.predict([(r["query"], r["document"]) for r in records], mode=args.mode,
                              batch_tokens=args.batch_tokens, show_progress=args.progress)
        check_finite(probs, args.model)
        _add_scores(records, probs, args.positive_label)
    seconds = time.time() - t1
    if args.mode != "documents":
        _write(records, args.output)
    summary.update(seconds=seconds, load_seconds=t_load)

    unit = "documents" if args.mode == "documents" else "pairs"
    lines = [f"ugd.predict: {len(records)} records, mode {_show(args.mode)}, {seconds:.2f} s "
             f"({len(records) / max(seconds, 1e-9):.1f} {unit}/s; model loaded in {t_load:.1f} s on {device})"]
    if stats.skipped_malformed:
        lines.append(f"ugd.predict: {stats}")
    if not records:  # not an error (an empty result is one), but often a sign that the input is not the one meant
        done = "stored" if args.mode == "documents" else "scored"
        lines.append(f"ugd.predict: warning: {stats.path} holds no records; nothing was {done}")
    if args.shard is not None:
        summary.update(part)
        done = "kept as it was (built before)" if part.get("kept") else f"{part['encoded']} encoded"
        lines.append(f"ugd.predict: shard {part['shard']}: {part['documents']} of {part['corpus']} documents "
                     f"({done}) in {part['part']}")
    elif args.doc_vectors is not None:
        summary.update(stored=len(store), added=added)
        lines.append(f"ugd.predict: stored {len(store)} documents ({added} new) in {args.doc_vectors}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return summary


def merge_main(argv: list[str] | None = None) -> dict:
    """``python -m ugd.predict merge-shards --doc_vectors STORE PARTS...``; returns its summary."""
    parser = argparse.ArgumentParser(
        prog="python -m ugd.predict merge-shards",
        description="Merges the part files of python -m ugd.predict --mode documents --shard i/n into one store, "
                    "after checking that they are all n shards of one checkpoint and one corpus. The store equals "
                    "what one unsharded run writes; an existing store of the same checkpoint is extended.")
    parser.add_argument("parts", nargs="+", help="The part files (STORE.part-IIIII-of-NNNNN.safetensors), any order.")
    parser.add_argument("--doc_vectors", "--doc-vectors", required=True, help="The store to write (or extend).")
    args = parser.parse_args(argv)
    problems = output_problems({"--doc_vectors": args.doc_vectors},
                               {f"part {i + 1}": p for i, p in enumerate(args.parts)})
    if problems:
        raise ValueError(problems[0])
    summary = merge_parts(args.parts, args.doc_vectors)
    print(f"ugd.predict: merged {summary['parts']} shards ({summary['documents']} documents) into "
          f"{summary['store']}: stored {summary['stored']} documents ({summary['added']} new)", file=sys.stderr,
          flush=True)
    return summary


def cli(argv: list[str] | None = None) -> int:
    """The console entry: a problem with the arguments, the checkpoint or the input is one line on stderr
    and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["merge-shards"]:
            merge_main(argv[1:])
        else:
            main(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        print(f"ugd.predict: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that Python's exit-time flush does not fail again
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
