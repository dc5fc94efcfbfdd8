# The README's two commands: `make serve` and `make test`. Both create the
# virtual environment first if it is missing (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test setup model bench

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(VENV)/.installed

# OpenAI-compatible server on 127.0.0.1:8000, embedded model, backend ADAPTIVE.
# Extra vLLM arguments: make serve ARGS="--port 8001 --max-model-len 4096"
serve: $(VENV)/.installed
	$(VENV)/bin/vllm-adaptive serve $(ARGS)

# --durations: the slowest tests at the end of every run, so CI's log shows where time goes
test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=25 $(ARGS)

model: $(VENV)/.installed
	$(VENV)/bin/vllm-adaptive model

bench: $(VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=4 $(PY) benchmarks/throughput.py $(ARGS)
