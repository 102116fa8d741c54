# Two entry points for a fresh machine: `make run PROMPT="..."` and `make test`.
PY312 = $(shell scripts/find_python.sh 3.12)
PY311 = $(shell scripts/find_python.sh 3.11)
PROMPT ?= Write a Python function that checks whether a number is prime.
CONFIG ?= smollm2_dspark.py
PYTEST_ARGS ?=

.PHONY: run test gpu-test clean

.venv/.installed: pyproject.toml constraints.txt
	rm -rf .venv
	$(PY312) -m venv .venv
	.venv/bin/pip install --quiet -c constraints.txt -e ".[test,serve]"
	touch $@

.venv-oracle/.installed: tests/oracle/requirements.txt
	rm -rf .venv-oracle
	$(PY311) -m venv .venv-oracle
	.venv-oracle/bin/pip install --quiet -r tests/oracle/requirements.txt
	touch $@

run: .venv/.installed
	.venv/bin/python -m dspark_jax.serve --config $(CONFIG) --prompt "$(PROMPT)"

# --max-worker-restart=0: a crashed worker fails the run at once (xdist's replacement worker can
# leave the run waiting forever under our scheduler).
test: .venv/.installed .venv-oracle/.installed
	DSPARK_ORACLE_PYTHON=.venv-oracle/bin/python DSPARK_REQUIRE_ORACLE=1 \
		.venv/bin/python -m pytest -n 2 --max-worker-restart=0 --durations=15 $(PYTEST_ARGS) tests

clean:
	rm -rf .venv .venv-oracle .pytest_cache
