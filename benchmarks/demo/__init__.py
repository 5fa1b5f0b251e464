"""The main demo (run it with `python -m benchmarks.demo`): kvcached against vLLM's static KV pool.

Modules: config (settings), harness (servers, sampling, runs and phases, JSON), one module per experiment (bursty,
two_models, peaks), report (checks and summary table), plots (PNGs), __main__ (command line and order of runs).
"""
