# Two commands for a fresh machine: `make demo` (generate with the embedded demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine install your CUDA build into $(VENV) first (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test app lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m studio generate --prompt "a red ball next to a blue box on grass" \
		--box "red ball=0.05,0.3,0.45,0.75" --box "blue box=0.55,0.3,0.95,0.75@1" --seed 7 --out outputs/demo.png

app: $(VENV)/.installed
	$(PY) app.py

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
