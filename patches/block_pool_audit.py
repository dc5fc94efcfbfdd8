"""Audit vLLM's block pool for double frees and leaks (opt-in).

``BlockPool.free_blocks`` decrements a block's reference count without
checking it: a second free of the same block drives it to -1 and the block
silently never returns to the free queue (or returns twice). The KV managers
of this plugin free blocks early, release and rebuild them, which is where
such bugs hide under preemption and aborts. With ``VLLM_ADAPTIVE_AUDIT=1``
(the load and fault tests set it) the EngineCore's pool counts every free of
a block whose count is already 0, logs the first, and lets the metrics
publisher count still-referenced blocks once the pool is idle
(``vllm_adaptive.metrics``). Without the variable nothing is patched.
"""

from __future__ import annotations

from vllm_adaptive.patches import PatchRecord

RECORD = PatchRecord(
    area="KV block pool audit (opt-in)",
    targets=(
        "vllm.v1.core.block_pool.BlockPool.__init__",
        "vllm.v1.core.block_pool.BlockPool.free_blocks",
        "vllm.v1.core.block_pool.BlockPool.get_new_blocks",
    ),
    why="a double free in BlockPool is silent (the reference count goes negative) and a "
    "leak shows only as KV usage that never returns to 0",
    how="only with VLLM_ADAPTIVE_AUDIT=1: wraps that count frees of unreferenced blocks, "
    "note pool activity, and register the pool for the idle leak audit",
    upstream="none; vLLM has no debug mode for the block pool",
    delete_when="vLLM's BlockPool checks reference counts itself (a debug flag would do)",
)


def apply() -> None:
    import time

    from vllm_adaptive.metrics import audit_enabled

    if not audit_enabled():
        return
    from vllm.logger import init_logger
    from vllm.v1.core.block_pool import BlockPool

    from vllm_adaptive.metrics import counters
    from vllm_adaptive.patches import wrap

    logger = init_logger("vllm.adaptive")

    def make_init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            counters().watch_pool(self)

        return __init__

    def make_free(original):
        def free_blocks(self, ordered_blocks):
            blocks = list(ordered_blocks)
            c = counters()
            for b in blocks:
                if not b.is_null and b.ref_cnt <= 0 and (b.pool is None or b.pool is self):
                    if c.audit["double_frees"] == 0:
                        logger.error("KV block %d freed with reference count %d (double free)",
                                     b.block_id, b.ref_cnt)
                    c.double_free()
            c.last_pool_activity = time.monotonic()
            return original(self, blocks)

        return free_blocks

    def make_get(original):
        def get_new_blocks(self, num_blocks):
            counters().last_pool_activity = time.monotonic()
            return original(self, num_blocks)

        return get_new_blocks

    wrap(BlockPool, "__init__", make_init)
    wrap(BlockPool, "free_blocks", make_free)
    wrap(BlockPool, "get_new_blocks", make_get)
