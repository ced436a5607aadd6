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

# Until `igpt demo` lands: the pipeline that exists, on the bundled data (no network needed, ~3 minutes on
# 2 cores): token shards, a short pretraining run, then completions of test images from their top half.
DEMO := runs/demo
demo: $(VENV)/.installed
	$(VENV)/bin/igpt prepare --data fashion-mnist-mini --n-px 16 --palette-size 16 --out $(DEMO)/shards
	$(VENV)/bin/igpt train --data $(DEMO)/shards --preset cpu-small --steps 300 --batch-size 32 --lr 3e-3 \
		--warmup 30 --eval-every 100 --save-every 100 --out $(DEMO)/run
	$(VENV)/bin/igpt sample --checkpoint $(DEMO)/run/checkpoints/$$(cat $(DEMO)/run/checkpoints/latest) \
		--n 32 --complete-from $(DEMO)/shards --rows 8 --seed 0 --out $(DEMO)/completions.png
	@echo "demo: loss curve $(DEMO)/run/loss.png, completions $(DEMO)/completions.png"

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
