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
``devices`` it runs on, ``unsupported(params, block_size)`` for the kind parameters
and block sizes it cannot run, ``in_step_free`` (it reads this step's keys
from the fresh K/V, so the manager need not store keys that die within the
step), ``decodes_first`` (it needs vLLM to order decode requests first, like
vLLM's own GPU backends, so decode rows never take the prefill kernel),
``host_lengths`` (its plan reads the step's lengths on the host: the builder
copies ``seq_lens`` there, a device sync on CUDA, only for such runners).

Every runner's ``write`` gets the same arguments, the step's metadata
included (a packed format finds its residual pages through the block table);
``md`` is None in vLLM's profiling and warm-up runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm_adaptive.formats import FORMATS
from vllm_adaptive.metadata import AdaptiveMetadata, StepPlan


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
    # The KV format's parameters (``formats/``); None for formats without.
    kv_params: Any = None
    # Whether a block may come back holding another KV format's bytes: vLLM
    # puts one layer of each KV-cache group on one tensor and gives all groups
    # one block pool, so when the model mixes formats a block freed by a packed
    # (``kivi``) layer can be handed to this layer with NaN patterns in the
    # slots not yet written (``ModelPlan.mixes_kv_formats``).
    foreign_pages: bool = False


class Runner:
    family: ClassVar[str]
    kv_format: ClassVar[str]
    path: ClassVar[str]
    devices: ClassVar[tuple[str, ...]]
    in_step_free: ClassVar[bool] = False
    decodes_first: ClassVar[bool] = False
    host_lengths: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, params: Any, block_size: int) -> str | None:
        """Why this runner cannot run a layer kind with ``params`` (a
        ``SparsePattern`` for sparse kinds) at ``block_size``; None if it can."""
        return None

    @classmethod
    def describe(cls) -> str:
        return f"{cls.family}/{cls.kv_format}/{cls.path}"

    def __init__(self, geometry: Geometry, params: Any) -> None:
        self.geometry = geometry
        self.params = params  # the layer kind's parameters (plan.LayerPlan.params)
        self.format = FORMATS[self.kv_format]

    def plan(self, md: "AdaptiveMetadata") -> StepPlan | None:
        return None

    def write(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # vLLM's per-layer cache tensor (see formats/)
        slot_mapping: torch.Tensor,  # [num_tokens], -1 = padding
        md: "AdaptiveMetadata | None",  # None in profiling / warm-up runs
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
