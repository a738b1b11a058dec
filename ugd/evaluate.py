"""``python -m ugd.evaluate``: a UGD checkpoint evaluated on a labelled file, in every mode it serves.

    python -m ugd.evaluate --model out/demo --input dev.jsonl --output report.json        # also: ugd-evaluate ...
    python -m ugd.evaluate --model out/demo --input dev.tsv --modes two-tower single-tower --max_records 1000
    python -m ugd.evaluate --model out/demo --input esnli_dev.csv --reason_samples 200 --predictions preds.jsonl

Modes: ``two-tower`` and ``single-tower`` (classification: ACC, AUC, macro-F1 and the confusion
matrix, rows = true label, columns = predicted) and ``reason`` (the generated reasons against the
gold ones: ROUGE-L and corpus BLEU, see ``ugd.serving.reason_scores``). By default every one of them the
checkpoint's paradigm serves; naming one it does not serve is an error naming those it does.

Input: any format of ``ugd.data.records.read_records`` (``--data_format``, default auto); every record needs a
label in ``[0, num_labels)`` of the checkpoint. ``--max_records N`` keeps the first N records.

Reasons: generated (greedy, batched, KV cache: ``ugd.serving.generate``) for the first ``--reason_samples``
records of the file -- the same records on every run, whatever the model -- and scored on those of
them that have a gold reason (a ``references`` list, else ``reason``); the others are counted in the
report (``without_gold_reason``). ``--reason_samples 0`` generates nothing.

Throughput: ``pairs_per_second`` and ``seconds`` per mode time the model work only (tokenization,
forward passes, decoding), not loading the model or reading the file; pairs go through in batches of
``--batch_size`` (the report says which, and on which device). In two-tower mode each distinct query
and document of a batch is encoded once.

Outputs: the report (``--output``, JSON, written atomically; a table of it is printed at the end)::

    {"model", "input", "paradigm", "num_labels", "records", "batch_size", "device", "data",
     "modes": {"two-tower": {"acc", "auc", "macro_f1", "confusion", "pairs_per_second", "seconds", "records"},
               "single-tower": {...},
               "reason": {"rouge_l", "bleu", "samples", "generated", "without_gold_reason",
                          "max_new_tokens", "bleu_signature", "pairs_per_second", "seconds"}},
     "versions": {...}, "date": "YYYY-MM-DD HH:MM UTC"}

and, with ``--predictions FILE``, one JSON line per evaluated record in input order::

    {"index": i, "label": y, "probs": {"two-tower": [...], "single-tower": [...]},
     "generated_reason": ..., "gold_reason": ..., "rouge_l": ...}     # the last three: reason records only

(``rouge_l`` is that record's ROUGE-L F-measure, null without a gold reason). Values that do not
exist (an AUC when the file holds one class) are null.

Output paths are checked before any work (docs/training.md, "Inputs and outputs"): ``--output`` and
``--predictions`` must not be the input, the checkpoint or each other, nor a folder or unwritable.

Exit status: 0 on success, 2 for a problem with the arguments, the checkpoint or the input (one line
``ugd.evaluate: error: ...`` on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from importlib import metadata

import torch
from tqdm.auto import tqdm

from . import paradigms
from ._files import atomic_text_file
from ._output_paths import output_problems
from .data.records import read_records, write_jsonl
from .predict import load_model, read_checkpoint_config, resolve_device, set_threads
from .serving.generate import generate_reason
from .serving.inference import as_pairs, check_count, predict, tokenizer_of, tqdm_disable
from .serving.reason_scores import ReasonScoresUnavailable, gold_references, require, score_reasons
from .training.metrics import accuracy, confusion_matrix, macro_f1, roc_auc

#: the modes evaluated, in report order (``ugd.paradigms`` names them with underscores)
EVAL_MODES = ("two-tower", "single-tower", "reason")
SCORING_MODES = ("two-tower", "single-tower")


def _show(mode: str) -> str:
    return mode.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------------------------


def served_modes(paradigm, config) -> list[str]:
    """The evaluation modes a ``Paradigm`` serves for ``config`` (hyphenated, in report order)."""
    usable = {_show(m) for m in paradigm.modes(config)}
    return [m for m in EVAL_MODES if m in usable]


def resolve_modes(paradigm, config, modes=None) -> list[str]:
    """``modes`` (hyphens or underscores) checked against what the paradigm serves; None: all it serves."""
    served = served_modes(paradigm, config)
    if not served:
        raise ValueError(f"paradigm {paradigm.name!r} serves none of the evaluated modes {list(EVAL_MODES)}")
    if modes is None:
        return served
    if isinstance(modes, str):
        modes = [modes]
    wanted = []
    for m in modes:
        shown = _show(m) if isinstance(m, str) else m
        if shown not in EVAL_MODES:
            raise ValueError(f"unknown mode {m!r}; the modes are {' '.join(EVAL_MODES)}")
        if shown not in served:
            raise ValueError(f"paradigm {paradigm.name!r} cannot serve mode {shown}; it serves: {' '.join(served)}")
        if shown not in wanted:
            wanted.append(shown)
    if not wanted:
        raise ValueError(f"no mode to evaluate; paradigm {paradigm.name!r} serves: {' '.join(served)}")
    return [m for m in EVAL_MODES if m in wanted]


# ---------------------------------------------------------------------------------------------
# the library function
# ---------------------------------------------------------------------------------------------


def _finite_or_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


@contextlib.contextmanager
def _with_tokenizer(model, tokenizer):
    """``model.tokenizer`` set to ``tokenizer`` for the block (ugd.serving.inference reads it from the model)."""
    saved = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    try:
        yield
    finally:
        model.tokenizer = saved


def _score_mode(model, pairs, labels, mode, batch_size, bar) -> tuple[dict, list]:
    chunks = []
    seconds = 0.0
    for lo in range(0, len(pairs), batch_size):
        t = time.perf_counter()
        chunks.append(predict(model, pairs[lo: lo + batch_size], mode.replace("-", "_"), show_progress=False))
        seconds += time.perf_counter() - t
        bar.update(len(chunks[-1]))
    probs = torch.cat(chunks) if chunks else torch.empty((0, model.config.num_labels))
    bad = int((~torch.isfinite(probs).all(-1)).sum())
    if bad:
        raise ValueError(f"the model produced non-finite scores (NaN or inf) for {bad} of {len(probs)} pairs in "
                         f"{mode} mode: its weights are damaged (or overflow in this dtype)")
    # log-probabilities are logits with the same softmax, so ugd.training.metrics gets exactly these probabilities
    logits = probs.double().log()
    y = torch.tensor(labels, dtype=torch.int64)
    result = {
        "acc": _finite_or_none(accuracy(logits, y)),
        "auc": _finite_or_none(roc_auc(logits, y)),
        "macro_f1": _finite_or_none(macro_f1(logits, y)),
        "confusion": confusion_matrix(logits, y, model.config.num_labels).tolist(),
        "pairs_per_second": len(pairs) / seconds if seconds > 0 else None,
        "seconds": seconds,
        "records": len(pairs),
    }
    return result, probs.tolist()


def _reason_mode(model, tokenizer, records, reason_samples, max_new_tokens, batch_size, layout, bar):
    chosen = records[:reason_samples]
    t = time.perf_counter()
    texts = []
    for lo in range(0, len(chosen), batch_size):
        batch = chosen[lo: lo + batch_size]
        texts += generate_reason(model, tokenizer, [(r["query"], r["document"]) for r in batch],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, layout=layout,
                                 show_progress=False)
        bar.update(len(batch))
    seconds = time.perf_counter() - t
    refs = [gold_references(r) for r in chosen]
    scored = [i for i, g in enumerate(refs) if g]
    if scored:
        scores = score_reasons([texts[i] for i in scored], [refs[i] for i in scored])
    else:  # nothing to score: no need for the scoring packages either
        scores = {"rouge_l": None, "bleu": None, "per_sample_rouge_l": [], "bleu_signature": None}
    per_sample = [None] * len(chosen)
    for i, s in zip(scored, scores["per_sample_rouge_l"]):
        per_sample[i] = s
    result = {
        "rouge_l": scores["rouge_l"],
        "bleu": scores["bleu"],
        "samples": len(scored),
        "generated": len(chosen),
        "without_gold_reason": len(chosen) - len(scored),
        "max_new_tokens": max_new_tokens,
        "bleu_signature": scores["bleu_signature"],
        "pairs_per_second": len(chosen) / seconds if seconds > 0 and chosen else None,
        "seconds": seconds,
    }
    extra = [{"generated_reason": text, "gold_reason": (g[0] if g else None), "rouge_l": s}
             for text, g, s in zip(texts, refs, per_sample)]
    return result, extra


def evaluate_model(model, tokenizer, records, modes=None, *, reason_samples: int = 64, max_new_tokens: int = 48,
                   batch_size: int = 32, layout=None, show_progress: bool | None = None) -> tuple[dict, list[dict]]:
    """Evaluates ``model`` (a ``UGDModel``) on labelled ``records`` in ``modes``.

    Args:
        tokenizer: the model's tokenizer (None: ``model.tokenizer``).
        records: ``{"query", "document", "label", "reason"?, "references"?}`` dicts (``ugd.data.records.read_records``);
            every label an int in ``[0, num_labels)``.
        modes: some of ``"two-tower"``, ``"single-tower"``, ``"reason"`` (underscores work too); None: every
            one the model's paradigm serves.
        reason_samples: reasons are generated for the first this many records (0: none) and scored on those
            with a gold reason.
        max_new_tokens: length limit of a generated reason.
        batch_size: pairs per batch, in every mode.
        layout: the ``LayoutConfig`` of the reason prompts (None: the model's).
        show_progress: tqdm bars on stderr (None: only on a terminal).

    Returns:
        ``(report, predictions)``: the report (``paradigm``, ``num_labels``, ``records``, ``batch_size``,
        ``device``, ``modes``: per mode its metrics; see the module docstring) and one dict per record
        (``index``, ``label``, ``probs`` per scoring mode, and the reason fields for the reason records).

    Raises:
        ValueError: an unknown mode or one the paradigm cannot serve, bad counts, unlabelled records or
            labels out of range. ``ugd.serving.reason_scores.ReasonScoresUnavailable``: reasons asked for without
            rouge-score / sacrebleu installed.
    """
    modes = resolve_modes(model.paradigm, model.config, modes)
    check_count("reason_samples", reason_samples, minimum=0)
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    check_count("batch_size", batch_size, minimum=1)
    records = list(records)
    num_labels = model.config.num_labels
    labels = []
    for i, r in enumerate(records):
        y = r.get("label") if hasattr(r, "get") else None
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < num_labels:
            raise ValueError(f"record {i}: label {y!r} is not a class index in [0, {num_labels}) of this model; "
                             "evaluation needs a label on every record")
        labels.append(y)
    pairs = as_pairs([(r["query"], r["document"]) for r in records])
    if "reason" in modes and reason_samples > 0:
        require()  # before any model work
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(model)

    report = {"paradigm": model.config.paradigm, "num_labels": num_labels, "records": len(records),
              "batch_size": batch_size, "device": str(model.head_device), "modes": {}}
    predictions = [{"index": i, "label": y, "probs": {}} for i, y in enumerate(labels)]
    with _with_tokenizer(model, tokenizer):
        for mode in modes:
            if mode == "reason":
                n = min(reason_samples, len(records))
                with tqdm(total=n, unit="pair", desc="reason", disable=tqdm_disable(show_progress)) as bar:
                    result, extra = _reason_mode(model, tokenizer, records, n, max_new_tokens, batch_size, layout, bar)
                for p, e in zip(predictions, extra):
                    p.update(e)
            else:
                with tqdm(total=len(pairs), unit="pair", desc=mode, disable=tqdm_disable(show_progress)) as bar:
                    result, probs = _score_mode(model, pairs, labels, mode, batch_size, bar)
                for p, row in zip(predictions, probs):
                    p["probs"][mode] = row
            report["modes"][mode] = result
    return report, predictions


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _make_parser() -> argparse.ArgumentParser:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Defaults in the help, and the module docstring's examples as written."""

    p = argparse.ArgumentParser(prog="python -m ugd.evaluate", description=__doc__, formatter_class=Formatter)
    p.add_argument("--model", required=True, help="A UGD checkpoint folder (python -m ugd.train writes one).")
    p.add_argument("--input", required=True, help="The labelled data file.")
    p.add_argument("--data_format", default="auto", help="auto, jsonl, lcqmc, qqp or nli (see ugd.data.records).")
    p.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                   help="Some of two-tower single-tower reason. Default: every one the checkpoint's paradigm serves.")
    p.add_argument("--max_records", type=int, default=None, help="Evaluate only the first N records.")
    p.add_argument("--reason_samples", type=int, default=64,
                   help="Reasons are generated for the first N records (0: no reasons).")
    p.add_argument("--max_new_tokens", type=int, default=48, help="Length limit of a generated reason.")
    p.add_argument("--batch_size", type=int, default=32, help="Pairs per batch, in every mode.")
    p.add_argument("--output", default=None, help="Where the JSON report goes (written atomically).")
    p.add_argument("--predictions", default=None, help="Per-record JSON Lines: probabilities, reasons, ROUGE-L.")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda when visible, else cpu.")
    p.add_argument("--cpu_threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads). Default: $OMP_NUM_THREADS if set, else half the "
                        "usable cores, at most 4 (as ugd.predict).")
    p.add_argument("--skip_bad", action="store_true",
                   help="Skip malformed input lines (counted in the report) instead of stopping at the first one.")
    p.add_argument("--no_progress", "--no-progress", dest="progress", action="store_false", default=None,
                   help="Hide progress bars (default: shown when stderr is a terminal).")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = _make_parser().parse_args(argv)
    if args.modes is not None:
        for m in args.modes:
            if _show(m) not in EVAL_MODES:
                raise ValueError(f"unknown --modes value {m!r}; the modes are {' '.join(EVAL_MODES)}")
    for name, minimum in (("max_records", 1), ("reason_samples", 0), ("max_new_tokens", 1), ("batch_size", 1),
                          ("cpu_threads", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name} must be >= {minimum}, got {value}")
    return args


def read_labelled(path: str, fmt: str, num_labels: int, *, skip_bad: bool = False, max_records: int | None = None):
    """The labelled records of ``path`` (the first ``max_records``) and the ``ReadStats``; ValueError with
    one line for every problem (a missing file, ``file:line`` of a bad record, no records)."""
    if os.path.isdir(path):
        raise ValueError(f"--input {path} is a folder; name the data file")
    if not os.path.isfile(path):
        raise ValueError(f"--input {path}: no such file")
    try:
        records, stats = read_records(path, fmt=fmt, num_labels=num_labels, skip_bad=skip_bad, skip_hint="--skip_bad")
    except OSError as e:
        raise ValueError(f"cannot read --input {path}: {e.strerror or e}") from None
    if not records:
        raise ValueError(f"--input {path} holds no labelled records ({stats}); evaluation needs labels")
    if max_records is not None:
        records = records[:max_records]
    return records, stats


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("transformers", "ugd", "rouge-score", "sacrebleu"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_json_atomic(obj, path: str) -> None:
    """``obj`` as JSON at ``path``: a temp file in the same folder, then ``os.replace``."""
    with atomic_text_file(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_table(report: dict) -> str:
    """The report as a short text table."""
    lines = [f"{report['paradigm']} on {report['records']} records ({report.get('input', '')}), "
             f"batch {report['batch_size']}, {report['device']}"]
    modes = report["modes"]
    for mode in SCORING_MODES:
        if mode in modes:
            m = modes[mode]
            lines.append(f"  {mode:<13} ACC {_fmt(m['acc'])}  AUC {_fmt(m['auc'])}  macro-F1 {_fmt(m['macro_f1'])}"
                         f"  {_fmt(m['pairs_per_second'], 1)} pairs/s")
    if "reason" in modes:
        m = modes["reason"]
        note = f", {m['without_gold_reason']} without a gold reason" if m["without_gold_reason"] else ""
        lines.append(f"  {'reason':<13} ROUGE-L {_fmt(m['rouge_l'])}  BLEU {_fmt(m['bleu'], 2)}  on {m['samples']} "
                     f"samples{note}  {_fmt(m['pairs_per_second'], 1)} pairs/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Runs one evaluation; returns the report (written to ``--output`` when given, printed as a table)."""
    args = parse_args(argv)
    # everything cheap is checked before the model is loaded (which may take minutes); an output that is
    # an input, another output, a folder or unwritable would otherwise fail (or destroy data) at the end
    problems = output_problems({"--output": args.output, "--predictions": args.predictions},
                               {"--input": args.input, "--model": args.model})
    if problems:
        raise ValueError(problems[0])
    cfg = read_checkpoint_config(args.model)
    modes = resolve_modes(paradigms.get(cfg.paradigm), cfg, args.modes)
    if "reason" in modes and args.reason_samples > 0:
        require()
    device = resolve_device(args.device)
    set_threads(args.cpu_threads)
    records, stats = read_labelled(args.input, args.data_format, cfg.num_labels, skip_bad=args.skip_bad,
                                   max_records=args.max_records)

    t0 = time.time()
    model = load_model(args.model, device, "auto", args.progress)
    load_seconds = time.time() - t0
    report, predictions = evaluate_model(model, None, records, modes, reason_samples=args.reason_samples,
                                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                         show_progress=args.progress)
    report = {"model": args.model, "input": args.input, **report, "data": str(stats),
              "load_seconds": load_seconds, "versions": _versions(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if args.predictions:
        write_jsonl(predictions, args.predictions)
    if args.output:
        write_json_atomic(report, args.output)
    print(format_table(report), flush=True)
    return report


def cli(argv: list[str] | None = None) -> int:
    """The console entry: a problem with the arguments, the checkpoint or the input is one line on stderr
    and exit status 2."""
    try:
        main(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (ValueError, FileNotFoundError, ReasonScoresUnavailable) as e:  # DataError is a ValueError
        print(f"ugd.evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
