#!/usr/bin/env bash
# Everything that needs a GPU, in one script sized for a lent H100/H200 session (about 10 minutes):
#   bash bench/gpu_session.sh            (writes bench/results/*_gpu.json and gpu_tests.txt; copies them to $OUT if set)
# 1. the CUDA tests (kernels vs references, CUDA graphs, runtime on CUDA); 2. the latent decode kernel's bandwidth;
# 3. SmolLM2 converted to 2% of its cache: runtime vs transformers' generate, and the 16 GiB / 32k batch budget.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m gpu tests/ 2>&1 | tail -30 | tee bench/results/gpu_tests.txt
python bench/kernels.py
[ -d /tmp/smollm2-2pct ] || kvconvert convert smollm2 /tmp/smollm2-2pct --kv-ratio 0.02 --force
python bench/speed.py --model /tmp/smollm2-2pct --source smollm2 --batch 1,16,64 --context 1024,8192 --steps 32 --budget-context 32768
kvconvert profile memory /tmp/smollm2-2pct --measure --source smollm2 --context 32768 --batch 8 --json > bench/results/profile_memory_gpu.json
if [ -n "${OUT:-}" ]; then cp bench/results/*gpu* bench/results/gpu_tests.txt "$OUT"/ 2>/dev/null; fi
