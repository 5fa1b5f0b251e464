"""kvcached's benchmarks and the main demo, run as modules from the repository root.

Note (layout): shared pieces (servers, load, memory sampling, analysis, model sizes, the registry view) sit here;
each program is a module run with `python -m`: `benchmarks.demo` (the main demo, a package of one module per
experiment), `benchmarks.bench_vllm` (kvcached vs vanilla vLLM), `benchmarks.bench_core` (the core on one device).
"""
