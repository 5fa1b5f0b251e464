"""kvcached for vLLM: `export ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1`, then start vLLM as usual.

autopatch.py lists every patch; versions.py is the one table of what differs between the vLLM versions supported;
plan.py, block_pool.py and worker.py are the three places where vLLM meets the core.
"""
