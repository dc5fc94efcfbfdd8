"""Engine configurations that more than one test module reads. Each runs
once per session (``conftest.run_engines`` keys results by the whole spec),
so a module that asks for the same spec gets the result another one made.
"""

from __future__ import annotations

from vllm_adaptive.text import SAMPLE_PROMPTS

SECRET = ("Here is a list of boxes in a small warehouse, with their colours and "
          "shelves, which a clerk wrote down this morning before opening time. "
          "The secret code is 48213. Keep it in mind. "
          + " ".join(f"Item {i}: a {c} box sits on shelf {i % 7}." for i, c in
                     zip(range(40), ["red", "blue", "green", "brown", "white"] * 8))
          + " Question: what is the secret code? Answer: the secret code is")  # 608 tokens

# Teacher-forced positions (``score``): 607, so keys cross many KIVI segments;
# short enough for a 704-token engine.
SCORE = [SECRET]
LOGPROBS = 5  # top-5 logprobs per generated token

KV_256M = 256 * 2**20
# The sample prompts but the 811-token one: on the KIVI torch path a decode
# step reads every cached token of every request (long contexts are scored
# teacher-forced instead, ``SCORE``: a prefill, far cheaper per position).
SHORT_PROMPTS = [p for p in SAMPLE_PROMPTS if len(p) < 100]
# bf16 at LongGen's block size: stock against ADAPTIVE (test_engine.py) and
# the KIVI presets against ADAPTIVE full (test_kivi_engine.py)
BF16 = dict(backend="ADAPTIVE", dtype="bfloat16", block_size=128, max_model_len=2048, max_tokens=24,
            prompts=SHORT_PROMPTS, kv_cache_memory_bytes=KV_256M, logprobs=LOGPROBS, score=SCORE)
BF16_FULL = dict(BF16, adaptive_attention="full")

# A fact behind a 32-token sink and far before the end of the prompt
# (outside a 96-token window): ~880 tokens
LONG_SECRET = ("Here is a list of boxes in a small warehouse, with their colours and "
               "shelves, which a clerk wrote down this morning before opening time. "
               "The secret code is 48213. Keep it in mind. "
               + " ".join(f"Item {i}: a {c} box sits on shelf {i % 7}." for i, c in
                          zip(range(60), ["red", "blue", "green", "brown", "white"] * 12))
               + " Question: what is the secret code? Answer: the secret code is")
# float32, 9 ragged prompts (1 to ~880 tokens), prefill chunked by a 128-token
# step budget: stock against ADAPTIVE (test_engine.py) and ADAPTIVE full
# against sparse maps (test_longgen_engine.py)
FP32 = dict(prompts=list(SAMPLE_PROMPTS) + [LONG_SECRET], max_tokens=48, max_num_batched_tokens=128,
            max_model_len=1024)
# ADAPTIVE full on the plugin's torch path at block 128, selected by the
# adaptive_attention key alone (no backend flag)
FP32_TORCH_FULL = dict(FP32, block_size=128, adaptive_attention={"preset": "full", "kernels": "torch"})
