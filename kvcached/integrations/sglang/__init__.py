"""kvcached for SGLang: `export ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1`, then start SGLang as usual.

autopatch.py lists every patch and the SGLang versions they were written for; pool.py holds the two classes swapped
in, token_slots.py and cache_bound.py the SGLang-free logic under them, support.py what is refused at start-up.
"""
