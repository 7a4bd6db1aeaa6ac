# Two commands set up a fresh clone and use it:
#   make test   set-up + every test (what CI runs)
#   make demo   set-up + the main job on the built-in demo model
PY := .venv/bin/python
export OMP_NUM_THREADS := 1
TESTS ?= tests

.PHONY: setup test demo clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q -p no:logging $(TESTS) $(PYTEST_ARGS)

demo: setup
	$(PY) headless/demo.py $(DEMO_ARGS)

clean:
	rm -rf .venv .comfyui out
