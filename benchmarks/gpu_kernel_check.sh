#!/usr/bin/env bash
# The Triton kernel tests compiled on CUDA, on a GPU machine with torch +
# triton + pytest but possibly without vLLM (the repository is used in place,
# not installed). Writes everything it prints to $OUT/gpu_kernels.log.
#
#   bash benchmarks/gpu_kernel_check.sh          # from the repository root
#
# On a GPU, conftest leaves TRITON_INTERPRET unset and ``on_device`` moves the
# tests' CPU tensors to CUDA, so the kernels run compiled.
#
# Without vLLM, a test file is run only if it imports (vLLM is never stubbed).
# All six import without vLLM since formats/kivi.py imports vLLM's spec classes
# only inside KiviFormat.kv_spec (checked on CPU with vllm blocked from import).
# The first GPU run (2026-12-04) predates that: only test_cpu_sparse imported,
# so step 2 launched the dense and sparse kernels on CUDA against
# vllm_adaptive.reference directly (36 launches, all within tolerance); step 2
# runs whenever test_kernels cannot be imported.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"

main() {
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

echo "== machine"
nvidia-smi -L
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| triton", triton.__version__, "| cuda", torch.version.cuda, "| device",
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")'
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "no CUDA device: this script checks the compiled kernels only"; return 2; }

FILES="test_kernels test_sparse_kernels test_kivi_triton test_kivi test_torch_sparse test_cpu_sparse"
echo "== which test files import here"
# A file whose import fails on a missing vllm module is left out; any other
# import error keeps the file in, so pytest reports it.
SELECTED=$("$PY" - $FILES <<'EOF'
import importlib, sys
sys.path[:0] = ["tests"]
keep = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "vllm":
            print(f"NOT RUN tests/{name}.py: needs {e.name} ({e})", file=sys.stderr)
            continue
    except BaseException:  # anything else: pytest shows it
        pass
    keep.append(f"tests/{name}.py")
print(" ".join(keep))
EOF
)
echo "selected: ${SELECTED:-none}"

rc=0
if [ -n "$SELECTED" ]; then
    echo "== 1. pytest (compiled on CUDA)"
    # shellcheck disable=SC2086
    "$PY" -m pytest -x -q --durations=10 -p no:cacheprovider $SELECTED || rc=$?
fi

case " $SELECTED " in *" tests/test_kernels.py "*) return $rc ;; esac

echo "== 2. dense and sparse kernels on CUDA against vllm_adaptive.reference (no vLLM needed)"
"$PY" - <<'EOF' || rc=$?
import math, time
import torch
from vllm_adaptive import reference as ref
from vllm_adaptive.kernels.paged_decode import paged_decode
from vllm_adaptive.kernels.paged_prefill import paged_prefill
from vllm_adaptive.kernels.sparse_decode import sparse_decode
from vllm_adaptive.kernels.sparse_prefill import sparse_prefill
from vllm_adaptive.sparse_pattern import SparsePattern

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # atol, as tests/test_kernels.py
# plus, for bf16, one bf16 ulp of the output (<= 2**-7 relative): kernel and
# reference each round their fp32 result to bf16 once, and may round apart
RTOL = {torch.float32: 0.0, torch.bfloat16: 2**-7}
SCALE = 0.2


def case(seq_lens, q_lens, hq, hk, bs, dtype, d=32, seed=0):
    """Ragged requests on shuffled pages; page 0 (never owned) holds NaN; this
    step's K/V are also stored in the cache (the dense kernels read them there)."""
    g = torch.Generator().manual_seed(seed)
    pages = [math.ceil(s / bs) for s in seq_lens]
    nb = sum(pages) + 3
    kc = torch.randn(nb, hk, bs, d, generator=g).to(dtype)
    vc = torch.randn(nb, hk, bs, d, generator=g).to(dtype)
    kc[0], vc[0] = float("nan"), float("nan")
    ids = torch.randperm(nb - 1, generator=g) + 1
    table = torch.zeros(len(seq_lens), max(pages) + 2, dtype=torch.int32)
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    n = int(qsl[-1])
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    k = torch.randn(n, hk, d, generator=g).to(dtype)
    v = torch.randn(n, hk, d, generator=g).to(dtype)
    used = 0
    for r, (s, ql) in enumerate(zip(seq_lens, q_lens)):
        table[r, :pages[r]] = ids[used:used + pages[r]].int()
        used += pages[r]
        for pos in range(s - ql, s):
            blk, row = int(table[r, pos // bs]), int(qsl[r]) + pos - (s - ql)
            kc[blk, :, pos % bs], vc[blk, :, pos % bs] = k[row], v[row]
    return dict(query=q, key=k, value=v, key_cache=kc, value_cache=vc, block_table=table,
                query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32))


def cuda(c):
    return {k: t.cuda() for k, t in c.items()}


def check(label, got, want, dtype):
    got, want = got.cpu().float(), want.float()
    err = (got - want).abs()
    ok = torch.isfinite(got).all().item() and bool((err <= TOL[dtype] + RTOL[dtype] * want.abs()).all())
    err = err.max().item()
    print(f"{'ok  ' if ok else 'FAIL'} {label}: max abs err {err:.2e} (tol {TOL[dtype]:.0e})")
    return ok


PATTERNS = {"sw-17-20": SparsePattern(sink=17, window=20),
            "st-s8-8x3/5": SparsePattern(sink=8, block=8, local_blocks=3, vert_stride=5),
            "st-64x1/2": SparsePattern(block=64, local_blocks=1, vert_stride=2)}
MIXED = ([1, 17, 129, 463, 2011], [1, 17, 40, 23, 3])
DECODE = ([1, 17, 129, 463, 2011], [1, 1, 1, 1, 1])
t0, ok = time.time(), True
for (hq, hk), bs, dtype in [((9, 3), 16, torch.float32), ((8, 2), 32, torch.bfloat16),
                            ((5, 1), 64, torch.bfloat16)]:
    tag = f"gqa {hq}:{hk} bs {bs} {str(dtype)[6:]}"
    c = case(*MIXED, hq, hk, bs, dtype)
    dense = [c[k] for k in ("query", "key_cache", "value_cache", "block_table", "query_start_loc", "seq_lens")]
    want = ref.paged_attention_ref(*dense, SCALE)
    ok &= check(f"paged_prefill {tag}", paged_prefill(*[t.cuda() for t in dense], SCALE), want, dtype)
    for name, pat in PATTERNS.items():
        want = ref.sparse_attention_ref(**c, scale=SCALE, pattern=pat)
        ok &= check(f"sparse_prefill {name} {tag}", sparse_prefill(**cuda(c), scale=SCALE, pattern=pat),
                    want, dtype)
    c = case(*DECODE, hq, hk, bs, dtype, seed=1)
    dense = [c[k] for k in ("query", "key_cache", "value_cache", "block_table", "query_start_loc", "seq_lens")]
    want = ref.paged_attention_ref(*dense, SCALE)
    for splits in (1, 4):
        ok &= check(f"paged_decode splits {splits} {tag}",
                    paged_decode(*[t.cuda() for t in dense], SCALE, num_splits=splits), want, dtype)
    for name, pat in PATTERNS.items():
        want = ref.sparse_attention_ref(**c, scale=SCALE, pattern=pat)
        for splits in (1, 4):
            ok &= check(f"sparse_decode {name} splits {splits} {tag}",
                        sparse_decode(**cuda(c), scale=SCALE, pattern=pat, num_splits=splits), want, dtype)
print(f"{'ALL OK' if ok else 'FAILURES'} in {time.time() - t0:.1f}s")
raise SystemExit(0 if ok else 1)
EOF
echo "exit status $rc"
return $rc
}

main 2>&1 | tee "$OUT/gpu_kernels.log"
exit "${PIPESTATUS[0]}"
