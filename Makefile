# Set-up is folded into the targets: `make demo` and `make test` each build .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the wheels on this machine's local store; users' pyproject stays loose.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q $(TORCH_PIN) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q $(TORCH_PIN) -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/clipforge demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(VENV)/.installed-test
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs
