# The two commands of the README: `make demo` (the main job) and `make test` (the whole test suite).
# Both install what they need into .venv first and are idempotent.
PY := .venv/bin/python

.PHONY: setup setup-bench demo test bench clean

setup:
	@scripts/setup.sh dev

setup-bench:
	@scripts/setup.sh dev,bench

demo: setup
	$(PY) -m lb_dist.demo

test: setup
	$(PY) -m pytest tests

bench: setup-bench
	$(PY) benchmarks/bench_optim.py
	$(PY) benchmarks/bench_moments.py
	$(PY) benchmarks/bench_mixing.py

clean:
	rm -rf .venv build *.egg-info demo_out
