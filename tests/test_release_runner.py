"""The release runner (``release/runner.py``) and the worker-side scoring
(``release/importance.py``) against references, with poisoned pages.

A case is a step of requests (decodes, a prefill chunk behind a context) in
which some blocks were released by the scheduler: the connector's metadata
carries each request's true table (null entries), while vLLM's own block
table still holds the stale ids, whose pages now belong to someone else and
are filled with NaN here. The answer is causal attention in float32 over the
held tokens only; any read of a released block poisons the output.
"""

from __future__ import annotations

import pytest
import torch

from vllm_adaptive import reference as ref
from vllm_adaptive.importance.scorers.quest import bound, key_minmax
from vllm_adaptive.metadata import AdaptiveMetadata
from vllm_adaptive.release.importance import OBS_ROWS, WorkerImportance
from vllm_adaptive.release.kind import ReleaseParams
from vllm_adaptive.release.messages import AdoreMeta
from vllm_adaptive.release.runner import ReleaseTorch
from vllm_adaptive.runners import Geometry

from paged_cases import NULL_PAGE, paged_case
from tolerances import U_FP32, attention_atol, dot_bound

BS = 32
SEQ_LENS, QUERY_LENS = [300, 257, 333, 40], [1, 1, 100, 40]
# released block indices per request (never the sink, recent or last block)
RELEASED = {0: [2, 3, 5], 1: [1, 4], 2: [1, 2, 3, 6], 3: []}


class FakeWorker:
    """What the connector's worker half binds to a step: its importance state
    and the host tier's key min/max."""

    def __init__(self, params, host_kminmax=None):
        self.importance = WorkerImportance(params)
        self.host_kminmax = host_kminmax or {}

    def host_minmax(self, layer, slots):
        kmin = torch.stack([self.host_kminmax[s][0] for s in slots])
        kmax = torch.stack([self.host_kminmax[s][1] for s in slots])
        return kmin, kmax


def make_case(dtype, released=RELEASED):
    case = paged_case(SEQ_LENS, QUERY_LENS, 4, 2, 16, BS, dtype, seed=3, num_blocks=64)
    case.store_step()
    meta = AdoreMeta()
    stale = {}
    for r, ctx, s, _ in case.requests():
        first = int(case.block_table[r, 0])
        meta.req_of[first] = f"req{r}"
        if released[r]:
            table = case.block_table[r, :-(-s // BS)].tolist()
            for i in released[r]:
                stale[(r, i)] = table[i]
                case.kv_pages[table[i]] = float("nan")  # reused by another request
                table[i] = NULL_PAGE
            meta.tables[first] = table
            meta.host_of[first] = [(i, 10 + i) for i in released[r]]
    return case, meta


def _slots(cache, slots):
    """[num_blocks, H, bs, D] cache -> [len(slots), H, D] rows of those slots."""
    return cache.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])[slots]


