"""Block-aligned LongGen sparse layers on vLLM's own CPU kernel.

Each (request, pattern block) becomes a pseudo request whose block table lists
exactly the cache blocks the pattern lets it read (``kernels/cpu_sparse.py``),
so the kernel's causal mask is the pattern and a freed block is never read.
The kernel reads every key from the cache, so this runner is not
``in_step_free``: its groups keep a real block for every token of a step until
the next one.
"""

from __future__ import annotations

from vllm_adaptive.kernels.cpu_sparse import plan_pseudo_requests
from vllm_adaptive.runners.dense_vllm_cpu import CpuStep, DenseVllmCpu


class SparseVllmCpu(DenseVllmCpu):
    family = "sparse"
    host_lengths = True

    @classmethod
    def unsupported(cls, pattern, block_size):
        if not pattern.block_aligned(block_size):
            return (
                f"vLLM's CPU kernel runs a sparse pattern only when it is aligned to the "
                f"cache block size ({block_size}: no token window, sink and block multiples "
                f"of it); the pattern is {pattern.describe()}"
            )
        return None

    def plan(self, md) -> CpuStep:
        pseudo = plan_pseudo_requests(
            self.params, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu,
            self.geometry.block_size,
        )
        return self._schedule(pseudo.query_start_loc, pseudo.seq_lens, pseudo.block_table)
