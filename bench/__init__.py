"""Benchmarks, run from the repo root as `python -m bench.<name>` (each prints a table and writes
bench/results/<name>.json with the device, versions and command line).

Harnesses (here): frontier, speed, zsmerge, compare_policies, kvpress_ref, distill, kernels, identity,
profile_decode. One-off studies behind a design choice: bench.studies. Machine tools (GPU sessions, random
weights, an sm_90 compile check): bench.tools. Shared code: bench.common.
"""
