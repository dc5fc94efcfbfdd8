"""``kivi``: KIVI-style quantized KV (arXiv 2402.02750), int8 / int4 / int2.

Keys are quantized **per channel** over groups of ``group_size`` tokens
(KIVI: 32), values **per token** over groups of ``value_group`` channels
(KIVI: 32). Quantization is asymmetric: ``code = round((x - min) / scale)``,
``x ~ code * scale + min``, with ``scale`` and ``min`` stored as float16.

**Residual window** (KIVI's R). The newest tokens' keys *and values* stay in
the model's dtype: positions are cut into aligned segments of ``residual``
tokens (``group_size`` divides ``residual``, ``residual`` divides the block
size, so a segment never spans two blocks); the keys and values of the
segment that holds the newest token are kept in full precision, and when a
segment completes its keys are quantized group by group and its values token
by token into their block's page. A request therefore has between 0 and
``residual - 1`` full-precision tokens, as in KIVI.

**Prefill in full precision.** Attention reads this step's own tokens from
the fresh key / value tensors (as KIVI's prefill does), older tokens from
the pages (``kernels/kivi.py``), so a chunk never attends to its own
quantization error.

**Rotation** (``rotation``, an option KIVI lacks): an orthonormal Hadamard
transform of each head's values (``v``) or keys and values (``kv``) before
they are written, applied to the query alike and undone on the output
(QuaRot, TurboQuant), which spreads a channel's outliers over the head.
Attention is unchanged in exact arithmetic (``q.k = (qH).(kH)``, ``sum p v =
(sum p vH) H^T``); only the quantization error moves.

**Where the residual lives.** In vLLM-allocated blocks, so the allocator and
admission count it: every request holds ``residual_pages`` blocks beyond the
ones its tokens need (``kv/specs.py``: ``residual_blocks``, added by the
managers to every allocation, and to the worker's block-table width). The
residual tokens of a segment that starts in block index ``j`` are stored in
the pages of block indices ``j + 1 .. j + residual_pages`` of the request's
block table, which are allocated and not yet written (they hold tokens only
after the segment completes). A block that holds tokens is therefore always
in packed form once full, so prefix caching, preemption and recompute need
nothing special.

**Page layout.** vLLM hands a layer ``kv_cache`` of logical shape
``[num_blocks, num_kv_heads, block_size, C]`` in the model dtype, where ``C``
is ``state_content_bytes / itemsize`` (the spec's packed token size). Each
(block, head) page is ``block_size * C_bytes`` bytes, laid out as::

    k_codes   [block_size, D / p] uint8   p = 8 / bits codes per byte
    v_codes   [block_size, D / p] uint8
    v_scale   [block_size, D / value_group, 2] float16   (scale, min) per token, channel group
    k_scale   [block_size / group, 2, D] float16         (scale, min) per token group, channel
    (padding to block_size * C_bytes)

Codes are packed *planar*: byte ``j`` of a token holds channels
``j + s * D / p`` in bits ``s * bits .. s * bits + bits - 1``. Kernels then
never interleave: sub-plane ``s`` is a contiguous channel range.

A residual page holds ``residual_tokens_per_page`` tokens per head, row-major
``[tokens, 2, D]`` (key, value) in the model dtype, at the start of the
head's page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from vllm_adaptive.errors import AdaptiveConfigError, config_error
from vllm_adaptive.formats.base import KVFormat

BITS = (8, 4, 2)
SCALE_DTYPE = torch.float16
ROTATIONS = ("none", "v", "kv")
#: KIVI's group: 32 tokens per key scale, 32 channels per value scale
#: (``null`` group_size / value_group; ``gcd(32, block / head size)`` when
#: 32 does not divide them).
KIVI_GROUP = 32


@dataclass(frozen=True)
class KiviParams:
    """What the user configures (``adaptive_attention.kivi``). ``None`` for
    ``group_size`` / ``value_group`` means KIVI's 32 (``gcd(32, block / head
    size)`` when 32 does not divide them), for ``residual`` the engine's
    block size."""

    bits: int = 4
    group_size: int | None = None
    residual: int | None = None
    value_group: int | None = None
    rotation: str = "none"

    def describe(self) -> str:
        g = self.group_size or KIVI_GROUP
        r = self.residual or "block"
        vg = self.value_group or KIVI_GROUP
        rot = "" if self.rotation == "none" else f" rot-{self.rotation}"
        return f"int{self.bits} g{g} r{r} vg{vg}{rot}"

    def on_block(self, block_size: int) -> tuple[int, int]:
        """(key group, residual) on this block size, ``null`` resolved."""
        return self.group_size or math.gcd(KIVI_GROUP, block_size), self.residual or block_size


KEY_FIELD = {"group_size": "group", "residual": "residual", "value_group": "value_group"}


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
    itemsize: int  # bytes of the model dtype (residual keys / values)
    value_group: int  # channels per value scale
    rotation: str = "none"

    @classmethod
    def of(cls, params: KiviParams, block_size: int, head_size: int, dtype: torch.dtype) -> "KiviLayout":
        itemsize = torch.empty((), dtype=dtype).element_size()
        group, residual = params.on_block(block_size)
        return cls(
            bits=params.bits,
            group=group,
            residual=residual,
            block_size=block_size,
            head_size=head_size,
            itemsize=itemsize,
            value_group=params.value_group or math.gcd(KIVI_GROUP, head_size),
            rotation=params.rotation,
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
        if self.head_size % self.value_group:
            return f"value_group {self.value_group}: expected a divisor of the head size {self.head_size}"
        if self.rotation not in ROTATIONS:
            return f"rotation {self.rotation!r}: expected one of {list(ROTATIONS)}"
        if self.rotation != "none" and self.head_size & (self.head_size - 1):
            return f"rotation {self.rotation!r}: the Hadamard transform needs a power-of-two head size, got {self.head_size}"
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
    def v_groups(self) -> int:
        """Value scales per token (channel groups)."""
        return self.head_size // self.value_group

    @property
    def v_codes_off(self) -> int:
        return self.block_size * self.code_cols

    @property
    def v_scale_off(self) -> int:
        return 2 * self.block_size * self.code_cols

    @property
    def k_scale_off(self) -> int:
        return self.v_scale_off + 4 * self.block_size * self.v_groups

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
        """Residual tokens (a key and a value each) one page holds per head."""
        return self.page_bytes // (2 * self.head_size * self.itemsize)

    @property
    def residual_pages(self) -> int:
        """Blocks each request holds beyond its tokens' for the residual tokens."""
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
        tpp = self.residual_tokens_per_page
        return KiviViews(
            k_codes=p[:, :, : self.v_codes_off].view(nb, h, bs, cc),
            v_codes=p[:, :, self.v_codes_off : self.v_scale_off].view(nb, h, bs, cc),
            v_scale=p[:, :, self.v_scale_off : self.k_scale_off].view(SCALE_DTYPE)
            .view(nb, h, bs, self.v_groups, 2),
            k_scale=p[:, :, self.k_scale_off : self.content_bytes].view(SCALE_DTYPE).view(nb, h, ng, 2, d),
            residual=p[:, :, : tpp * 2 * d * self.itemsize].view(kv_cache.dtype).view(nb, h, tpp, 2, d),
        )


