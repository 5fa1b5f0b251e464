"""Child process for the e2e tests: offline `LLM` greedy token ids, as JSON on the stdout line starting "TOKENS ".

Usage: vllm_offline.py MODEL [--tensor-parallel-size N] [--pipeline-parallel-size N]
"""

import argparse
import json

PROMPTS = [
    "The capital of France is", "1, 2, 3, 4,", "The opposite of hot is", "Water boils at a temperature of",
    "The largest planet in the solar system is", "def fibonacci(n):", "My favourite colour is", "Once upon a time,",
]

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, enforce_eager=True, max_model_len=1024, seed=0, kv_cache_memory_bytes=1 << 30,
              tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
    llm.llm_engine.engine_core.shutdown()  # stop the engine core and worker processes before exiting
