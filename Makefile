# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[deepspeed,dali,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dist_ast.train experiment=demo run_dir=runs/demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra -n 2 --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf runs .pytest_cache

# A one-node Slurm cluster on localhost (Debian, as root): docs/slurm-local.md
.PHONY: slurm-local
slurm-local:
	bash scripts/slurm-local.sh
