# Two entry points that do all the set-up on a fresh machine:
#   make demo   train the tiny time-aware model on the synthetic source (CPU) and write a video at DEMO_FPS
#   make test   run the test suite (CPU, a few minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_FPS ?= 60
DEMO_DIR ?= runs/demo

.PHONY: venv demo test test-slow bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: venv
	$(BIN)/eqmctl train recipes/tiny-synthetic.yaml --run-dir $(DEMO_DIR)
	$(BIN)/eqmctl sample --ckpt $(DEMO_DIR) --fps $(DEMO_FPS) --seconds 1 --num-samples 2 --out $(DEMO_DIR)/samples

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
