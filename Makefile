# Two entry points that do all the set-up on a fresh machine:
#   make demo   train the tiny time-aware model on the synthetic source (CPU) and write a video at DEMO_FPS
#   make test   run the test suite (CPU, a few minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_FPS ?= 60
DEMO_OUT ?= runs/demo-samples

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
	$(BIN)/eqmctl train recipes/tiny-synthetic.yaml
	$(BIN)/eqmctl sample --fps $(DEMO_FPS) --seconds 1 --num-samples 4 --upscale 4 --out $(DEMO_OUT)

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
