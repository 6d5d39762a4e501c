# A fresh machine: `make demo` (install the runtime, draw outputs/demo.png with the embedded demo model) and
# `make test` (add the test tools, run the offline tests). The README's "Set up and run" says what each downloads.
#
# Where torch comes from (only when $(VENV) has no torch yet; any torch already there is kept):
#   make demo                                                  pip's default index: on Linux x86_64 PyPI's torch is
#                                                              the CUDA build (~18 nvidia-* wheels), elsewhere the CPU one
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu       the CPU-only build (no CUDA wheels)
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128 GPU=1   an NVIDIA GPU, plus requirements-gpu.txt
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
GPU ?=

.PHONY: demo test app lint clean

$(VENV)/bin/python:
	@echo "==> creating the virtual environment $(VENV) ($(PYTHON) -m venv)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip in $(VENV)"
	$(PY) -m pip install -q --upgrade pip

# The runtime: what `make demo` and `python app.py` need. pip prints what it downloads (no -q on the big steps).
$(VENV)/.runtime: requirements.txt requirements-gpu.txt pyproject.toml | $(VENV)/bin/python
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "==> [1/3] keeping the torch already in $(VENV): $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "==> [1/3] installing $(TORCH_SPEC) from $(or $(TORCH_INDEX),pip's default index) (the largest download)"; \
		$(PY) -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	@echo "==> [2/3] installing the runtime (requirements.txt: diffusers, transformers, gradio, ray, onnxruntime, ...)"
	$(PY) -m pip install -r requirements.txt
	@if [ -n "$(filter 1 yes true,$(GPU))" ]; then \
		echo "==> [2/3] GPU=1: onnxruntime-gpu in place of onnxruntime, and bitsandbytes (requirements-gpu.txt)"; \
		$(PY) -m pip uninstall -y -q onnxruntime onnxruntime-gpu; \
		$(PY) -m pip install -r requirements-gpu.txt; \
	fi
	@echo "==> [3/3] installing Troupe itself into $(VENV) (editable: it runs from this folder)"
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The test and lint tools (pytest, ruff, playwright, onnx, torchao, sd-parsers, hypothesis): `make test`, `make lint`.
$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	@echo "==> installing the test and lint tools (requirements-dev.txt)"
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	@echo "==> generating outputs/demo.png with the embedded demo model (64x64 pixels, 20 steps, on the CPU or GPU)"
	$(PY) -m studio generate --prompt "a red ball next to a blue box on grass" \
		--box "red ball=0.05,0.3,0.45,0.75" --box "blue box=0.55,0.3,0.95,0.75@1" --seed 7 --out outputs/demo.png
	@echo "==> next: . $(VENV)/bin/activate   (then python -m studio --help, python app.py)"

app: $(VENV)/.runtime
	$(PY) app.py

test: $(VENV)/.dev
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
