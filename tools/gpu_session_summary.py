"""The last step of tools/gpu_session.sh: gathers a session's results into at most three files under
OUT (session.json, bench.json, log.txt: the device tool brings back 8 files at most) and prints one
short table.

    python tools/gpu_session_summary.py WORK OUT
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

LOG_TAIL = 2 * 2**20  # bytes of each step's log kept in log.txt
STEP_ORDER = ("build", "info", "tests", "kernel-tests", "train", "predict", "bench")


def _steps(work: str) -> list[dict]:
    path = os.path.join(work, "steps.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _junit(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    total["failed_tests"] = failed[:50]
    return total


def _benchmarks(work: str) -> dict:
    merged = {"machine_info": None, "benchmarks": []}
    for path in sorted(glob.glob(os.path.join(work, "bench_*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        merged["machine_info"] = merged["machine_info"] or data.get("machine_info")
        for b in data.get("benchmarks", []):
            b["source"] = os.path.basename(path)
            merged["benchmarks"].append(b)
    return merged


def _train_rows(bench: dict) -> list[dict]:
    rows = []
    for b in bench["benchmarks"]:
        info = b.get("extra_info", {})
        if not str(b.get("group", "")).startswith("train-step"):
            continue
        rows.append({"impl": info.get("impl"), "shape": info.get("shape"), "median_s": info.get("median_s"),
                     "samples_per_s": info.get("samples_per_s"), "tokens_per_s": info.get("tokens_per_s"),
                     "peak_gib": info.get("peak_memory_gib"), "mfu": info.get("mfu"),
                     "attention": info.get("attention_backend")})
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(work: str, out: str) -> int:
    os.makedirs(out, exist_ok=True)
    steps = _steps(work)
    bench = _benchmarks(work)
    tests = {name: _junit(os.path.join(work, f"junit_{name}.xml")) for name in ("tests", "kernel")}
    train_summary = None
    if os.path.exists(os.path.join(work, "train_summary.json")):
        with open(os.path.join(work, "train_summary.json")) as f:
            train_summary = json.load(f)
    versions = {}
    try:
        import torch
        import transformers

        versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    except Exception as e:  # noqa: BLE001  (the summary must come out whatever broke)
        versions = {"error": repr(e)}
    session = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "steps": steps,
        "tests": tests,
        "train_step_benchmark": _train_rows(bench),
        "train_demo": train_summary,
    }
    with open(os.path.join(out, "session.json"), "w") as f:
        json.dump(session, f, indent=1, default=str)
    if bench["benchmarks"]:
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump(bench, f, default=str)
    with open(os.path.join(out, "log.txt"), "wb") as log:
        names = [s["step"] for s in steps]
        for name in names:
            path = os.path.join(work, f"{name}.log")
            if not os.path.exists(path):
                continue
            size = os.path.getsize(path)
            log.write(f"\n===== {name} ({size} bytes{', tail only' if size > LOG_TAIL else ''})\n".encode())
            with open(path, "rb") as f:
                f.seek(max(0, size - LOG_TAIL))
                log.write(f.read())

    # the table, last
    print()
    print(f"ugd GPU session {session['date_utc']}: {versions}")
    print(f"{'step':<13} {'exit':>4} {'s':>5}  note")
    for s in steps:
        note = s.get("note", "")
        t = tests.get("kernel" if s["step"] == "kernel-tests" else s["step"])
        if t:
            note = f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
        print(f"{s['step']:<13} {str(s['rc']):>4} {s['seconds']:>5}  {note}")
    rows = session["train_step_benchmark"]
    if rows:
        print(f"{'train step':<13} {'median s':>8} {'samples/s':>9} {'tok/s':>8} {'peak GiB':>8} {'MFU':>6}  attention")
        for r in rows:
            print(f"{str(r['impl']):<13} {_fmt(r['median_s'], '8.3f')} {_fmt(r['samples_per_s'], '9.1f')} "
                  f"{_fmt(r['tokens_per_s'], '8.0f')} {_fmt(r['peak_gib'], '8.1f')} {_fmt(r['mfu'], '6.3f')}  "
                  f"{r['attention']}")
    failed = [s for s in steps if s["rc"] not in (0,)]
    print(f"results: {out}/session.json, bench.json, log.txt; {len(failed)} step(s) not clean")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
