"""The host tier: where released blocks wait to be rebuilt.

Two halves, one per side of the process boundary, each with paired verbs:

* :class:`HostSlots` (scheduler, one per release group) decides which host
  slot a released block goes to: ``allocate`` / ``free``. A slot emptied by
  a copy-in is free only once the step's copies ran (``end_step``): a
  copy-out into it before its copy-in would clobber it.
* :class:`HostPages` (worker, one per rank) holds the pages:
  ``copy_out`` (device block -> host slot) / ``copy_in`` (host slot -> device
  block), per layer, plus the key min/max per slot that the query-aware
  rebuild bound reads (``release/importance.py``).

The scheduler queues the copies; the worker runs them before the step's
forward pass, copy-outs first, so a block released and handed to another
request in the same step is saved before it is overwritten.
"""

from __future__ import annotations

import torch

from vllm_adaptive.formats import split_kv_cache


class HostSlots:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._freeing: list[int] = []  # emptied by this step's copy-ins

    def allocate(self) -> int | None:
        """A free slot, or None when the tier is full."""
        return self._free.pop() if self._free else None

    def free(self, slot: int, *, after_step: bool = False) -> None:
        """Return ``slot``; with ``after_step``, only once this step's copies ran."""
        (self._freeing if after_step else self._free).append(slot)

    def end_step(self) -> None:
        """The step's copies are handed to the workers: deferred frees take effect."""
        self._free.extend(self._freeing)
        self._freeing = []

    @property
    def in_use(self) -> int:
        return self.num_slots - len(self._free) - len(self._freeing)

    def free_slots(self) -> tuple[list[int], list[int]]:
        """(free now, free after this step), for invariant checks."""
        return list(self._free), list(self._freeing)


class HostPages:
    def __init__(self, host_tokens: int) -> None:
        self.host_tokens = host_tokens
        self.pages: dict[str, torch.Tensor] = {}  # layer -> [slots, *page]
        self.kmin: dict[str, torch.Tensor] = {}  # layer -> [slots, Hkv, D] float32
        self.kmax: dict[str, torch.Tensor] = {}

    def _pages_of(self, layer: str, cache: torch.Tensor) -> torch.Tensor:
        if layer not in self.pages:
            n = self.host_tokens // cache.shape[2]
            # untouched pages of a CPU tensor cost no memory until written
            self.pages[layer] = torch.empty((n, *cache.shape[1:]), dtype=cache.dtype, pin_memory=cache.is_cuda)
            hkv, d = cache.shape[1], cache.shape[3] // 2
            self.kmin[layer] = torch.zeros((n, hkv, d), dtype=torch.float32)
            self.kmax[layer] = torch.zeros((n, hkv, d), dtype=torch.float32)
        return self.pages[layer]

    def copy_out(self, layer: str, cache: torch.Tensor, moves: list[tuple[int, int]]) -> None:
        """(device block, host slot) pairs: save the pages and their key min/max."""
        host = self._pages_of(layer, cache)
        blocks = torch.tensor([b for b, _ in moves], device=cache.device)
        slots = torch.tensor([s for _, s in moves])
        pages = cache.index_select(0, blocks)
        host[slots] = pages.to(host.device)
        keys = split_kv_cache(pages)[0].float()  # the model_dtype page layout
        self.kmin[layer][slots] = keys.amin(2).cpu()
        self.kmax[layer][slots] = keys.amax(2).cpu()

    def copy_in(self, layer: str, cache: torch.Tensor, moves: list[tuple[int, int]]) -> None:
        """(host slot, device block) pairs: bring the pages back."""
        host = self._pages_of(layer, cache)
        slots = torch.tensor([s for s, _ in moves])
        blocks = torch.tensor([b for _, b in moves], device=cache.device)
        cache[blocks] = host[slots].to(cache.device)

    def minmax(self, layer: str, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Key min/max [len(slots), Hkv, D] of saved pages."""
        idx = torch.tensor(slots)
        return self.kmin[layer][idx], self.kmax[layer][idx]
