#!/usr/bin/env bash
# The project's GPU check, in one go, under 8 minutes by construction: the CUDA tests first, then
# lab/bench.py on a Llama-2-7B shape in bfloat16, the most informative measurements first,
# offloaded LongHeads at 8k among them. Every record has wall and GPU time (CUDA events).
#
#   ./lab/gpu_check.sh            on a CUDA machine (H100/H200 class) with torch, safetensors,
#                                 sentencepiece, hypothesis, pytest and no network
#   ./lab/gpu_check.sh --dry-run  the same steps at toy sizes on the CPU (CI runs it so it
#                                 cannot rot)
#
# It runs from the repository root, wherever it is called from. Everything goes to $OUT
# (default: $TMPDIR/gpu_check) the moment it exists: tests.log as the tests print, bench.jsonl
# one record per finished measurement, bench.log. A run killed at any point keeps what it
# finished. Every step has its own time limit: 150 s of tests, then 280 s of bench (each
# measurement at most 120 s, none started past the bench's deadline).
# No weights travel to the GPU machine: lab/bench.py uses random weights of the 7B shape (same
# cost), and the tests that need the downloaded default model skip (LONGHEADS_OFFLINE=1).
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: the tests and python -m lab.bench run from there
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check}
mkdir -p "$OUT"
export LONGHEADS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${1:-}" = "--dry-run" ]; then
  device=cpu shape=tiny lengths="1024 4096" full_max=4096 decode="1024 4096"
  tests_s=150 bench_s=150 one_s=60 examples=5 offload=""  # offload needs CUDA
else
  device=cuda shape=llama2-7b lengths="8192 32768 131072" full_max=32768 decode="4096 32768"
  tests_s=150 bench_s=280 one_s=120 examples=50 offload="--offload --offload-max 8192"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== tests: the CUDA ones first (hypothesis examples per property: $examples)"
status=0  # a failing step does not stop the next one: one run tells everything
# the CUDA tests, and the CLI test that once failed only where CUDA exists
LONGHEADS_EXAMPLES=$examples timeout "$tests_s" "$PY" -m pytest -q --tb=short -rfE \
  -p no:cacheprovider tests/test_cuda.py \
  lab/test_perplexity.py::test_cli_writes_records_and_a_plot 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== bench: $shape, $device, LongHeads w=256 K=16 (the paper's); full attention to $full_max"
[ -z "$offload" ] || echo "   and LongHeads offloaded at 8192 (its CPU-side gathers are slow past it)"
# shellcheck disable=SC2086
timeout "$((bench_s + 30))" "$PY" -m lab.bench --shape "$shape" --device "$device" $offload \
  --lengths $lengths --full-max "$full_max" --decode-lengths $decode --attention-lengths \
  --chunk-size 256 --num-chunks 16 --timeout "$one_s" --deadline "$bench_s" \
  --records "$OUT/bench.jsonl" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