def held_reference(case, released, scale):
    """Causal attention over each request's held tokens, float32."""
    out = torch.empty(case.query.shape, dtype=torch.float32)
    bs = case.block_size
    for r, ctx, s, q0 in case.requests():
        pos = [p for p in range(s) if p // bs not in released[r]]
        slots = [case.slot(r, p) for p in pos]
        k, v = _slots(case.key_cache, slots), _slots(case.value_cache, slots)
        ql = s - ctx
        q = case.query[q0:q0 + ql].float()
        mask = torch.tensor(pos)[None, :] <= torch.arange(ctx, s)[:, None]
        ref._masked_heads(q, k.float(), v.float(), mask, scale, out[q0:q0 + ql])
    return out


def run(case, meta, params, dtype, layer_idx=0, host=None):
    geom = Geometry(num_heads=4, num_kv_heads=2, head_size=16, dtype=dtype, kv_cache_dtype="auto",
                    block_size=BS, null_slot_end=BS)
    runner = ReleaseTorch(geom, params)
    runner.layer_name, runner.layer_idx = "model.layers.0.self_attn.attn", layer_idx
    md = AdaptiveMetadata(
        num_actual_tokens=int(case.query_start_loc[-1]), max_query_len=max(QUERY_LENS),
        max_seq_len=max(SEQ_LENS), query_start_loc=case.query_start_loc, seq_lens=case.seq_lens,
        query_start_loc_cpu=case.query_start_loc, block_table=case.block_table,
        slot_mapping=case.step_slots(), seq_lens_cpu=case.seq_lens,
    )
    md.step = runner.plan(md)
    conn = FakeWorker(params, host)
    md.step.bind(meta, conn.importance, conn.host_minmax)
    out = torch.empty_like(case.query)
    runner.attend(case.query, case.key, case.value, case.kv_pages, md, 0.25, out)
    return out, conn, md.step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attends_held_blocks_only(dtype):
    case, meta = make_case(dtype)
    out, _, _ = run(case, meta, ReleaseParams(scorer="recent", rebuild=0), dtype)
    assert torch.isfinite(out).all(), "a released (poisoned) block was read"
    want = held_reference(case, RELEASED, 0.25)
    torch.testing.assert_close(out.float(), want, atol=_atol(case, dtype), rtol=0)


def test_nothing_released_is_full_attention():
    none = {r: [] for r in RELEASED}
    case, meta = make_case(torch.float32, none)
    out, _, _ = run(case, meta, ReleaseParams(scorer="recent", rebuild=0), torch.float32)
    torch.testing.assert_close(out, held_reference(case, none, 0.25), atol=_atol(case, torch.float32), rtol=0)


def test_refuses_a_step_without_bound_tables():
    """Without the connector's tables the worker's block table is stale once a
    block is released: the runner must refuse, not attend over it."""
    case, _ = make_case(torch.float32)
    geom = Geometry(4, 2, 16, torch.float32, "auto", BS, BS)
    runner = ReleaseTorch(geom, ReleaseParams())
    md = AdaptiveMetadata(int(case.query_start_loc[-1]), 100, 333, case.query_start_loc, case.seq_lens,
                          case.query_start_loc, case.block_table, case.step_slots(), case.seq_lens)
    md.step = runner.plan(md)
    out = torch.full_like(case.query, 7.0)
    with pytest.raises(RuntimeError, match="never bound.*AdoreConnector"):
        runner.attend(case.query, case.key, case.value, case.kv_pages, md, 0.25, out)
    assert (out == 7.0).all()


def _atol(case, dtype) -> float:
    """float32 / bf16 rounding bound of the attention output (tests/tolerances.py)."""
    return attention_atol(dtype, case.query, case.key_cache, case.value_cache, max(SEQ_LENS), 0.25)


def _held_keys(case, r, released):
    s = int(case.seq_lens[r])
    pos = [p for p in range(s) if p // BS not in released[r]]
    slots = [case.slot(r, p) for p in pos]
    k = _slots(case.key_cache, slots)
    return k.transpose(0, 1).float(), sorted({p // BS for p in pos})


def test_h2o_scores_are_attention_mass_of_held_blocks():
    case, meta = make_case(torch.float32)
    _, conn, step = run(case, meta, ReleaseParams(scorer="h2o", rebuild=0), torch.float32)
    scores, bounds = conn.importance.take()
    assert not bounds
    for r, ctx, s, q0 in case.requests():
        keys, held = _held_keys(case, r, RELEASED)
        q = case.query[max(q0, q0 + s - ctx - OBS_ROWS):q0 + s - ctx].float()
        kk = keys.repeat_interleave(2, 0)
        p = torch.softmax(torch.einsum("qhd,hld->hql", q, kk) * 0.25, -1).sum((0, 1))
        want = {b: float(p[j * BS:(j + 1) * BS].sum()) for j, b in enumerate(held)}
        got = scores[f"req{r}"]
        assert set(got) == set(held), "scored a released block"
        # Sums of positive float32 terms keep a relative bound (Higham 3.1):
        # each probability is off by the softmax normaliser's gamma_n and
        # its logit's d-term dot product; a block sums 32 of them, and the
        # rows x heads sums add gamma_(rows x heads).
        rel = U_FP32 * (2 * s + BS + len(q) * 4 + 2 * 16 * 0.25 * dot_bound(q, keys))
        for b in held:
            assert got[b] == pytest.approx(want[b], rel=rel, abs=0)
        assert sum(got.values()) == pytest.approx(len(q) * 4, rel=rel + U_FP32 * len(held))  # Q rows x H heads


def test_rebuild_bounds_cover_held_and_host_blocks():
    case, meta = make_case(torch.float32)
    g = torch.Generator().manual_seed(1)
    host = {10 + i: (torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g) + 3)
            for i in range(8)}
    _, conn, _ = run(case, meta, ReleaseParams(scorer="quest", rebuild=2), torch.float32,
                     host=host)
    scores, bounds = conn.importance.take()
    for r, ctx, s, q0 in case.requests():
        if not RELEASED[r]:
            assert f"req{r}" not in bounds  # nothing to rebuild: no bound work
            continue
        keys, held = _held_keys(case, r, RELEASED)
        q = case.query[q0 + s - ctx - 1].float()
        kmin, kmax = key_minmax(keys, BS)
        want_held = bound(q, kmin, kmax, 0.25)
        got = bounds[f"req{r}"]
        # a bound is scale * a 16-term sum of mixed signs: each evaluation is
        # off by at most gamma_16 * scale * sum |q_j| max|k_j| (absolute)
        hk = torch.cat([keys.reshape(-1, 16)] + [torch.cat(host[10 + i]) for i in RELEASED[r]])
        tol = 2 * 16 * U_FP32 * 0.25 * dot_bound(q.reshape(4, 16), hk)
        for j, b in enumerate(held):
            assert got[b] == pytest.approx(float(want_held[j]), rel=0, abs=tol)
            assert scores[f"req{r}"][b] == pytest.approx(float(want_held[j]), rel=0, abs=tol)
        for i in RELEASED[r]:
            hmin, hmax = host[10 + i]
            assert got[i] == pytest.approx(float(bound(q, hmin[None], hmax[None], 0.25)[0]), rel=0, abs=tol)
        # the bound really bounds: no held key's logit exceeds its block's bound
        logits = torch.einsum("hd,hld->hl", q.reshape(4, 16), keys.repeat_interleave(2, 0)) * 0.25
        for j, b in enumerate(held):
            assert float(logits[:, j * BS:(j + 1) * BS].max()) <= got[b] + tol


def test_gru_scores_this_steps_tokens_in_its_layer(monkeypatch):
    from vllm_adaptive.importance import controller as ctl_mod
    from vllm_adaptive.importance.controller import Controller

    ctl = Controller(32, 8)
    ctl.layer = 3
    ctl.eval()
    monkeypatch.setattr(ctl_mod, "load_controller", lambda path: ctl)
    import vllm_adaptive.importance.scorers.gru as gru_mod
    monkeypatch.setattr(gru_mod, "load_controller", lambda path: ctl)
    case, meta = make_case(torch.float32)
    params = ReleaseParams(scorer="gru", rebuild=0)
    _, conn, _ = run(case, meta, params, torch.float32, layer_idx=2)
    assert conn.importance.take() == ({}, {})  # not the controller's layer
    _, conn, _ = run(case, meta, params, torch.float32, layer_idx=3)
    scores, _ = conn.importance.take()
    for r, ctx, s, q0 in case.requests():
        v = case.value[q0:q0 + s - ctx].reshape(s - ctx, -1)
        sigma, _ = ctl.step(v, torch.arange(ctx, s), None)
        blocks = torch.arange(ctx, s) // BS
        want = {int(b): float(sigma[blocks == b].max()) for b in blocks.unique()}
        # the same controller on the same rows: only how rows are batched can
        # differ, a few float32 ulps (2^-24 each) of values in (0, 1)
        assert scores[f"req{r}"] == pytest.approx(want, rel=0, abs=16 * U_FP32)
