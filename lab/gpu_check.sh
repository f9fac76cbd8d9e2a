#!/usr/bin/env bash
# The project's GPU check, in one go, within 7 of the GPU machine's 8 minutes by construction:
# the versions, then the CUDA tests, and lab/bench.py on a Llama-2-7B shape in
# bfloat16 (random weights of that shape: the same cost), the most informative measurements
# first, the 128k prefill last. Every record has wall and GPU time (CUDA events).
#
#   ./lab/gpu_check.sh            on a CUDA machine (H100/H200 class) with torch, safetensors,
#                                 sentencepiece, hypothesis, pytest and no network
#   ./lab/gpu_check.sh --dry-run  the same steps at toy sizes on the CPU (CI runs it so it
#                                 cannot rot)
#   ./lab/gpu_check.sh --plan     the GPU run's plan, on any machine: each measurement's GPU
#                                 memory on paper against a card of $GPU_MEMORY_GIB (default 78)
#
# It runs from the repository root, wherever it is called from. Everything goes to $OUT
# (default: $TMPDIR/gpu_check) the moment it exists: versions.txt, tests.log as the tests print,
# bench.jsonl one record per finished measurement (with its estimate on paper), logs/ every
# measurement's whole stderr as it comes, bench.log. A run killed at any point keeps what it
# finished.
# Memory: lab.bench plans every measurement on paper (the GPU layout run on meta tensors) and
# starts none whose estimate is over 90% of the card: a prefill that does not fit whole runs in
# pieces, one that fits neither way is recorded as skipped with the estimate's numbers (on an
# H100, LongHeads at 131072 tokens not offloaded: 86 GB of keys, values and weights).
# Time: each step has its own limit (below); no measurement starts past its step's deadline.
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: the tests and python -m lab.bench run from there
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check}
mode=${1:-}
case "$mode" in
  "" | --dry-run | --plan) ;;
  *) echo "gpu_check.sh: unknown option '$mode': give --dry-run, --plan or nothing" >&2; exit 2 ;;
esac
[ "$mode" = --plan ] || mkdir -p "$OUT"  # a plan only prints
export LONGHEADS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$mode" = "--dry-run" ]; then
  device=cpu shape=tiny lengths="1024 4096" long=8192 full_max=4096 decode="1024 4096"
  examples=5 offload=""  # offload needs CUDA
else  # the GPU run, or its plan
  device=cuda shape=llama2-7b lengths="8192 32768" long=131072 full_max=32768
  decode="4096 32768" examples=50 offload="--offload --offload-max 8192"
fi
if [ "$mode" = "--plan" ]; then  # first, as a printout in lab/results/: command and commit
  changed=$(git status --porcelain --untracked-files=no | head -c1)
  echo "\$ GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-78} ./lab/gpu_check.sh --plan  #" \
    "(at $(git rev-parse --short HEAD)${changed:++changes})"
fi
# seconds: the versions, the tests, the main bench, the long prefill, and for each bench its own
# start and summary past its deadline; 480 - the sum is the margin, at least 60
setup_s=25 tests_s=95 main_s=160 long_s=95 slack_s=15
total=$((setup_s + tests_s + main_s + slack_s + long_s + slack_s))
echo "time plan: setup ${setup_s} s + tests ${tests_s} s + bench ${main_s}+${slack_s} s +" \
  "long prefill ${long_s}+${slack_s} s = ${total} s of 480 (margin $((480 - total)) s)"
[ "$total" -le 420 ] || { echo "gpu_check.sh: $total s of steps leave under 60 s" >&2; exit 2; }

bench=(--shape "$shape" --device "$device" --chunk-size 256 --num-chunks 16)
# shellcheck disable=SC2086
main=(--lengths $lengths --full-max "$full_max" $offload --decode-lengths $decode
      --attention-lengths)
long_run=(--lengths "$long" --full-max "$full_max" --decode-lengths --attention-lengths)
if [ "$mode" = "--plan" ]; then
  card=(--gpu-memory "${GPU_MEMORY_GIB:-78}")
  "$PY" -m lab.bench --plan "${bench[@]}" "${card[@]}" "${main[@]}" &&
    "$PY" -m lab.bench --plan "${bench[@]}" "${card[@]}" "${long_run[@]}"
  exit
fi

echo "== versions"
{
  [ "$device" = cpu ] || timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  timeout "$((setup_s - 10))" "$PY" - <<'EOF'
import os
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
      torch.backends.cudnn.version(), "CUDA available", torch.cuda.is_available())
if torch.cuda.is_available():
    card = torch.cuda.get_device_properties(0)
    print("device", card.name, f"{card.total_memory / 2**30:.1f} GiB",
          f"compute capability {card.major}.{card.minor}")
matmul = torch.backends.cuda.matmul
print("float32 matmul precision", torch.get_float32_matmul_precision(), "(highest: no TF32);",
      "TF32 matmul", matmul.allow_tf32, "cuDNN", torch.backends.cudnn.allow_tf32,
      "; matmul fp32_precision", getattr(matmul, "fp32_precision", "(not in this torch)"),
      "; bf16 reduced-precision reductions", matmul.allow_bf16_reduced_precision_reduction,
      "; TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"))
EOF
} 2>&1 | tee "$OUT/versions.txt"
status=0  # a failing step does not stop the next one: one run tells everything

echo "== tests: the CUDA ones (hypothesis examples per property: $examples)"
# the CUDA tests, and the CLI test that once failed only where CUDA exists
# -v: a line per test as it ends, so that a run cut short by its limit still says how far it got
LONGHEADS_EXAMPLES=$examples timeout "$tests_s" "$PY" -m pytest -v --tb=short -rfE \
  -p no:cacheprovider tests/test_cuda.py \
  lab/test_perplexity.py::test_cli_writes_records_and_a_plot 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== bench: $shape, $device, LongHeads w=256 K=16 (the paper's); full attention to $full_max"
[ -z "$offload" ] || echo "   and LongHeads offloaded at 8192 (its CPU gathers are slow past it)"
timeout "$((main_s + slack_s))" "$PY" -m lab.bench "${bench[@]}" "${main[@]}" --timeout 90 \
  --deadline "$main_s" --records "$OUT/bench.jsonl" --logs "$OUT/logs" --json "$OUT/bench.json" \
  2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== bench: LongHeads at $long tokens, last (in pieces or skipped where the card is short)"
timeout "$((long_s + slack_s))" "$PY" -m lab.bench "${bench[@]}" "${long_run[@]}" \
  --timeout "$long_s" --deadline "$long_s" --records "$OUT/bench.jsonl" --logs "$OUT/logs" \
  --json "$OUT/bench-long.json" 2>&1 | tee -a "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
