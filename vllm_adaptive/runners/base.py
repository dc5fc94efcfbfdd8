"""``Runner``: the kernels that run one (pattern family, KV format, kernel path).

A runner is what a layer's ``LayerPlan`` resolves to (``plan.py``). It has
three verbs, split as FlashInfer splits ``plan()`` from ``run()``:

    plan(md)       once per KV-cache group and step, in the metadata builder:
                   host-side index work shared by the group's layers (vLLM's
                   CPU scheduler metadata, pseudo requests, gather plans, the
                   decode/prefill split); stored in ``md.step``
    write(...)     per layer, from ``do_kv_cache_update``: this step's K/V
                   into the layer's pages
    attend(...)    per layer, from ``forward``: attention over the pages (and,
                   for ``in_step_free`` runners, this step's fresh K/V)

What a runner can do is data (class attributes), checked at start-up:
``devices`` it runs on, ``unsupported(pattern, block_size)`` for the patterns
and block sizes it cannot run, ``in_step_free`` (it reads this step's keys
from the fresh K/V, so the manager need not store keys that die within the
step), ``decodes_first`` (it needs vLLM to order decode requests first, like
vLLM's own GPU backends, so decode rows never take the prefill kernel),
``host_lengths`` (its plan reads the step's lengths on the host: the builder
copies ``seq_lens`` there, a device sync on CUDA, only for such runners),
``write_needs_metadata`` (``write`` also gets the step's metadata, ``md=``:
a packed format finds its residual pages through the block table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vllm_adaptive.formats import FORMATS
from vllm_adaptive.pattern import SparsePattern

if TYPE_CHECKING:
    from vllm_adaptive.metadata import AdaptiveMetadata


@dataclass(frozen=True)
class Geometry:
    """What a runner knows of its layers' cache (same for every layer of a group)."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    kv_cache_dtype: str
    block_size: int  # tokens per page of the layer's cache tensor (kernel block size)
    # Slots below this belong to the null block, which the KV manager puts
    # where a sparse layer stores nothing (kv/managers.py).
    null_slot_end: int = 0
    # The KV format's parameters (``formats.kivi.KiviParams``); None for model_dtype.
    kv_params: Any = None


class StepPlan:
    """Base of the per-step plans runners put into ``AdaptiveMetadata.step``."""


class Runner:
    family: ClassVar[str]
    kv_format: ClassVar[str]
    path: ClassVar[str]
    devices: ClassVar[tuple[str, ...]]
    in_step_free: ClassVar[bool] = False
    decodes_first: ClassVar[bool] = False
    host_lengths: ClassVar[bool] = False
    write_needs_metadata: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, pattern: SparsePattern | None, block_size: int) -> str | None:
        """Why this runner cannot run ``pattern`` at ``block_size``; None if it can."""
        return None

    @classmethod
    def describe(cls) -> str:
        return f"{cls.family}/{cls.kv_format}/{cls.path}"

    def __init__(self, geometry: Geometry, pattern: SparsePattern | None) -> None:
        self.geometry = geometry
        self.pattern = pattern
        self.format = FORMATS[self.kv_format]

    def plan(self, md: "AdaptiveMetadata") -> StepPlan | None:
        return None

    def write(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # vLLM's per-layer cache tensor (see formats/)
        slot_mapping: torch.Tensor,  # [num_tokens], -1 = padding
    ) -> None:
        raise NotImplementedError

    def attend(
        self,
        query: torch.Tensor,  # [num_actual_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_actual_tokens, num_kv_heads, head_size] this step's
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        md: "AdaptiveMetadata",
        scale: float,
        out: torch.Tensor,  # [num_actual_tokens, num_heads, head_size]
    ) -> None:
        raise NotImplementedError
