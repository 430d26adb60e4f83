#!/usr/bin/env bash
# One script for a lent GPU machine (H100/H200, torch + triton preinstalled, no network,
# no pip install): environment, the GPU tests, then a short benchmark whose table is
# printed LAST.  Run from the repository root:
#
#     bash benchmarks/gpu_check.sh             # writes to ${OUT:-benchmarks/out}
#
# Stage limits (seconds) add up to < 10 minutes; override with the variables below.
#   GPU_TEST_TIMEOUT (210)  GPU_TEST_SHARDS (4: parallel pytest processes; 1 = one process)
#   BENCH_TIMEOUT (270)     BENCH_BUDGET (140: measuring)  BENCH_PREWARM (12 processes)
#   BENCH_PREWARM_TIMEOUT (110)  BENCH_ARGS (extra arguments for bench_attention.py)
#   NA_TIMEOUT (100)        NA_ARGS (extra arguments for bench_neighborhood.py, e.g. --bwd)
#   ROUTED_TIMEOUT (100: routed attention, benchmarks/bench_routed.py; 0 skips it)
#   ROUTED_ARGS (extra arguments for bench_routed.py)
#   HOST_TIMEOUT (90: host time per op call, benchmarks/bench_host.py; 0 skips it)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT
PY="${PYTHON:-python}"
T0=$(date +%s)
GPU_TEST_TIMEOUT="${GPU_TEST_TIMEOUT:-210}"
GPU_TEST_SHARDS="${GPU_TEST_SHARDS:-4}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
BENCH_BUDGET="${BENCH_BUDGET:-140}"
BENCH_PREWARM="${BENCH_PREWARM:-12}"
BENCH_PREWARM_TIMEOUT="${BENCH_PREWARM_TIMEOUT:-110}"
NA_TIMEOUT="${NA_TIMEOUT:-100}"
elapsed() { echo $(( $(date +%s) - T0 )); }

echo "=== [0] environment ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit \
  --format=csv,noheader 2>&1 | head -4 || echo "nvidia-smi not available"
timeout 60 "$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, platform
import torch, triton
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"triton {triton.__version__} | cuda available: {torch.cuda.is_available()}"
      + (f" | {torch.cuda.get_device_name()} cc {torch.cuda.get_device_capability()}" if torch.cuda.is_available() else ""))
missing = []
for m in ("sympy", "networkx", "numpy", "pytest", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:<10} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        missing.append(m)
        print(f"  {m:<10} MISSING ({type(e).__name__})")
for m, what in (("sympy", "attnfx cannot import: attnfx tests and attnfx benchmark rows will fail (n/a)"),
                ("networkx", "attnfx's passes (backend / e2e test) cannot import"),
                ("pytest", "GPU tests run through benchmarks/run_gpu_tests.py instead"),
                ("matplotlib", "no PNG plot (table and JSON still written)")):
    if m in missing:
        print(f"NOTE: {m} is missing here -> {what}")
try:
    import attnfx, attnfx.ops  # noqa: F401
    print("attnfx imports OK")
except Exception as e:
    print(f"NOTE: attnfx does not import: {type(e).__name__}: {e}")
EOF

echo "=== [1] GPU tests (limit ${GPU_TEST_TIMEOUT}s, ${GPU_TEST_SHARDS} shard(s)) t=$(elapsed)s"
TEST_LOG="$OUT/gpu_tests"
rm -f "$TEST_LOG".*.log
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  run_tests() {  # $1 = shard index
    ATTNFX_TEST_SHARD="$1/$GPU_TEST_SHARDS" timeout "$GPU_TEST_TIMEOUT" \
      "$PY" -m pytest -m gpu tests/gpu -q -x -p no:cacheprovider -o addopts="" \
      --strict-markers -rfE --durations=5
  }
else
  echo "pytest missing: running tests/gpu through benchmarks/run_gpu_tests.py"
  run_tests() {
    timeout "$GPU_TEST_TIMEOUT" "$PY" benchmarks/run_gpu_tests.py -x --shard "$1/$GPU_TEST_SHARDS"
  }
fi
pids=()
for ((i = 0; i < GPU_TEST_SHARDS; i++)); do
  TORCHINDUCTOR_COMPILE_THREADS=4 run_tests "$i" >"$TEST_LOG.$i.log" 2>&1 &
  pids+=($!)
done
TEST_RC=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  [ "$rc" -ne 0 ] && TEST_RC=$rc
  [ "$rc" -eq 124 ] && echo "shard $i: TIMED OUT after ${GPU_TEST_TIMEOUT}s"
done
for ((i = 0; i < GPU_TEST_SHARDS; i++)); do
  echo "--- shard $i/$GPU_TEST_SHARDS:"
  if [ "$TEST_RC" -ne 0 ]; then tail -n 25 "$TEST_LOG.$i.log"; else tail -n 2 "$TEST_LOG.$i.log"; fi
