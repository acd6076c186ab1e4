# make demo: set up (first time) and run the smoke pipeline end to end.  make test: set up and run every test (CI).
# make test-fast: the tests not marked slow (end-to-end runs, multi-device training), under 2 minutes.
SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
VENV := .venv
STAMP := $(VENV)/.synced

.PHONY: demo test test-fast setup clean

demo: $(STAMP)
	$(VENV)/bin/patchflow run smoke

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

setup: $(STAMP)

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install -q uv==$(UV_VERSION)

# Re-synced whenever the lock or the project metadata changes; --frozen installs exactly uv.lock.
$(STAMP): uv.lock pyproject.toml | $(if $(findstring .tools,$(UV)),.tools/bin/uv)
	$(UV) sync --frozen
	@touch $@

clean:
	rm -rf $(VENV) .tools runs
