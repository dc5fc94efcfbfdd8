"""LongGen sparse attention patterns: which keys a query may read.

One predicate serves the kernels (which keys to read), the references (which
keys to mask) and the KV managers (which blocks no future query can read, so
they can go back to the pool). Positions are 0-based token indices within a
request; query ``p`` may read key ``j`` iff ``j <= p`` and any of:

    j < sink                                   attention sink
    p - j < window                             local window (includes p itself)
    p // block - j // block < local_blocks     local blocks (block granularity)
    (j // block + 1) % vert_stride == 0        vertical stride (every S-th block)

``sink_window`` layers use the first two terms; ``strided`` layers (LongGen's
block-sparse variant, the pattern of vLLM's former ``blocksparse`` backend)
use the last two plus an optional sink. A term whose size is 0 is off.

Every term is non-increasing in ``p`` for a fixed ``j``, so a key that the next
query ``N`` cannot read is never read again: ``live(j, N) = visible(N, j)``.
That is what makes freeing safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SparsePattern:
    sink: int = 0
    window: int = 0
    block: int = 0
    local_blocks: int = 0
    vert_stride: int = 0

    def __post_init__(self) -> None:
        for name in ("sink", "window", "block", "local_blocks", "vert_stride"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"SparsePattern.{name} must be an int >= 0, got {v!r}")
        if (self.local_blocks or self.vert_stride) and self.block <= 0:
            raise ValueError("SparsePattern: local_blocks/vert_stride need block > 0")
        if self.window == 0 and self.local_blocks == 0:
            raise ValueError(
                "SparsePattern: a query must see itself: set window >= 1 or local_blocks >= 1"
            )

    # ------------------------------------------------------------------ tokens
    def visible(self, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Boolean ``visible[p, j]`` for broadcastable int64 position tensors."""
        vis = j < self.sink
        if self.window:
            vis = vis | (p - j < self.window)
        if self.local_blocks:
            vis = vis | (
                torch.div(p, self.block, rounding_mode="floor")
                - torch.div(j, self.block, rounding_mode="floor")
                < self.local_blocks
            )
        if self.vert_stride:
            vis = vis | (
                (torch.div(j, self.block, rounding_mode="floor") + 1) % self.vert_stride == 0
            )
        return vis & (j <= p)

    def visible_one(self, p: int, j: int) -> bool:
        if j > p:
            return False
        if j < self.sink:
            return True
        if self.window and p - j < self.window:
            return True
        if self.local_blocks and p // self.block - j // self.block < self.local_blocks:
            return True
        if self.vert_stride and (j // self.block + 1) % self.vert_stride == 0:
            return True
        return False

    # ------------------------------------------------------------------ blocks
    def is_permanent(self, lo: int, hi: int) -> bool:
        """Whether some token in ``[lo, hi]`` stays readable forever."""
        if lo < self.sink:
            return True
        if self.vert_stride:
            g0, g1 = lo // self.block, hi // self.block
            # some g in [g0, g1] with (g + 1) % vert_stride == 0
            if (g1 + 1) // self.vert_stride > g0 // self.vert_stride:
                return True
        return False

    def block_live(self, b: int, bs: int, n: int) -> bool:
        """Whether cache block ``b`` (tokens ``[b*bs, (b+1)*bs)``) holds a token
        ``j < n`` that some query ``p >= n`` may read."""
        lo = b * bs
        if lo >= n:
            return False
        hi = min(lo + bs, n) - 1  # newest token of the block that exists
        if self.is_permanent(lo, hi):
            return True
        if self.window and n - hi < self.window:
            return True
        if self.local_blocks and n // self.block - hi // self.block < self.local_blocks:
            return True
        return False

    def span_start(self, q_lo: int) -> int:
        """Lowest key position that the window / local-block terms let query
        ``q_lo`` read (clamped at 0). Later queries reach no lower, so a query
        tile ``[q_lo, q_hi)`` reads every key of ``[span_start(q_lo), q_hi)``
        and, below it, only sink and vertical-stride keys. The kernels' page
        walks, the torch plans and the pseudo-request tables all start here."""
        lo = q_lo
        if self.window:
            lo = min(lo, q_lo - self.window + 1)
        if self.local_blocks:
            lo = min(lo, (q_lo // self.block - self.local_blocks + 1) * self.block)
        return max(lo, 0)

    def key_span(self) -> int:
        """Tokens behind a query that the window / local terms may reach."""
        return max(self.window - 1, self.local_blocks * self.block)

    def block_needed(self, b: int, bs: int, q_lo: int, q_hi: int) -> bool:
        """Whether some query in ``[q_lo, q_hi)`` reads a key of block ``b``.
        Exact at block level: used by kernels to skip blocks."""
        lo = b * bs
        hi = lo + bs - 1
        if lo >= q_hi:
            return False
        if self.is_permanent(lo, hi):
            return True
        # Window / local terms are non-increasing in p and non-decreasing in j:
        # the first query that can reach the block and its newest key decide.
        p = max(q_lo, lo)
        if p <= hi:
            return True  # that query reads itself
        return self.visible_one(p, hi)

    def block_aligned(self, bs: int) -> bool:
        """Whether readability changes only at cache-block boundaries (no
        token window, sinks and pattern blocks made of whole cache blocks):
        then a query block reads whole cache blocks, which vLLM's own CPU
        attention kernel can run through a compacted block table."""
        return (
            self.window == 0
            and self.sink % bs == 0
            and self.block % bs == 0
            and self.local_blocks > 0
        )

    def max_held_blocks(self, bs: int, max_len: int, chunk: int, in_step_free: bool = True) -> int:
        """Upper bound on blocks one request holds at any time, when at most
        ``chunk`` tokens are computed per step. With ``in_step_free`` blocks
        dead at the end of a step are never allocated (see ``kv/managers.py``);
        without it every token of the step gets its slot until the next step."""
        permanent = 0
        if self.sink:
            permanent += cdiv(min(self.sink, max_len), bs)
        if self.vert_stride:
            permanent += cdiv(cdiv(max_len, self.block), self.vert_stride) * cdiv(self.block, bs)
        span = self.key_span()
        # live at the start of the step + live new blocks at its end
        new = min(chunk, span + 1) if in_step_free else chunk
        moving = (cdiv(span, bs) + 1) + (cdiv(new, bs) + 1)
        return min(cdiv(max_len, bs), permanent + moving)

    def steady_blocks(self, bs: int, n: int) -> int:
        """Blocks held at length ``n`` in decode (after a step that ends at n)."""
        return sum(self.block_live(b, bs, n) for b in range(cdiv(n, bs)))

    def describe(self) -> str:
        parts = []
        if self.sink:
            parts.append(f"sink={self.sink}")
        if self.window:
            parts.append(f"window={self.window}")
        if self.local_blocks:
            parts.append(f"local_blocks={self.local_blocks}x{self.block}")
        if self.vert_stride:
            parts.append(f"vert_stride={self.vert_stride}x{self.block}")
        return ",".join(parts)
