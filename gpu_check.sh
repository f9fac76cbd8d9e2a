#!/usr/bin/env bash
# The project's GPU check, in one go: the tests on CUDA, then bench.py on a Llama-2-7B shape.
#
#   ./gpu_check.sh            on a CUDA machine (H100/H200 class) with torch, safetensors,
#                             sentencepiece, tokenizers, hypothesis, pytest, transformers and no
#                             network; under 8 minutes; prints one table
#   ./gpu_check.sh --dry-run  the same steps at toy sizes on the CPU (CI runs it so it cannot rot)
#
# No weights travel to the GPU machine: bench.py uses random weights of the 7B shape (same cost),
# and the tests that need the downloaded default model skip (LONGHEADS_OFFLINE=1), only there.
set -euo pipefail
cd "$(dirname "$0")"
export LONGHEADS_OFFLINE=1
if [ "${1:-}" = "--dry-run" ]; then
  device=cpu shape=tiny lengths="1024 4096" decode="1024 4096" attn="2048" examples=5 tests="test_longheads.py test_cuda.py" offload=""
else
  device=cuda shape=llama2-7b lengths="8192 32768 131072" decode="4096 32768" attn="32768" examples=50 tests="" offload="--offload"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== tests (hypothesis examples per property: $examples)"
# shellcheck disable=SC2086
status=0  # a failing step does not stop the next one: one run tells everything
LONGHEADS_EXAMPLES=$examples timeout 200 python -m pytest -q $tests || status=1

echo "== bench: $shape, $device, LongHeads w=256 K=16 (the paper's) $offload; full attention where it fits"
# shellcheck disable=SC2086
timeout 270 python bench.py --shape "$shape" --device "$device" --lengths $lengths $offload \
  --decode-lengths $decode --attention-lengths $attn --chunk-size 256 --num-chunks 16 \
  --json "${OUT:-${TMPDIR:-/tmp}}/gpu_check.json" || status=1
exit $status
