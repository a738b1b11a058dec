"""Every registered paradigm on the built-in demo data, same steps, same seed: ACC/AUC of each head and
the training time (the table in docs/paradigms.md). Not collected by pytest; run by hand:

    python benchmarks/compare_paradigms.py                          # every registered paradigm, the demo preset
    python benchmarks/compare_paradigms.py --steps 300 --only d2llm ugd-ttm
    python benchmarks/compare_paradigms.py --row 'd2llm, ugd-ttm teacher=d2llm:{"teacher": "{out}/ugd-ttm"}'

Each row is one ``python -m ugd.train`` process (the demo preset: tiny random-init Qwen2, 2000/400
generated pairs, batch 32, lr 2e-3 cosine, seed 0, 1 CPU thread) with ``--max_steps`` fixed, no
evaluation during training, no checkpoints, no reasons; the final evaluation and the training time come
from ``ugd_run_summary.json``. Results accumulate in ``<out>/results.json`` (a row run again replaces
its old result); the markdown table is printed and written to ``<out>/table.md``.

``--row LABEL=PARADIGM[:OPTIONS]`` adds a row with ``--paradigm_options OPTIONS`` (JSON; ``{out}``
is replaced by the output folder, so a row can use an earlier row's model, e.g. as a teacher).

This is the quick demo table of docs/paradigms.md. The study on real data (a real backbone, fixed
data subsets, several seeds, test-set evaluation with bootstrap intervals, resumable) is
``python -m ugd.study`` (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_row(label: str, paradigm: str, options: str | None, args) -> dict:
    out_dir = os.path.join(args.out, label.replace(" ", "_").replace(",", "").replace("/", "_"))
    cmd = [sys.executable, "-m", "ugd.train", "--paradigm", paradigm, "--output_dir", out_dir, "--seed", str(args.seed),
           "--max_steps", str(args.steps), "--eval_strategy", "no", "--save_strategy", "no", "--num_reasons", "0",
           "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "50", *args.train_args]
    if options:
        cmd += ["--paradigm_options", options.replace("{out}", args.out)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"label": label, "paradigm": paradigm, "options": options, "error": tail, "wall_seconds": wall}
    with open(os.path.join(out_dir, "ugd_run_summary.json")) as f:
        summary = json.load(f)
    ev = summary.get("eval", {})
    return {"label": label, "paradigm": paradigm, "options": options, "steps": summary.get("global_step"),
            "train_seconds": summary.get("train_seconds"), "wall_seconds": wall,
            **{k: ev.get(f"eval_{k}") for k in ("acc_t", "auc_t", "acc_s", "auc_s")},
            "versions": summary.get("versions"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = ["| paradigm | two-tower ACC | two-tower AUC | single-tower ACC | single-tower AUC | train time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: see results.json | | | | |")
            continue
        lines.append(f"| {r['label']} | {fmt(r['acc_t'])} | {fmt(r['auc_t'])} | {fmt(r['acc_s'])} | "
                     f"{fmt(r['auc_s'])} | {fmt(r['train_seconds'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ugd import paradigms

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=756, help="optimizer steps per row (756 = the demo's 12 epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/compare-paradigms")
    p.add_argument("--only", nargs="*", help="registered paradigms to run (default: all); [] for --row rows only")
    p.add_argument("--row", action="append", default=[], help="LABEL=PARADIGM[:OPTIONS_JSON], repeatable")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more python -m ugd.train arguments")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    rows = [(n, n, None) for n in (paradigms.names() if args.only is None else args.only)]
    for spec in args.row:
        label, _, rest = spec.partition("=")
        name, _, options = rest.partition(":")
        rows.append((label, name, options or None))

    results_file = os.path.join(args.out, "results.json")
    results = {}
    if os.path.isfile(results_file):
        with open(results_file) as f:
            results = {r["label"]: r for r in json.load(f)}
    for label, name, options in rows:
        print(f"[compare] {label}: python -m ugd.train --paradigm {name} ({args.steps} steps) ...", flush=True)
        r = run_row(label, name, options, args)
        results[label] = r
        print(f"[compare] {label}: " + ("FAILED" if "error" in r else
              f"ACC_t {fmt(r['acc_t'])} AUC_t {fmt(r['auc_t'])} ACC_s {fmt(r['acc_s'])} AUC_s {fmt(r['auc_s'])} "
              f"train {fmt(r['train_seconds'], '.0f')} s"), flush=True)
        with open(results_file, "w") as f:
            json.dump(list(results.values()), f, indent=2)
    text = table(list(results.values()))
    host = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    text += f"\n\n{args.steps} steps per row, seed {args.seed}, {host}."
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
