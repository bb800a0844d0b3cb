# The README's two commands are `make demo` and `make test`; both install first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@bash launch/find_python.sh > /dev/null
	@if [ ! -x $(PY) ]; then "$$(bash launch/find_python.sh)" -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[synth,dev,deploy]'
	@touch $(STAMP)

demo: install
	$(PY) -m usmqs study --config configs/study_demo.py --workdir runs/demo --update-readme README.md

test: install
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests

bench: install
	$(PY) bench/step_overhead.py

clean:
	rm -rf $(VENV) runs
