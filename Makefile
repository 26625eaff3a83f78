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

demo: $(STAMP)
	$(PY) -m data.demo
	$(PY) train.py --config-name config-train dataset=demo model=tiny hydra.run.dir=outputs/demo
	$(PY) infer.py path=outputs/demo
	$(PY) evaluate.py path=outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

check-data: $(STAMP)
	$(PY) -m data.check $(ARGS)

clean:
	rm -rf outputs multirun .cache
