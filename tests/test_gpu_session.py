"""tools/gpu_session.sh (the one-call GPU session) and its summary, checked on the CPU: the script's
syntax, a dry run of one step, and the summary's files and table on synthetic results."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_session.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_dry_run_of_one_step_writes_the_session_json(tmp_path):
    env = dict(os.environ, UGD_SESSION_DRY="1", UGD_SESSION_STEPS="info", OUT=str(tmp_path / "out"),
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "out" / "session.json") as f:
        session = json.load(f)
    assert [(s["step"], s["rc"]) for s in session["steps"]] == [("info", 0)]
    assert "partitioned attention on CUDA" in (tmp_path / "out" / "log.txt").read_text()
    assert proc.stdout.rstrip().splitlines()[-2].startswith("results:")  # the table comes last


def test_unknown_step_is_an_error(tmp_path):
    env = dict(os.environ, UGD_SESSION_DRY="1", UGD_SESSION_STEPS="nonsense", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step nonsense" in proc.stdout


def test_summary_of_synthetic_results(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "steps.jsonl").write_text(
        '{"step": "tests", "rc": 1, "seconds": 50, "limit": 110}\n'
        '{"step": "bench", "rc": null, "seconds": 0, "note": "skipped: out of time"}\n')
    (work / "tests.log").write_text("x" * 100)
    (work / "junit_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
        '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    bench = {"machine_info": {"node": "x"}, "benchmarks": [
        {"group": "train-step-qwen2.5-1.5b", "extra_info": {"impl": "ugd", "median_s": 0.4, "samples_per_s": 80.0,
                                                           "tokens_per_s": 30000.0, "peak_memory_gib": 40.0,
                                                           "mfu": 0.3, "attention_backend": "ugd_ops (flex)"}}]}
    (work / "bench_train.json").write_text(json.dumps(bench))
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_session_summary
    finally:
        sys.path.pop(0)
    assert gpu_session_summary.main(str(work), str(out)) == 0
    session = json.loads((out / "session.json").read_text())
    assert session["tests"]["tests"]["passed"] == 1 and session["tests"]["tests"]["failed_tests"] == ["t::b"]
    assert session["train_step_benchmark"][0]["samples_per_s"] == 80.0
    assert len(json.loads((out / "bench.json").read_text())["benchmarks"]) == 1
    assert sorted(os.listdir(out)) == ["bench.json", "log.txt", "session.json"]  # the device tool brings back 8
