"""``kivi``: KIVI-style quantized KV (arXiv 2402.02750), int8 / int4 / int2.

Keys are quantized **per channel** over groups of ``group_size`` tokens,
values **per token** (one scale and minimum per token and KV head, over the
whole head). Quantization is asymmetric: ``code = round((x - min) / scale)``,
``x ~ code * scale + min``, with ``scale`` and ``min`` stored as float16.

**Residual window.** Per-channel key scales need a complete group, and KIVI
keeps the newest tokens' keys in full precision. Here the residual is the
request's current *residual segment*: positions are cut into aligned segments
of ``residual`` tokens (``group_size`` divides ``residual``, ``residual``
divides the block size, so a segment never spans two blocks). The keys of the
segment that holds the newest token stay in the model's dtype; when a segment
completes, its keys are quantized group by group into their block's page.
Values are quantized at once (per token needs no group). A request therefore
has between 0 and ``residual - 1`` full-precision keys, as in KIVI.

**Where the residual lives.** In vLLM-allocated blocks, so the allocator and
admission count it: every request holds ``residual_pages`` blocks beyond the
ones its tokens need (``kv/specs.py``: ``residual_blocks``, added by the
managers to every allocation, and to the worker's block-table width). The
residual keys of a segment that starts in block index ``j`` are stored in the
pages of block indices ``j + 1 .. j + residual_pages`` of the request's block
table, which are allocated and not yet written (they hold tokens only after
the segment completes). A block that holds tokens is therefore always in
packed form once full, so prefix caching, preemption and recompute need
nothing special.

**Page layout.** vLLM hands a layer ``kv_cache`` of logical shape
``[num_blocks, num_kv_heads, block_size, C]`` in the model dtype, where ``C``
is ``state_content_bytes / itemsize`` (the spec's packed token size). Each
(block, head) page is ``block_size * C_bytes`` bytes, laid out as::

    k_codes   [block_size, D / p] uint8   p = 8 / bits codes per byte
    v_codes   [block_size, D / p] uint8
    v_scale   [block_size, 2] float16     (scale, min) per token
    k_scale   [block_size / group, 2, D] float16   (scale, min) per group, channel
    (padding to block_size * C_bytes)

Codes are packed *planar*: byte ``j`` of a token holds channels
``j + s * D / p`` in bits ``s * bits .. s * bits + bits - 1``. Kernels then
never interleave: sub-plane ``s`` is a contiguous channel range.

A residual page holds ``residual_tokens_per_page`` keys per head, row-major
``[tokens, D]`` in the model dtype, at the start of the head's page.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_adaptive.errors import config_error
from vllm_adaptive.formats.base import KVFormat

BITS = (8, 4, 2)
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class KiviParams:
    """What the user configures (``adaptive_attention.kivi``). ``None`` for
    ``group_size`` / ``residual`` means the engine's block size."""

    bits: int = 4
    group_size: int | None = None
    residual: int | None = None

    def describe(self) -> str:
        g = self.group_size or "block"
        r = self.residual or "block"
        return f"int{self.bits} g{g} r{r}"


KEY_FIELD = {"group_size": "group", "residual": "residual"}


def params_problem(group: int, residual: int, block_size: int) -> tuple[str, str] | None:
    """(key, what is allowed) of the first group / residual rule broken, else
    None: the one statement of these rules (``KiviLayout.check`` and the
    start-up check ``config.check_kivi_engine`` both ask it)."""
    if block_size % group:
        return "group_size", f"a divisor of the block size {block_size}"
    if residual % group or block_size % residual:
        return "residual", f"a multiple of group_size {group} that divides the block size {block_size}"
    return None


