"""GPU triage of tests/test_kivi_triton.py::test_odd_shapes (fp32 error 1e-3
on an H200): which of block size, head size, GQA padding, group < tile
triggers it. Prints max abs error per variant (a refused variant prints why).

Found on an H200 (2026-11-27): every variant with key tiles of 8 tokens (the
broadcast-and-sum path, no tl.dot) was wrong compiled: 1e-3 for prefill
rows, 1 to 3.6 for decode rows; right under the interpreter (1e-6). Tiles of
16 were right (<= 2.5e-6) for block 16, head size 24/32, GQA 2/3, groups 4
and 16. The launcher now refuses that path on GPUs."""
import sys
import torch

sys.path.insert(0, "tests")
from test_kivi_triton import Twin, _attend, _reference  # noqa: E402

from vllm_adaptive.formats.kivi import KiviLayout, KiviParams  # noqa: E402

for bits, (bs, g, r), d, hq, tile in [
    (4, (8, 4, 8), 24, 3, None), (8, (8, 4, 8), 24, 3, None), (4, (8, 8, 8), 24, 3, None),
    (4, (8, 4, 8), 32, 3, None), (4, (8, 4, 8), 24, 2, None), (4, (8, 4, 8), 24, 1, None),
    (4, (16, 4, 16), 24, 3, None), (4, (16, 4, 16), 32, 2, None), (4, (16, 16, 16), 24, 3, None),
    (4, (16, 4, 16), 24, 3, 8),
]:
    layout = KiviLayout.of(KiviParams(bits, g, r), bs, d, torch.float32)
    twin = Twin(layout, [21, 9], 1, torch.float32, seed=11)
    gen = torch.Generator().manual_seed(4)
    errs = []
    for chunk in [{0: 13, 1: 6}, {0: 6, 1: 3}, {0: 1}, {0: 1}]:
        qsl, lens = twin.step(chunk)
        q = torch.randn(int(qsl[-1]), hq, d, generator=gen)
        kw = {"tile_n": tile} if tile else {}
        try:
            got = _attend(layout, twin, q, qsl, lens, 0.3, None, **kw)
        except ValueError as e:
            errs.append(f"refused: {e}")
            break
        ref = _reference(twin, q, qsl, lens, 0.3, None)
        errs.append(f"{(got - ref).abs().max().item():.1e}(q={q.shape[0]})")
    print(f"bits {bits} bs {bs} g {g} r {r} d {d} hq {hq} tile {tile}: {' '.join(errs)}", flush=True)
