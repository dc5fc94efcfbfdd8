"""Attention kernels on the plugin's own paged layout.

One file per kernel family; each has a launcher that validates its inputs and
is tested against ``vllm_adaptive.reference``:

- ``torch_paged``: the torch path (CPU, any device), cache write + attention.
- ``cache_write``: Triton KV-cache write.
- ``paged_prefill``: Triton causal paged attention for any query lengths.
- ``paged_decode``: Triton split-KV paged attention, one query per request.
- ``torch_sparse``: the torch path for LongGen sparse layers (pattern-planned
  gathers, fresh keys for this step's positions).
- ``sparse_prefill`` / ``sparse_decode``: Triton block-sparse attention that
  visits only the pattern's pages (``sparse_checks`` validates their inputs).
- ``split_kv``: the split-KV partials and merge shared by both decode kernels.
- ``cpu_sparse``: pseudo requests that run block-aligned sparse layers on
  vLLM's own CPU kernel.
- ``batch``: the step's requests in the plugin's length conventions.

Nothing here imports vLLM: the runners (``vllm_adaptive/runners``) bind these
kernels to vLLM's metadata.

Triton modules import triton lazily and jit on first launch, so this package
imports on machines without a GPU.
"""
