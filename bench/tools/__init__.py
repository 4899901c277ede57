"""Machine tools: compile_sm90 (`python -m bench.tools.compile_sm90`), random_weights
(`python -m bench.tools.random_weights`), and the lent-GPU scripts gpu_session.sh and gpu_real.sh
(`bash bench/tools/gpu_session.sh`)."""
