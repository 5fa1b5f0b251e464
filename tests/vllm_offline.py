"""Child process for the e2e tests: offline `LLM` greedy token ids, as JSON on the stdout line starting "TOKENS "."""

import json
import sys

PROMPTS = [
    "The capital of France is", "1, 2, 3, 4,", "The opposite of hot is", "Water boils at a temperature of",
    "The largest planet in the solar system is", "def fibonacci(n):", "My favourite colour is", "Once upon a time,",
]

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=1024, seed=0, kv_cache_memory_bytes=1 << 30)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
    llm.llm_engine.engine_core.shutdown()  # stop the engine core and worker processes before exiting