@dataclass(frozen=True)
class KiviViews:
    k_codes: torch.Tensor  # [NB, H, bs, D/p] uint8
    v_codes: torch.Tensor  # [NB, H, bs, D/p] uint8
    v_scale: torch.Tensor  # [NB, H, bs, D/value_group, 2] float16
    k_scale: torch.Tensor  # [NB, H, bs/G, 2, D] float16
    residual: torch.Tensor  # [NB, H, tokens_per_page, 2, D] model dtype (residual pages only)


class KiviFormat(KVFormat):
    name = "kivi"
    key = "kivi"
    #: KIVI's own settings: ``null`` group_size / value_group are KIVI's 32
    #: tokens / channels (``KIVI_GROUP``), ``null`` residual the block (128
    #: on CPU, KIVI's R = 128).
    defaults = {"bits": 4, "group_size": None, "residual": None, "value_group": None, "rotation": "none"}

    def parse(self, value) -> KiviParams:
        merged = self._merged(value)
        bits = merged["bits"]
        if isinstance(bits, bool) or bits not in BITS:
            raise config_error("kivi.bits", f"one of {list(BITS)}", bits)
        for k, null in (("group_size", f"{KIVI_GROUP} (KIVI)"), ("residual", "the block size"),
                        ("value_group", f"{KIVI_GROUP} (KIVI)")):
            v = merged[k]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise config_error(f"kivi.{k}", f"a positive int, or null for {null}", v)
        if merged["rotation"] not in ROTATIONS:
            raise config_error("kivi.rotation", f"one of {list(ROTATIONS)}", merged["rotation"])
        return KiviParams(**merged)

    def describe(self, params: KiviParams) -> str:
        return params.describe()

    def check_engine(self, params: KiviParams, block_size: int, max_model_len: int) -> None:
        g, r = params.on_block(block_size)
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

        layout = self._checked(KiviLayout.of(params, spec.block_size, spec.head_size, spec.dtype))
        spec = replace(spec, state_content_bytes=layout.token_bytes)
        return with_residual_blocks(spec, layout.residual_pages)

    def layout(self, geometry) -> KiviLayout:
        """The page layout of a runner's layers; raises naming the key if impossible."""
        return self._checked(KiviLayout.of(geometry.kv_params, geometry.block_size, geometry.head_size,
                                           geometry.dtype))

    @staticmethod
    def _checked(layout: KiviLayout) -> KiviLayout:
        """``layout``, or the start-up error for the rules that need the head
        size (value groups, the rotation's power-of-two head)."""
        why = layout.check()
        if why:
            raise AdaptiveConfigError(f"adaptive_attention.kivi: {why}")
        return layout

    def views(self, kv_cache: torch.Tensor, geometry) -> KiviViews:
        return self.layout(geometry).views(kv_cache)
