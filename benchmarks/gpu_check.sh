#!/usr/bin/env bash
# One-shot GPU check for ectune, for a machine with no network. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # part "perf" (default): the CUDA fast path, ~6 minutes
#     bash benchmarks/gpu_check.sh eval       # part "eval": the GPU sizes of the evaluation benchmarks, ~6 minutes
#
# Everything goes under $OUT (if set) or ./gpu_out. The two parts fit separate device calls of at most 10 minutes.
# Steps (each under `timeout`; a failing step is logged and the next one still runs):
#   both: install wheels found in .whl/ (repo root) or benchmarks/.whl/ (--no-index --no-deps), then ectune
#         itself (pip install -e . --no-deps --no-build-isolation); print nvidia-smi and torch/CUDA versions
#   perf: benchmarks/throughput.py (cifar10 preset, batch 128: fp32/TF32/bf16/compile/fast + 1-step sampling), with
#         a torch.profiler kernel table per training mode in $OUT/profile/; pytest -m gpu tests/test_gpu.py; a
#         short real run on Fashion-MNIST through the CLI: `ectune pretrain` then `ectune tune` (batch 256);
#         benchmarks/precision.py on that tuned model (native TF32 beside the CPU's emulation of it)
#   eval: benchmarks/paper_table.py --size full, then benchmarks/scaling.py --size full from the same pretrained
#         model (Fashion-MNIST, FD-Lite0, n = 10k)
# Fashion-MNIST is taken from .data/fashion-mnist/ when that folder exists ($ECTUNE_FASHION_MNIST).
# A summary table comes last. Exit status: the number of failed steps (0 = all passed).
# On a machine without CUDA every step degrades cleanly (the benchmarks say so and exit 0, GPU tests skip).

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 99
PART=${1:-perf}
case "$PART" in perf|eval) ;; *) echo "gpu_check.sh: unknown part '$PART' (expected perf or eval)"; exit 99 ;; esac
ROOT=$(pwd)
OUTDIR=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUTDIR"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
fi
export ROOT OUTDIR PY
START=$(date +%s)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAVE_CUDA=1; TRAIN_KIMG=5.12; COMPILE_FLAG=--runtime.compile
else  # no GPU: a 2-step run per command keeps the CLI check short; no compile (minutes on a CPU)
  HAVE_CUDA=0; TRAIN_KIMG=0.512; COMPILE_FLAG=--runtime.no-compile
  echo "no CUDA device: GPU steps will skip or run tiny"
fi
declare -a NAMES=() RESULTS=() SECS=()

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to $OUTDIR/NAME.log, record the result
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo
  echo "=== [$name] (limit ${limit}s): $*"
  if declare -F "$1" >/dev/null; then  # a shell function: run it in a child bash so `timeout` can stop it
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $*" > >(tee "$OUTDIR/$name.log") 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUTDIR/$name.log") 2>&1
  fi
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then RESULTS+=("ok"); elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then RESULTS+=("TIMEOUT"); else RESULTS+=("FAILED rc=$rc"); fi
  NAMES+=("$name"); SECS+=("$dt")
  echo "=== [$name] ${RESULTS[-1]} after ${dt}s"
}

