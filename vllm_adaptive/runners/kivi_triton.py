"""KIVI quantized KV (``formats/kivi.py``) on the plugin's Triton kernels
(CUDA; ``kernels/kivi_write_triton.py``, ``kernels/kivi_attention_triton.py``),
full and sparse layers. The write plan is the torch runners' (``runners/kivi_torch.py``),
made once per step in the builder; the kernels read the packed pages directly.
"""

from __future__ import annotations

from vllm_adaptive.kernels.kivi_attention_triton import kivi_paged_attention
from vllm_adaptive.kernels.kivi_write_triton import kivi_write
from vllm_adaptive.runners.kivi_torch import KiviTorch


class KiviTriton(KiviTorch):
    """The same plan; the write and attention in Triton."""

    path = "triton"
    devices = ("cuda",)

    @classmethod
    def unsupported(cls, pattern, block_size):
        if block_size < 16 or block_size & (block_size - 1):
            return f"block size {block_size}: the kivi Triton kernels need a power of two >= 16"
        return None

    def write_rotated(self, key, value, kv_cache, md) -> None:
        kivi_write(self.layout, kv_cache, md.step.write, key, value)

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        def run(q, k, v, o):
            kivi_paged_attention(
                self.layout, kv_cache, q, md.block_table, md.query_start_loc, md.seq_lens,
                scale, o, pattern=self.params, max_query_len=md.max_query_len, key=k, value=v,
            )

        self.rotated_attention(run, query, key, value, out)


class DenseKiviTriton(KiviTriton):
    family = "dense"


class SparseKiviTriton(KiviTriton):
    family = "sparse"
