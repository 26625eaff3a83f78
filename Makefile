PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install check-data bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q tests

check-data: $(STAMP)
	$(PY) -m data.check $(ARGS)

clean:
	rm -rf outputs multirun .cache
