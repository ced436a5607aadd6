# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv when missing and installs everything from this project's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel available on the project's machines; override for a CUDA build, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all lint bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The main job: `igpt demo` on the bundled Fashion-MNIST subset (no network): shards, pretraining sized to the
# time budget, NLL, per-layer probes beside the raw-pixel baseline, completions, samples -> runs/demo/report.html.
DEMO_MINUTES ?= 9
demo: $(VENV)/.installed
	$(VENV)/bin/igpt demo --out runs/demo --minutes $(DEMO_MINUTES)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
