# ma-sbir: install, test, demo, app (make test is what CI runs; see README).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format install check-data bench clean app

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(STAMP)

install: $(STAMP)

DEMO_RUN := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)

demo: $(STAMP)
	$(PY) -m data.demo
	$(PY) train.py dataset=demo model=tiny hydra.run.dir=$(DEMO_RUN)
	$(PY) infer.py path=$(DEMO_RUN)
	$(PY) evaluate.py path=$(DEMO_RUN)

PORT ?= 7860

# The search app on the newest `make demo` run, over the demo photos of all classes.
app: $(STAMP)
	@ckpt=$$(ls -1 outputs/demo/*/model/best.pth 2>/dev/null | sort | tail -n 1); \
	if [ -z "$$ckpt" ]; then echo "error: no trained demo run under outputs/demo/: run make demo first" >&2; exit 1; fi; \
	run=$$(dirname $$(dirname $$ckpt)); \
	$(PY) -m data.demo && \
	echo "run $$run; open http://127.0.0.1:$(PORT) in a browser (Ctrl-C stops)" && \
	$(PY) app.py path=$$run gallery=.cache/demo/photo port=$(PORT)

test: $(STAMP)
	$(PY) -m pytest -q tests

# the tests not marked slow (multi-process, browser and learning tests are): under 3 minutes
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

check-data: $(STAMP)
	$(PY) -m data.check $(ARGS)

clean:
	rm -rf outputs multirun .cache
