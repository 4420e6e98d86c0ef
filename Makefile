# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Everything the demo, the tests and the docs need. The package itself needs
# only Keras and one backend; see docs/install.md.
EXTRAS := tensorflow,examples,tests,backends,docs
# `make docs` needs only the package and the docs extra (MkDocs reads the
# sources statically: no backend), with a stamp of its own.
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test test-tensorflow test-jax test-torch docs install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Reinstall only when the dependencies change. `backends` brings JAX and
# PyTorch (CPU builds) beside TensorFlow; `docs` brings MkDocs.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $(STAMP)

$(DOCS_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[docs]"
	touch $(DOCS_STAMP)

install: $(STAMP)

# The whole suite once per Keras backend, in turn: all three run, and the
# target fails if any of them failed. Each run also builds the docs
# (tests/test_docs.py, a few seconds), so a broken reference fails the suite.
# On every core (pytest-xdist), a module's tests in one worker:
# `make test WORKERS=0` runs them in one process.
WORKERS ?= auto
PYTEST := $(PY) -m pytest tests -n $(WORKERS) --dist loadfile
test: $(STAMP)
	status=0; for backend in tensorflow jax torch; do \
		KERAS_BACKEND=$$backend $(PYTEST) || status=1; \
	done; exit $$status

test-tensorflow test-jax test-torch: test-%: $(STAMP)
	KERAS_BACKEND=$* $(PYTEST)

# The demo: every averager on one constant-rate SGD run of digits with 20%
# label noise, 5 seeds, paired 95% intervals against the SGD iterate (about
# 1.5 minutes on 2 CPU cores). The full table of docs/results.md is the same
# command with --seeds=0,1,2,3,4,5,6,7,8,9 --output_dir=runs/demo.
demo: $(STAMP)
	$(PY) -m examples.train --recipe=demo --seeds=0,1,2,3,4 --verbose=0

# The documentation site, API reference included, into site/. Offline;
# --strict turns every warning (a broken link or reference) into a failure.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) *.egg-info site
