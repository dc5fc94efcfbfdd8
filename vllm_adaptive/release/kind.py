"""``release``: ADORE-style adaptive token release to a fixed KV budget.

A release layer attends to every block its request still holds. The request
holds at most ``budget`` tokens of blocks: the first ``sink`` tokens and the
last ``recent`` tokens always, and of the rest the blocks with the highest
importance score (``scorer``, ``vllm_adaptive/importance/scorers``). The
lowest-scoring blocks beyond the budget go back to vLLM's pool, after a copy
to a host tier of ``host_tokens`` tokens; up to ``rebuild`` of them per step
and request come back when the query-aware bound of the current queries
rates them above the weakest kept block (0: never). ``controller`` is the GRU
controller's weights file (null: the one shipped for the embedded model).
``prefill_chunk`` bounds the tokens one request computes per step (vLLM's
``long_prefill_token_threshold``): a request holds its budget plus one chunk.

Where each part lives and runs: ``release/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.config import KVTransferConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_adaptive import BACKEND_NAME
from vllm_adaptive.errors import CONFIG_KEY, AdaptiveConfigError, config_error
from vllm_adaptive.importance.controller import check_controller_fits, load_controller
from vllm_adaptive.importance.scorers import SCORERS as _SCORERS
from vllm_adaptive.layer_kind import LayerKind
from vllm_adaptive.release.spec import ReleaseBudgetSpec
from vllm_adaptive.sparse_pattern import cdiv

#: The KV connector release layers install (``release/connector.py``, which
#: checks that it is found at ``CONNECTOR_MODULE``; not imported here).
CONNECTOR_NAME = "AdoreConnector"
CONNECTOR_MODULE = "vllm_adaptive.release.connector"

#: Scorers (``importance/scorers``): higher score = keep.
SCORERS: tuple[str, ...] = tuple(_SCORERS)


@dataclass(frozen=True)
class ReleaseParams:
    budget: int = 1024
    sink: int = 128
    recent: int = 256
    scorer: str = "gru"
    rebuild: int = 4
    host_tokens: int = 32768
    controller: str | None = None
    prefill_chunk: int = 256

    def describe(self) -> str:
        return (
            f"budget={self.budget} sink={self.sink} recent={self.recent} "
            f"scorer={self.scorer} rebuild={self.rebuild}"
        )

    def blocks(self, block_size: int) -> tuple[int, int, int]:
        """(budget, sink, recent) in blocks of ``block_size`` tokens."""
        return self.budget // block_size, cdiv(self.sink, block_size), cdiv(self.recent, block_size)


_INT_MINIMUMS = {"budget": 1, "sink": 1, "recent": 0, "rebuild": 0, "host_tokens": 0, "prefill_chunk": 1}


class ReleaseKind(LayerKind):
    name = "release"
    family = "release"
    frees_blocks = True
    kv_connector = CONNECTOR_NAME
    defaults = {
        f: getattr(ReleaseParams, f) for f in ReleaseParams.__dataclass_fields__
    }

    def parse(self, value: Any) -> ReleaseParams:
        v = self._int_keys(value, _INT_MINIMUMS, keys=_INT_MINIMUMS)
        if v["scorer"] not in SCORERS:
            raise config_error("release.scorer", f"one of {list(SCORERS)}", v["scorer"])
        if v["controller"] is not None and not isinstance(v["controller"], str):
            raise config_error("release.controller", "a path to a controller file, or null", v["controller"])
        return ReleaseParams(**v)

    def check_engine(self, params: ReleaseParams, block_size: int, max_model_len: int) -> None:
        if params.budget % block_size:
            raise config_error(
                "release.budget", f"a multiple of the KV cache block size ({block_size})", params.budget
            )
        budget, sink, recent = params.blocks(block_size)
        need = sink + recent + 2
        if budget < need:
            raise config_error(
                "release.budget",
                f"at least {need * block_size} tokens at block size {block_size} (sink "
                f"{sink} + recent {recent} blocks + the block being filled + one scored block)",
                params.budget,
            )
        if params.budget >= max_model_len:
            raise AdaptiveConfigError(
                f"adaptive_attention.release.budget: {params.budget} tokens is not less than "
                f"max_model_len={max_model_len}, so nothing would ever be released; "
                "shrink it or use kind 'full'"
            )
        if params.scorer == "gru":
            load_controller(params.controller)  # raises naming release.controller

    def kv_spec(self, spec, params: ReleaseParams, *, chunk_tokens: int, in_step_free: bool):
        if type(spec) is not FullAttentionSpec:
            raise ValueError(
                "adaptive_attention: a release layer needs a plain full-attention layer, "
                f"but vLLM built a {type(spec).__name__} for it"
            )
        return ReleaseBudgetSpec.from_attention_spec(spec, params, chunk_tokens=chunk_tokens)

    def prepare_engine(self, cfg: Any, vllm_config: Any, logger: Any) -> None:
        """Release layers: their connector (the worker <-> scheduler channel,
        ``release/connector.py``), the per-request prefill chunk, and the
        controller's fit to the model."""
        params = cfg.params("release")
        ktc = vllm_config.kv_transfer_config
        if ktc is None:
            vllm_config.kv_transfer_config = KVTransferConfig(
                kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_both",
            )
            logger.info("%s: release layers report importance scores through KV connector %s.",
                        BACKEND_NAME, CONNECTOR_NAME)
        elif ktc.kv_connector != CONNECTOR_NAME:
            raise ValueError(
                f"{CONFIG_KEY}: release layers need their own KV connector ({CONNECTOR_NAME}), "
                f"but --kv-transfer-config sets {ktc.kv_connector!r}; drop it"
            )
        sched = vllm_config.scheduler_config
        if not sched.long_prefill_token_threshold:
            sched.long_prefill_token_threshold = params.prefill_chunk
            logger.info(
                "%s: long_prefill_token_threshold=%d (release.prefill_chunk): a release layer "
                "holds its budget plus one step's tokens per request.",
                BACKEND_NAME, params.prefill_chunk,
            )
        if params.scorer == "gru":
            model = vllm_config.model_config
            ctl = load_controller(params.controller)
            check_controller_fits(ctl, cfg.num_layers,
                                  model.get_total_num_kv_heads(), model.get_head_size())
            if cfg.kinds[ctl.layer] != "release":
                raise ValueError(
                    f"{CONFIG_KEY}.release.controller: the controller reads layer {ctl.layer}'s "
                    f"values, but the layer map (layer_kinds / full_layers / default_kind) makes that "
                    f"layer {cfg.kinds[ctl.layer]!r}, not a release layer; make layer {ctl.layer} a "
                    "release layer, set release.scorer to h2o, recent or quest, or pass a controller "
                    "trained on a release layer"
                )
