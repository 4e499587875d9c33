# The two commands: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU machines: install your own torch build into $(VENV) first; it is kept.
TORCH ?= torch==2.13.0

.PHONY: demo test venv protos bench clean

$(VENV)/.psgrid-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.psgrid-installed

demo: venv
	$(VENV)/bin/psgrid demo

test: venv
	$(PY) -m pytest

protos: venv
	$(PY) scripts/gen_protos.py
	$(PY) scripts/gen_proto_docs.py

bench: venv
	$(PY) scripts/bench_transport.py
	$(PY) scripts/bench_inference.py

clean:
	rm -rf $(VENV) .psgrid .pytest_cache .hypothesis
