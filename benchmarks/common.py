"""Helpers shared by the benchmark scripts: layer maps, engine arguments, the
child process each configuration runs in, and result files.

Every benchmark runs each configuration in a fresh process (``script --one
SPEC``), so each engine gets its memory back and no state leaks between
configurations. Nothing here imports ``tests/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_MAPS = ["full", "longgen", "longgen-strided",
                str(RESULTS / "calibrated_sink_window.json"), str(RESULTS / "calibrated_strided.json")]


def resolve_map(arg: str) -> dict:
    """``{"name", "backend", "adaptive_attention", "source"}`` for a ``--maps`` entry."""
    name, _, path = arg.partition("=") if "=" in arg else ("", "", arg)
    if path in ("CPU_ATTN", "CPU_ATTN-fp8"):
        # stock vLLM, with its own fp8 KV cache (--kv-cache-dtype fp8) for the -fp8 entry
        out = {"name": name or path, "backend": "CPU_ATTN", "adaptive_attention": None,
               "source": "stock vLLM"}
        if path.endswith("-fp8"):
            out["kv_cache_dtype"] = "fp8"
        return out
    p = Path(path)
    if path.endswith(".json") or p.is_file():
        obj = json.loads(p.read_text())
        if "adaptive_attention" in obj:
            amap = obj["adaptive_attention"]
        elif "full_layers" in obj and "kind" in obj:
            amap = {"preset": {"sink_window": "longgen", "strided": "longgen-strided"}[obj["kind"]],
                    "full_layers": obj["full_layers"]}
        else:
            raise SystemExit(f"{path}: no 'adaptive_attention' (or 'kind' + 'full_layers') key")
        stem = p.stem
        return {"name": name or stem, "backend": "ADAPTIVE", "adaptive_attention": amap,
                "source": str(p)}
    return {"name": name or path, "backend": "ADAPTIVE", "adaptive_attention": path,
            "source": "preset"}


def engine_kwargs(m: dict, **kw) -> dict:
    """LLM(...) arguments for a resolved map; ``kw`` overrides the defaults."""
    from vllm_adaptive.model import default_model_path

    args = dict(model=str(default_model_path()), dtype="bfloat16", max_model_len=8192,
                enforce_eager=True, seed=0, attention_backend=m["backend"])
    if m["adaptive_attention"] is not None:
        args["hf_overrides"] = {"adaptive_attention": m["adaptive_attention"]}
    if m.get("kv_cache_dtype"):
        args["kv_cache_dtype"] = m["kv_cache_dtype"]
    args.update(kw)
    return args


def start_engine(m: dict, **kw):
    """``(LLM for map m, seconds its start took)``; ``kw`` as in :func:`engine_kwargs`.
    Release layers' statistics go to a temporary file (:func:`release_stats`)."""
    import tempfile

    from vllm import LLM

    from vllm_adaptive.release.stats import STATS_ENV

    os.environ[STATS_ENV] = os.path.join(tempfile.mkdtemp(prefix="release-"), "stats.json")
    t0 = time.time()
    llm = LLM(**engine_kwargs(m, **kw))
    return llm, time.time() - t0


def release_stats() -> dict | None:
    """The scheduler's release statistics of this process's engine (per
    release KV-cache group: blocks released, dropped, rebuilt, ...), or None."""
    from vllm_adaptive.release.stats import STATS_ENV

    path = os.environ.get(STATS_ENV)
    if not path or not os.path.exists(path):
        return None
    return json.loads(Path(path).read_text())


def run_subprocess(script: str, spec: dict, timeout: int = 7200, env: dict | None = None,
                   grep: tuple[str, ...] = ()) -> dict:
    """Re-run ``script --one SPEC`` in a fresh process; return its RESULT line
    (plus ``log_lines``: the output lines containing one of ``grep``)."""
    import tempfile

    t0 = time.time()
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="bench-spec-") as f:
        json.dump(spec, f)  # too long for argv when it carries prompts
        f.flush()
        out = subprocess.run([sys.executable, script, "--one", "@" + f.name],
                             capture_output=True, text=True, timeout=timeout, env=env)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"run failed (rc={out.returncode}) for {json.dumps(spec)[:500]}:\n"
                 f"{(out.stdout + out.stderr)[-6000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_s"] = round(time.time() - t0, 1)
    if grep:
        res["log_lines"] = [l.strip() for l in (out.stdout + out.stderr).splitlines()
                            if any(g in l for g in grep)]
    return res


def load_spec(arg: str) -> dict:
    """The JSON spec of ``--one``: inline, or ``@path``."""
    return json.loads(Path(arg[1:]).read_text() if arg.startswith("@") else arg)


def add_child_args(ap: argparse.ArgumentParser, sequential: bool = True) -> None:
    """``--one`` (the child process of :func:`run_subprocess`) and, for scripts
    that generate from prompts, ``--sequential``."""
    if sequential:
        ap.add_argument("--sequential", action="store_true",
                        help="one prompt per generate call instead of one batch (the published runs "
                        "used it; batched gives the same tokens: "
                        "tests/test_longgen_engine.py::test_longgen_preset_batched_equals_one_at_a_time)")
    ap.add_argument("--one", help=argparse.SUPPRESS)


def run_child(ns: argparse.Namespace, run_one) -> bool:
    """In the child process (``--one SPEC``): run it, print its RESULT line."""
    if not ns.one:
        return False
    print("RESULT " + json.dumps(run_one(load_spec(ns.one))), flush=True)
    return True


def generate(llm, prompts: list, sp, sequential: bool) -> list:
    """All prompts as one ``generate`` batch, or one call each (``--sequential``)."""
    if sequential:
        return [llm.generate([p], sp, use_tqdm=False)[0] for p in prompts]
    return llm.generate(prompts, sp, use_tqdm=False)


def write_doc(out: str, doc: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1))


def full_layers_of(amap) -> list[int] | None:
    """The full-attention layers of a map (None for stock vLLM)."""
    if amap is None:
        return None
    from vllm_adaptive.config import parse_config

    return list(parse_config(amap, 30).full_layer_indices)


def cpu_description() -> str:
    """The CPU model and the vector ISA that decides vLLM's CPU kernels (and
    whether stock fp8 KV runs): print it with every table."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"CPU: {model}, {os.cpu_count()} cores, ISA: {' '.join(isa) or 'no AVX2'}"


def meta(command: list[str]) -> dict:
    return {"machine": platform.processor() or platform.machine(), "cpu": cpu_description(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "command": " ".join(command),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


