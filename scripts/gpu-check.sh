#!/usr/bin/env bash
# One-command GPU check: bash scripts/gpu-check.sh OUTDIR [--dry-run]
#
# On a machine with one CUDA GPU (sized for an H100/H200: about 8 minutes in all) it writes to OUTDIR:
#   environment.txt        date, command, git commit, GPU (nvidia-smi), driver, CUDA, torch, xformers, pip freeze
#   pytest-cuda.txt/.xml   the CUDA tests (pytest -m cuda)
#   sweep/                 bf16, N = 4K … 64K, every variant and GPU backend, causal and bidirectional
#                          (benchmarks/studies/gpu-check.yaml): results.jsonl, results.csv, PNGs
#   additive/              the learned additive variant (O(N²·hidden)), N = 4K and 8K only
#   frontier/              the frontier study (benchmarks/studies/frontier.yaml) at N = 16K in bf16
#   summary.md             every step with its exit status and wall time
# Each step has its own time limit; one that reaches it is interrupted like Ctrl-C (its points so
# far are kept, and the summary says how to resume it) and the script goes on to the next.
#
# Without a CUDA device (or with --dry-run) the CUDA tests are skipped and the same steps run on
# the CPU at tiny sizes, to check the script itself: nothing it writes then is a GPU result.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash scripts/gpu-check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
ARGS="$*"
OUT="$1"; shift
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    *) usage ;;
  esac
done
PY="${PYTHON:-python3}"
if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then echo "gpu-check: $OUT is a file, not a folder" >&2; exit 2; fi
mkdir -p "$OUT" || { echo "gpu-check: cannot create $OUT" >&2; exit 2; }
[ -w "$OUT" ] || { echo "gpu-check: $OUT is not writable" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA device visible to torch: dry run on the CPU (CUDA steps skipped)" >&2
  DRY=1
fi
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; LENGTHS=256,512; FRONTIER_N=512; ADDITIVE_N=256
  T_TESTS=0; T_SWEEP=600; T_ADD=120; T_FRONTIER=300
  MODE="DRY RUN on the CPU at tiny sizes: checks the script, measures nothing about a GPU"
else
  DEVICE=cuda; LENGTHS=4k,8k,16k,32k,64k; FRONTIER_N=16k; ADDITIVE_N=4k,8k
  # 475 s of limits in all, plus the environment and the plots: within 8 minutes.
  T_TESTS=75; T_SWEEP=225; T_ADD=30; T_FRONTIER=125
  MODE="GPU run"
fi

SUMMARY="$OUT/summary.md"
{
  echo "# gpu-check: $MODE"
  echo
  echo "Command: \`bash scripts/gpu-check.sh $ARGS\` (OUTDIR $OUT), started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "| step | exit status | wall s | limit s |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

# step NAME LIMIT_S COMMAND...: run with a time limit (SIGINT first, so sla-bench saves and says how to
# resume; SIGKILL 20 s later), log to OUT/NAME.log, one summary row.
step() {
  local name="$1" limit="$2"; shift 2
  local t0 t1 rc
  echo "== $name (limit ${limit}s): $*" >&2
  t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 130 ] && note=" (time limit: partial; rerun the same command with --resume)"
  echo "| $name | $rc$note | $((t1 - t0)) | $limit |" >> "$SUMMARY"
  tail -n 3 "$OUT/$name.log" >&2
  return 0
}

# --- the environment -------------------------------------------------------------------------
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $MODE"
  echo "command: bash scripts/gpu-check.sh $ARGS"
  echo "git_commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "git_dirty: $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed file(s)"
  echo "host: $(hostname)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //') ($(nproc) cores)"
  echo
  echo "## torch"
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
for dist in ("xformers", "triton", "sparse_linear_attn"):
    try:
        print(f"{dist}:", md.version(dist))
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
else:
    print("device: none (CPU only)")
EOF
  echo
  echo "## nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1; else echo "nvidia-smi: not available"; fi
  echo
  echo "## pip freeze"
  "$PY" -m pip freeze 2>/dev/null
} > "$OUT/environment.txt" 2>&1

# --- the CUDA tests --------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  echo "skipped: no CUDA device (dry run)" > "$OUT/pytest-cuda.txt"
  echo "| pytest -m cuda | skipped (dry run) | 0 | - |" >> "$SUMMARY"
else
  step pytest-cuda "$T_TESTS" "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml"
  cp "$OUT/pytest-cuda.log" "$OUT/pytest-cuda.txt"
fi

# --- the bf16 sweep: every variant, causal and bidirectional ---------------------------------
BENCH=("$PY" -m sparse_linear_attn.bench run)
step sweep "$T_SWEEP" "${BENCH[@]}" --config benchmarks/studies/gpu-check.yaml --device "$DEVICE" \
  --seq-lens "$LENGTHS" --out "$OUT/sweep"
step additive "$T_ADD" "${BENCH[@]}" --config benchmarks/studies/gpu-check.yaml --device "$DEVICE" \
  --variants additive:hidden_dim=32 dot_product --seq-lens "$ADDITIVE_N" --out "$OUT/additive"

# --- the frontier at 16K ----------------------------------------------------------------------
step frontier "$T_FRONTIER" "${BENCH[@]}" --config benchmarks/studies/frontier.yaml --device "$DEVICE" \
  --dtype bfloat16 --seq-lens "$FRONTIER_N" --out "$OUT/frontier"
step frontier-plots 20 "$PY" -m sparse_linear_attn.bench frontier "$OUT/frontier" --x time flops density

{
  echo
  echo "Finished $(date -u +%Y-%m-%dT%H:%M:%SZ). Results: sweep/, additive/, frontier/ (results.jsonl, results.csv, PNGs);"
  echo "the environment: environment.txt. To commit a GPU run: copy OUTDIR to docs/results/gpu-<device>-<date>/."
} >> "$SUMMARY"
echo "gpu-check: wrote $OUT ($MODE)" >&2
cat "$SUMMARY" >&2
