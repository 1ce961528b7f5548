# The two commands of the README: `make demo` (the main job) and `make test` (the whole test suite).
# Both install what they need into .venv first (scripts/setup.sh) and are idempotent.
PY := .venv/bin/python
TEST_EXTRAS := dev,deepspeed,mpi,horovod,hf,workloads
DEMO_EXTRAS := workloads

.PHONY: setup setup-test setup-bench demo test bench clean

setup:
	@scripts/setup.sh $(DEMO_EXTRAS)

setup-test:
	@scripts/setup.sh $(TEST_EXTRAS)

setup-bench:
	@scripts/setup.sh $(TEST_EXTRAS),bench

demo: setup
	$(PY) -m lb_dist.demo

test: setup-test
	$(PY) -m pytest tests

bench: setup-bench
	$(PY) benchmarks/bench_optim.py
	$(PY) benchmarks/bench_moments.py
	$(PY) benchmarks/bench_mixing.py
	$(PY) benchmarks/bench_horovod.py
	$(PY) benchmarks/bench_deepspeed.py
	$(PY) benchmarks/bench_fsdp.py
	$(PY) benchmarks/bench_workloads.py

clean:
	rm -rf .venv build *.egg-info demo_out