@dataclass(frozen=True)
class KiviLayout:
    bits: int
    group: int
    residual: int
    block_size: int
    head_size: int
    itemsize: int  # bytes of the model dtype (residual keys)

    @classmethod
    def of(cls, params: KiviParams, block_size: int, head_size: int, dtype: torch.dtype) -> "KiviLayout":
        itemsize = torch.empty((), dtype=dtype).element_size()
        return cls(
            bits=params.bits,
            group=params.group_size or block_size,
            residual=params.residual or block_size,
            block_size=block_size,
            head_size=head_size,
            itemsize=itemsize,
        )

    def check(self) -> str | None:
        """Why this layout cannot exist; None if it can."""
        if self.bits not in BITS:
            return f"bits must be one of {list(BITS)}, got {self.bits}"
        if self.head_size % self.per_byte:
            return f"head size {self.head_size} is not a multiple of {self.per_byte} (int{self.bits})"
        bad = params_problem(self.group, self.residual, self.block_size)
        if bad:
            key, allowed = bad
            return f"{key} {getattr(self, KEY_FIELD[key])}: expected {allowed}"
        return None

    # ---------------------------------------------------------------- sizes
    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def code_cols(self) -> int:
        return self.head_size // self.per_byte

    @property
    def groups_per_block(self) -> int:
        return self.block_size // self.group

    @property
    def v_codes_off(self) -> int:
        return self.block_size * self.code_cols

    @property
    def v_scale_off(self) -> int:
        return 2 * self.block_size * self.code_cols

    @property
    def k_scale_off(self) -> int:
        return self.v_scale_off + 4 * self.block_size

    @property
    def content_bytes(self) -> int:
        """Bytes one (block, head) page needs."""
        return self.k_scale_off + 4 * self.head_size * self.groups_per_block

    @property
    def token_bytes(self) -> int:
        """``state_content_bytes``: page bytes per token, a whole number of
        model-dtype elements (vLLM views the cache in the model dtype)."""
        per = -(-self.content_bytes // self.block_size)
        return -(-per // self.itemsize) * self.itemsize

    @property
    def page_bytes(self) -> int:
        return self.block_size * self.token_bytes

    @property
    def residual_tokens_per_page(self) -> int:
        return self.page_bytes // (self.head_size * self.itemsize)

    @property
    def residual_pages(self) -> int:
        """Blocks each request holds beyond its tokens' for the residual keys."""
        return -(-self.residual // self.residual_tokens_per_page)

    def bytes_per_token(self, num_kv_heads: int) -> float:
        """Packed bytes per token and layer, the residual pages excluded."""
        return num_kv_heads * self.token_bytes

    # ---------------------------------------------------------------- views
    def pages(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """``[num_blocks, H, page_bytes]`` uint8 view of a layer's cache."""
        if kv_cache.dim() != 4:
            raise ValueError(f"kv_cache: expected 4 dims, got shape {tuple(kv_cache.shape)}")
        u8 = kv_cache.view(torch.uint8)
        nb, h, bs, c = u8.shape
        if bs != self.block_size or c != self.token_bytes:
            raise ValueError(
                f"kv_cache: expected [*, *, {self.block_size}, {self.token_bytes}] bytes for "
                f"{self}, got {tuple(u8.shape)}"
            )
        return u8.reshape(nb, h, bs * c)

    def views(self, kv_cache: torch.Tensor) -> "KiviViews":
        p = self.pages(kv_cache)
        nb, h, _ = p.shape
        bs, cc, d, ng = self.block_size, self.code_cols, self.head_size, self.groups_per_block
        return KiviViews(
            k_codes=p[:, :, : self.v_codes_off].view(nb, h, bs, cc),
            v_codes=p[:, :, self.v_codes_off : self.v_scale_off].view(nb, h, bs, cc),
            v_scale=p[:, :, self.v_scale_off : self.k_scale_off].view(SCALE_DTYPE).view(nb, h, bs, 2),
            k_scale=p[:, :, self.k_scale_off : self.content_bytes].view(SCALE_DTYPE).view(nb, h, ng, 2, d),
            residual=p[:, :, : self.residual_tokens_per_page * d * self.itemsize]
            .view(kv_cache.dtype).view(nb, h, self.residual_tokens_per_page, d),
        )


@dataclass(frozen=True)
class KiviViews:
    k_codes: torch.Tensor  # [NB, H, bs, D/p] uint8
    v_codes: torch.Tensor  # [NB, H, bs, D/p] uint8
    v_scale: torch.Tensor  # [NB, H, bs, 2] float16
    k_scale: torch.Tensor  # [NB, H, bs/G, 2, D] float16
    residual: torch.Tensor  # [NB, H, tokens_per_page, D] model dtype (residual pages only)


class KiviFormat(KVFormat):
    name = "kivi"
    key = "kivi"
    #: ``null`` group_size / residual mean the engine's block size.
    defaults = {"bits": 4, "group_size": None, "residual": None}

    def parse(self, value) -> KiviParams:
        merged = self._merged(value)
        bits = merged["bits"]
        if isinstance(bits, bool) or bits not in BITS:
            raise config_error("kivi.bits", f"one of {list(BITS)}", bits)
        for k in ("group_size", "residual"):
            v = merged[k]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise config_error(f"kivi.{k}", "a positive int, or null for the block size", v)
        return KiviParams(**merged)

    def describe(self, params: KiviParams) -> str:
        return params.describe()

    def check_engine(self, params: KiviParams, block_size: int, max_model_len: int) -> None:
        g = params.group_size or block_size
        r = params.residual or block_size
        bad = params_problem(g, r, block_size)
        if bad:
            key, allowed = bad
            raise config_error(f"kivi.{key}", allowed, getattr(params, key))
        if r > max_model_len:
            raise config_error("kivi.residual", f"at most the model's length {max_model_len}", params.residual)

    def kv_spec(self, spec, params: KiviParams):
        """Packed page size (``state_content_bytes``) and the residual pages
        each request holds (``residual_blocks``, see ``kv/specs.py``)."""
        # lazy: kv.specs subclasses vLLM's spec classes, and the kernels that
        # read this format's layout must import without vLLM (kernels/__init__.py)
        from vllm_adaptive.kv.specs import with_residual_blocks

        layout = KiviLayout.of(params, spec.block_size, spec.head_size, spec.dtype)
        spec = replace(spec, state_content_bytes=layout.token_bytes)
        return with_residual_blocks(spec, layout.residual_pages)

    def layout(self, geometry) -> KiviLayout:
        """The page layout of a runner's layers; raises naming the key if impossible."""
        layout = KiviLayout.of(geometry.kv_params, geometry.block_size, geometry.head_size, geometry.dtype)
        why = layout.check()
        if why:
            raise ValueError(f"adaptive_attention.kivi: {why}")
        return layout

    def views(self, kv_cache: torch.Tensor, geometry) -> KiviViews:
        return self.layout(geometry).views(kv_cache)
