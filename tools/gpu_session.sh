#!/usr/bin/env bash
# One-call GPU session: build for sm_90, CUDA tests (with the compiled attention kernels off and on),
# python -m ugd.train and python -m ugd.predict in every mode, the GPU benchmarks with bounded rounds;
# JSON under $OUT, one short table last. Fits in under 8 minutes on an H100/H200 so that one lent
# window (15 minutes, machine start included) holds a run and a rerun. See docs/performance.md.
#
#     bash tools/gpu_session.sh                       # on the GPU machine, from the repository root
#     UGD_SESSION_DRY=1 bash tools/gpu_session.sh     # CPU dry run of the plumbing: no build, tiny steps
#
# Environment:
#     OUT                    results folder (the device tool sets it; default /tmp/ugd_gpu_session_out)
#     UGD_SESSION_STEPS      steps to run, in order (default: build info tests kernel-tests train predict bench)
#     UGD_SESSION_BUDGET_S   wall-clock budget of the whole script in seconds (default 470)
#     UGD_SESSION_TRAIN_ARGS extra arguments of python -m ugd.train (default "--num_train_epochs 4": the demo
#                            with 4 of its 12 epochs, to fit the budget; set it empty for the demo as shipped)
#
# Results (at most 8 files, as the device tool brings back): session.json (every step: exit status,
# seconds, the table rows), bench.json (the pytest-benchmark JSON of every benchmark step, merged),
# log.txt (every step's output, each cut to its last 2 MB). Nothing is fetched from outside: the
# device image has torch, transformers, peft, pytest and pytest-benchmark; no wheels need carrying.
set -uo pipefail  # not -e: a failing step is recorded and the next one runs

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=${UGD_SESSION_DRY:-0}
OUT=${OUT:-/tmp/ugd_gpu_session_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ugd_session.XXXXXX)
BUDGET=${UGD_SESSION_BUDGET_S:-470}
START=$(date +%s)
STEPS=${UGD_SESSION_STEPS:-build info tests kernel-tests train predict bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
# bounded benchmark rounds (the defaults are for a dedicated benchmarking run)
export UGD_BENCH_ROUNDS=${UGD_BENCH_ROUNDS:-5} UGD_BENCH_WARMUP=${UGD_BENCH_WARMUP:-2} UGD_BENCH_SETS=${UGD_BENCH_SETS:-1}
export UGD_BENCH_GRAPH_REPS=${UGD_BENCH_GRAPH_REPS:-20}
if [ "$DRY" != "0" ]; then
  DEVICE=cpu
  echo "== dry run on the CPU: no build, tiny steps (checks the plumbing, not the GPU)"
else
  DEVICE=cuda
fi

: >"$WORK/steps.jsonl"

# step NAME BUDGET_S COMMAND...: runs COMMAND with a timeout of min(BUDGET_S, what is left of the
# script's budget), logs its output, records its exit status and seconds.
step() {
  local name=$1 budget=$2
  shift 2
  local now left limit t0 rc
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  limit=$((budget < left ? budget : left))
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped (out of time: ${left}s left)"
    printf '{"step": "%s", "rc": null, "seconds": 0, "note": "skipped: out of time"}\n' "$name" >>"$WORK/steps.jsonl"
    return
  fi
  echo "== $name (limit ${limit}s)"
  t0=$(date +%s)
  # the step functions are exported (export -f below): timeout runs them in a child bash it can kill
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >"$WORK/$name.log" 2>&1 </dev/null
  rc=$?
  tail -n 25 "$WORK/$name.log"
  printf '{"step": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" \
    >>"$WORK/steps.jsonl"
  echo "== $name: exit $rc after $(($(date +%s) - t0))s"
}

# ------------------------------------------------------------------------------------------ steps

do_build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  # sm_90 only: one architecture keeps the build near half a minute on 16 cores
  UGD_CUDA_ARCHS=90 MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    && "$PY" -c "import ugd_ops, json; print(json.dumps(ugd_ops.build_info()))"
}

do_info() {
  "$PY" -m ugd_ops.info
}

# --timeout=N where pytest-timeout is installed (the device image has it), else nothing
tmo() {
  "$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=$1"
}

# -n N (pytest-xdist, in the device image) where installed: the CUDA tests are many small ones and the
# machine has 16 cores; the workers share the one GPU
xdist() {
  "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"
}

run_pytest() {
  "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfE "$@"
}

do_tests() {
  if [ "$DRY" != "0" ]; then
    # two runs: pytest keeps only the last -k of one command line
    run_pytest tests/ops/test_flex_attention.py -k "routing or info or cache" \
      && run_pytest tests/ops/test_autocast.py -k "cpu"
    return
  fi
  # every test that touches CUDA, with the compiled attention kernels switched off: the flex path serves
  UGD_CUDA_ATTENTION=0 run_pytest $(tmo 120) $(xdist 8) --junitxml="$WORK/junit_tests.xml" \
    tests/ops/test_kl_cuda.py tests/ops/test_flex_attention.py tests/ops/test_autocast.py \
    tests/ops/test_attention.py tests/ops/test_row_intervals.py tests/ops/test_linear_cross_entropy.py \
    tests/modules/test_hf_attention.py \
    -k "cuda or gpu or flex"
}

