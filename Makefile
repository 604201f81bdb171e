# Two entry points that do all the set-up on a fresh machine:
#   make demo   train the tiny time-aware model on the synthetic source (CPU) and write videos at DEMO_FPS
#   make test   run the test suite (CPU, a few minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_FPS ?= 60
DEMO_OUT ?= runs/demo-samples
DEMO_RECIPE ?= recipes/demo.yaml
# The sampler settings measured for the demo (docs/demo.md): the null-label pass every
# 2nd step, 20 steps of 0.05 instead of 40 of 0.03 (bf16 autocast did not pay on this CPU).
DEMO_SAMPLE ?= --cfg-every 2 --steps 20 --step-size 0.05 --tol 0
# Recipe overrides for the demo's training run, e.g. `make demo DEMO_TRAIN="train.steps=6000
# data.synthetic.start=random"`: clips that start anywhere need about 6000 steps before the discs
# follow their class (963-1707 s with the VM's speed: docs/demo.md).
DEMO_TRAIN ?=

.PHONY: venv demo test test-slow clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# A new run under runs/ each time (nothing is overwritten); sample takes the latest run's latest
# checkpoint and says which.
demo: venv
	$(BIN)/eqmctl train $(DEMO_RECIPE) $(DEMO_TRAIN)
	$(BIN)/eqmctl sample --fps $(DEMO_FPS) --seconds 1 --num-samples 4 --upscale 4 $(DEMO_SAMPLE) --out $(DEMO_OUT)

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