# 1. environment -----------------------------------------------------------------------------------------------
install() {
  local found=0
  for d in "$ROOT/.whl" "$ROOT/benchmarks/.whl"; do
    if [ -d "$d" ] && ls "$d"/*.whl >/dev/null 2>&1; then
      found=1
      echo "installing wheels from $d:"; ls "$d"/*.whl
      "$PY" -m pip install --no-index --no-deps --disable-pip-version-check "$d"/*.whl || return 1
    fi
  done
  [ $found -eq 1 ] || echo "no .whl/ folder: installing nothing extra"
  "$PY" -m pip install -e . --no-deps --no-build-isolation --disable-pip-version-check -q || return 1
  "$PY" - <<'EOF'
import importlib
missing = [m for m in ("tyro", "safetensors", "numpy", "scipy", "PIL", "matplotlib", "tqdm", "pytest") if importlib.util.find_spec(m) is None]
print("missing python modules:", missing or "none")
import ectune
print("ectune from", ectune.__file__)
raise SystemExit(1 if missing else 0)
EOF
}
step install 60 install

envinfo() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi || echo "nvidia-smi: not found"
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
EOF
}
step env 30 envinfo

if [ -d "$ROOT/.data/fashion-mnist" ]; then
  export ECTUNE_FASHION_MNIST="$ROOT/.data/fashion-mnist"
  echo "ECTUNE_FASHION_MNIST=$ECTUNE_FASHION_MNIST"
fi
export PYTHONUNBUFFERED=1

if [ "$PART" = eval ]; then
  rm -rf "$OUTDIR/paper_table" "$OUTDIR/scaling"
  step paper-table 420 "$PY" benchmarks/paper_table.py --size full --out "$OUTDIR/paper_table"
  scaling() {  # tune from the paper table's pretrained model, at the throughput it measured
    local results="$OUTDIR/paper_table/results.json"
    if [ ! -f "$results" ]; then "$PY" benchmarks/scaling.py --size full --out "$OUTDIR/scaling"; return; fi
    local rate
    rate=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['pretrain']['img_per_s'])" "$results")
    "$PY" benchmarks/scaling.py --size full --init "$OUTDIR/paper_table/pretrain/model.safetensors" --rate "$rate" \
      --out "$OUTDIR/scaling"
  }
  step scaling 300 scaling
fi

if [ "$PART" = perf ]; then
# 2. throughput (the numbers the issue asks for) -----------------------------------------------------------------
rm -f "$OUTDIR/throughput.jsonl"
step throughput 220 "$PY" benchmarks/throughput.py --budget-s 140 --out "$OUTDIR/throughput.jsonl" \
  --profile "$OUTDIR/profile"

# 3. GPU correctness tests -----------------------------------------------------------------------------------------
step pytest-gpu 110 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$OUTDIR/pytest-gpu.xml"

# 4. short real training run through the CLI (Fashion-MNIST, batch 256) ---------------------------------------------
rm -rf "$OUTDIR/fm-pretrain" "$OUTDIR/fm-tune"
step fm-pretrain 45 "$PY" -m ectune.cli pretrain --preset fashion-mnist --run "$OUTDIR/fm-pretrain" \
  --train.total-kimg "$TRAIN_KIMG" --train.batch 256 --runtime.status-kimg 1.28 --runtime.save-kimg "$TRAIN_KIMG" \
  --runtime.sample-kimg 0 --quiet
step fm-tune 65 "$PY" -m ectune.cli tune --preset fashion-mnist --init "$OUTDIR/fm-pretrain" --run "$OUTDIR/fm-tune" \
  --train.total-kimg "$TRAIN_KIMG" --train.batch 256 --runtime.status-kimg 1.28 --runtime.save-kimg "$TRAIN_KIMG" \
  --runtime.sample-kimg "$TRAIN_KIMG" "$COMPILE_FLAG" --quiet

# 5. Δ-noise of each precision on that tuned model: CUDA's own TF32 next to the CPU emulation of it ------------------
step precision 90 "$PY" benchmarks/precision.py --model "$OUTDIR/fm-tune" --n 64 \
  --modes fp32,tf32,tf32-trunc,bf16,fp16 --ratios 0.5,0.7,0.75,0.9375,0.96875,0.984375,0.99,0.99609375

fi

# summary --------------------------------------------------------------------------------------------------------
{
  echo
  echo "================ gpu_check summary ($(( $(date +%s) - START ))s total, logs in $OUTDIR) ================"
  fails=0
  for i in "${!NAMES[@]}"; do
    printf "%-12s %-14s %5ss\n" "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}"
    [ "${RESULTS[$i]}" = "ok" ] || fails=$((fails + 1))
  done
  if [ -s "$OUTDIR/throughput.jsonl" ]; then
    echo "--- throughput.jsonl ---"
    "$PY" - "$OUTDIR/throughput.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = ["img_per_s", "s_per_step", "s_per_batch", "mfu", "peak_mem_gb", "compile_s", "tflops", "target_row_fraction",
            "graphs_compiled_during_timing", "skipped", "error"]
    print(f"{r['mode']:<28}", " ".join(f"{k}={r[k]}" for k in keys if k in r and r[k] is not None))
EOF
  fi
  for table in "$OUTDIR/paper_table/table.md" "$OUTDIR/scaling/scaling.md" "$OUTDIR/precision.log"; do
    if [ -f "$table" ]; then echo "--- $table ---"; cat "$table"; fi
  done
  for run in fm-pretrain fm-tune; do
    if [ -f "$OUTDIR/$run/stats.jsonl" ]; then echo "--- $run/stats.jsonl (last line) ---"; tail -n 1 "$OUTDIR/$run/stats.jsonl"; fi
  done
  grep -h -E "passed|failed|skipped|error" "$OUTDIR/pytest-gpu.log" 2>/dev/null | tail -n 3
  echo "failed steps: $fails"
} 2>&1 | tee "$OUTDIR/summary.txt"
fails=$(grep -c -E "FAILED|TIMEOUT" <(printf "%s\n" "${RESULTS[@]}"))
exit "$fails"