do_kernel_tests() {
  if [ "$DRY" != "0" ]; then
    UGD_CUDA_ATTENTION=1 run_pytest tests/ops/test_flex_attention.py -k "routing"
    return
  fi
  # the compiled CUDA attention kernels switched on (opt-in until a run like this one verifies them)
  local files=(tests/ops/test_flex_attention.py tests/ops/test_attention.py)
  for f in tests/ops/test_attention_cuda*.py; do [ -f "$f" ] && files+=("$f"); done
  UGD_CUDA_ATTENTION=1 run_pytest $(tmo 120) $(xdist 4) --junitxml="$WORK/junit_kernel.xml" "${files[@]}" \
    -k "cuda or kernel"
}

do_train() {
  local extra=()
  if [ "$DRY" != "0" ]; then
    extra=(--backbone_config '{"hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2}'
           --demo_train_size 32 --demo_eval_size 16 --max_steps 2 --num_reasons 2 --save_strategy no --eval_strategy no)
  fi
  # shellcheck disable=SC2086
  "$PY" -m ugd.train --output_dir "$WORK/demo" --report_to none --disable_tqdm true "${extra[@]}" \
    ${UGD_SESSION_TRAIN_ARGS---num_train_epochs 4} && cp "$WORK/demo/ugd_run_summary.json" "$WORK/train_summary.json"
}

do_predict() {
  [ -d "$WORK/demo" ] || { echo "no trained model in $WORK/demo (the train step failed)"; return 3; }
  "$PY" - "$WORK/pairs.jsonl" <<'EOF'
import json, sys
pairs = [("red mug", "Acme red ceramic mug, 350 ml, dishwasher safe"),
         ("running shoes", "Zoom trail running shoe, breathable mesh"),
         ("winter jacket", "Down jacket with hood, water repellent"),
         ("usb cable", "Braided USB-C cable, 2 m, fast charging")]
with open(sys.argv[1], "w") as f:
    for i, (q, d) in enumerate(pairs):
        f.write(json.dumps({"id": i, "query": q, "document": d}) + "\n")
EOF
  local m="$WORK/demo" in="$WORK/pairs.jsonl" rc=0 dev=(--device "$DEVICE")
  for mode in two-tower single-tower reason; do
    echo "-- mode $mode"
    "$PY" -m ugd.predict --model "$m" --input "$in" --mode "$mode" --max_new_tokens 16 "${dev[@]}" --no_progress \
      --output "$WORK/pred_$mode.jsonl" || rc=1
    head -c 400 "$WORK/pred_$mode.jsonl"; echo
  done
  echo "-- mode documents, then two-tower with the stored vectors"
  "$PY" -m ugd.predict --model "$m" --input "$in" --mode documents --doc_vectors "$WORK/docs.safetensors" "${dev[@]}" \
    --no_progress || rc=1
  "$PY" -m ugd.predict --model "$m" --input "$in" --doc_vectors "$WORK/docs.safetensors" "${dev[@]}" --no_progress \
    --output "$WORK/pred_stored.jsonl" || rc=1
  head -c 400 "$WORK/pred_stored.jsonl"; echo
  return $rc
}

do_bench() {
  local common=(--benchmark-only -p no:cacheprovider -o addopts="" -q $(tmo 240))
  if [ "$DRY" != "0" ]; then
    "$PY" -m pytest benchmarks/test_bench_train.py -k "cpu_small" "${common[@]}" --benchmark-json="$WORK/bench_train.json"
    return
  fi
  local rc=0
  # the training step: ugd against the padded SDPA peer and the packed flex_attention peer (Qwen2.5-1.5B shape)
  "$PY" -m pytest benchmarks/test_bench_train.py -k "gpu" "${common[@]}" --benchmark-json="$WORK/bench_train.json" || rc=1
  # attention peers on the qlq workload (fwd, bwd, fwd+bwd) and the block-mask build
  "$PY" -m pytest benchmarks/test_bench_gpu.py -k "qlq and (ugd or flex or sdpa or fa2_torch)" "${common[@]}" \
    --benchmark-json="$WORK/bench_attention.json" || rc=1
  "$PY" -m pytest benchmarks/test_bench_losses.py -k "gpu" "${common[@]}" --benchmark-json="$WORK/bench_losses.json" || rc=1
  "$PY" -m pytest benchmarks/test_bench_inference.py -m cuda -k "qlq" "${common[@]}" \
    --benchmark-json="$WORK/bench_inference.json" || rc=1
  return $rc
}

export ROOT DRY OUT WORK PY DEVICE
export -f tmo xdist do_build do_info run_pytest do_tests do_kernel_tests do_train do_predict do_bench

for s in $STEPS; do
  case $s in
    build) if [ "$DRY" != "0" ]; then echo "== build: skipped in the dry run (the in-tree build is used)"; else step build 150 do_build; fi ;;
    info) step info 30 do_info ;;
    tests) step tests 120 do_tests ;;
    kernel-tests) step kernel-tests 60 do_kernel_tests ;;
    train) step train 100 do_train ;;
    predict) step predict 60 do_predict ;;
    bench) step bench 200 do_bench ;;
    *) echo "unknown step $s (known: build info tests kernel-tests train predict bench)"; exit 2 ;;
  esac
done

"$PY" tools/gpu_session_summary.py "$WORK" "$OUT"
echo "work files: $WORK"
