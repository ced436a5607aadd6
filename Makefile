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

# Until `igpt demo` lands: the pipeline that exists, on the bundled data (no network needed).
demo: $(VENV)/.installed
	$(VENV)/bin/igpt prepare --data fashion-mnist-mini --n-px 28 --out runs/demo/shards

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