done
TEST_SUMMARY="GPU tests: rc=$TEST_RC (logs: $TEST_LOG.*.log) t=$(elapsed)s"
echo "$TEST_SUMMARY"

HOST_TIMEOUT="${HOST_TIMEOUT:-90}"
if [ "$HOST_TIMEOUT" -gt 0 ]; then
  echo "=== [1b] host time per op call (limit ${HOST_TIMEOUT}s) t=$(elapsed)s"
  timeout "$HOST_TIMEOUT" "$PY" benchmarks/bench_host.py --json "$OUT/host.json" \
    >"$OUT/host.txt" 2>"$OUT/host.log"
  HOST_RC=$?
  cat "$OUT/host.txt"
  [ "$HOST_RC" -ne 0 ] && { echo "host benchmark rc=$HOST_RC"; tail -n 10 "$OUT/host.log"; }
fi

echo "=== [2] short benchmark (limit ${BENCH_TIMEOUT}s) t=$(elapsed)s"
# shellcheck disable=SC2086
TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-4}" timeout "$BENCH_TIMEOUT" \
  "$PY" benchmarks/bench_attention.py \
  --n 4096,8192 --d 64,128 --dtypes bf16 --modes fwd,fwdbwd --causal both --providers key \
  --warmup-ms 10 --rep-ms 40 --budget-s "$BENCH_BUDGET" \
  --prewarm "$BENCH_PREWARM" --prewarm-timeout-s "$BENCH_PREWARM_TIMEOUT" \
  --out "$OUT" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
BENCH_RC=$?
grep -E "^\[(bench|warm)\]" "$OUT/bench.log" | grep -E "prewarm|budget|units" | tail -n 20
if [ "$BENCH_RC" -ne 0 ]; then
  echo "benchmark rc=$BENCH_RC ($([ "$BENCH_RC" -eq 124 ] && echo "timed out" || echo failed)); last lines:"
  tail -n 30 "$OUT/bench.log"
fi
echo "=== [3] neighborhood benchmark (limit ${NA_TIMEOUT}s) t=$(elapsed)s"
# shellcheck disable=SC2086
timeout "$NA_TIMEOUT" "$PY" benchmarks/bench_neighborhood.py --json "$OUT/neighborhood.json" \
  ${NA_ARGS:-} >"$OUT/neighborhood.txt" 2>"$OUT/neighborhood.log"
NA_RC=$?
[ "$NA_RC" -ne 0 ] && { echo "neighborhood benchmark rc=$NA_RC"; tail -n 15 "$OUT/neighborhood.log"; }
ROUTED_TIMEOUT="${ROUTED_TIMEOUT:-100}"
if [ "$ROUTED_TIMEOUT" -gt 0 ]; then
  echo "=== [4] routed attention benchmark (limit ${ROUTED_TIMEOUT}s) t=$(elapsed)s"
  # shellcheck disable=SC2086
  TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-4}" timeout "$ROUTED_TIMEOUT" \
    "$PY" benchmarks/bench_routed.py --cases 16384:512,65536:1024 --rep-ms 30 \
    --json "$OUT/bench_routed.json" ${ROUTED_ARGS:-} >"$OUT/bench_routed.log" 2>&1
  ROUTED_RC=$?
  echo "routed benchmark: rc=$ROUTED_RC$([ "$ROUTED_RC" -eq 124 ] && echo " (timed out: rows so far)")"
  grep -E "^\[routed\]|^N=|^  " "$OUT/bench_routed.log" | awk '!seen[$0]++' | tail -n 40
fi
echo "$TEST_SUMMARY"
echo "neighborhood: rc=$NA_RC"
echo "benchmark: rc=$BENCH_RC, files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ') total t=$(elapsed)s"
echo "=== table"
if [ -s "$OUT/bench.txt" ]; then
  cat "$OUT/bench.txt"
else
  # killed before the end: rebuild the table from the JSON written after each shape
  "$PY" - <<'EOF'
import json, os, sys
sys.path.insert(0, "benchmarks")
import bench_attention as b
p = os.path.join(os.environ["OUT"], "bench.json")
if not os.path.exists(p):
    print("no benchmark results"); sys.exit(0)
d = json.load(open(p))
args = b.parse_args(["--n", "4096", "--tokens", str(d["args"]["tokens"])])
rs = d["results"]; b.add_ratios(rs)
print("(partial: rebuilt from bench.json)\n" + b.FLOP_CONVENTION + "\n" + b.format_table(rs, args))
print(b.format_targets(b.targets(rs)))
EOF
fi
echo "=== neighborhood table"
cat "$OUT/neighborhood.txt" 2>/dev/null || echo "no neighborhood results"
