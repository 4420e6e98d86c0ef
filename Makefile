# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-tensorflow test-jax test-torch install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Reinstall only when the dependencies change. `backends` brings JAX and
# PyTorch (CPU builds) beside TensorFlow.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[examples,tests,backends]"
	touch $(STAMP)

install: $(STAMP)

# The whole suite once per Keras backend, in turn: all three run, and the
# target fails if any of them failed.
test: $(STAMP)
	status=0; for backend in tensorflow jax torch; do \
		KERAS_BACKEND=$$backend $(PY) -m pytest tests || status=1; \
	done; exit $$status

test-tensorflow test-jax test-torch: test-%: $(STAMP)
	KERAS_BACKEND=$* $(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m examples.train

clean:
	rm -rf $(VENV) *.egg-info
