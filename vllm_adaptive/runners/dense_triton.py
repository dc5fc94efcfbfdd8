"""Full attention on the plugin's Triton kernels (CUDA; tested under
``TRITON_INTERPRET=1``). Decode rows of a mixed batch run the split-KV decode
kernel, the rest the prefill kernel: the builder asks vLLM to order decodes
first (``decodes_first``) and the plan finds the boundary with vLLM's own
``split_decodes_and_prefills``."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_adaptive.kernels import cache_write, paged_decode, paged_prefill
from vllm_adaptive.runner import Runner, StepPlan


@dataclass
class DecodeSplit(StepPlan):
    num_decodes: int  # requests [0, num_decodes) have query_len 1
    num_decode_tokens: int
    num_reqs: int


def split_decodes(md) -> DecodeSplit:
    """vLLM's decode/prefill boundary of a batch ordered decodes first."""
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills

    num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(md.common, decode_threshold=1)
    return DecodeSplit(num_decodes, num_decode_tokens, int(md.seq_lens.shape[0]))


class DenseTriton(Runner):
    family, kv_format, path = "dense", "model_dtype", "triton"
    devices = ("cuda",)
    decodes_first = True

    def plan(self, md) -> DecodeSplit:
        return split_decodes(md)

    def write(self, key, value, kv_cache, slot_mapping, md) -> None:
        cache_write.write_kv_cache(key, value, *self.format.views(kv_cache, self.geometry), slot_mapping)

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        kc, vc = self.format.views(kv_cache, self.geometry)
        s: DecodeSplit = md.step
        d, dt = s.num_decodes, s.num_decode_tokens
        bt, qsl, sl = md.block_table, md.query_start_loc, md.seq_lens
        if d:
            paged_decode.paged_decode(
                query[:dt], kc, vc, bt[:d], qsl[: d + 1], sl[:d], scale, out=out[:dt]
            )
        if d < s.num_reqs:
            paged_prefill.paged_prefill(query, kc, vc, bt[d:], qsl[d:], sl[d:], scale, out=out)
