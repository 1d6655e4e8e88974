# Set-up is folded into the targets: `make demo` and `make test` each build .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the wheels on this machine's local store; users' pyproject stays loose.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean system-packages

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

# Debian packages the tests drive: chromium + chromedriver (the web page test, tests/test_serve.py) and
# Java (pycocoevalcap's PTB tokenizer and METEOR, tests/test_captioning.py). Installed here when missing
# (sudo -n only when not root, so it never prompts); a failed install does not fail `make test`: those
# tests then skip and say why.
system-packages:
	@need=""; \
	  command -v chromium >/dev/null || need="$$need chromium"; \
	  command -v chromedriver >/dev/null || need="$$need chromium-driver"; \
	  command -v java >/dev/null || need="$$need default-jre-headless"; \
	  if [ -n "$$need" ]; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends $$need; } \
	    || echo "make: could not install$$need; the tests that need them will skip"; fi

test: $(VENV)/.installed-test system-packages
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(VENV)/.installed-test
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs
