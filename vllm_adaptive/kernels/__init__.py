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
- ``split_kv``: the split-KV partials (store / merge device functions) and the
  merge kernel of both decode kernels.
- ``kivi``: the torch path for KIVI's packed pages (quantize, write plan,
  attention); ``kivi_write_triton`` / ``kivi_attention_triton``: the same
  write and attention in Triton.
- ``triton_common``: device functions the Triton kernels share (request
  search, pattern predicate and page skip, online-softmax step, quantizer);
  ``_triton``: lazy jit, which binds them to each kernel.
- ``cpu_sparse``: pseudo requests that run block-aligned sparse layers on
  vLLM's own CPU kernel.
- ``batch``: the step's requests in the plugin's length conventions.

Nothing here imports vLLM, directly or through ``formats`` (``formats.kivi``
imports vLLM's spec classes only inside ``KiviFormat.kv_spec``): the runners
(``vllm_adaptive/runners``) bind these kernels to vLLM's metadata, and the
kernels and their tests run where vLLM is not installed (the GPU check,
``benchmarks/gpu_kernel_check.sh``).

Triton modules import triton lazily and jit on first launch, so this package
imports on machines without a GPU.
"""
