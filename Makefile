# The two commands of the README:
#   make demo   backdoor a small CNN on bundled MNIST digits, repair it with FIRE, print before/after
#   make test   run the test suite
# Each creates/refreshes the virtual environment in $(VENV) and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; override (e.g. TORCH_SPEC='torch') where a CUDA build is wanted.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fire-onnx-installed

.PHONY: demo test install clean

demo: $(STAMP)
	$(BIN)/fire-onnx demo --output demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[cpu,fit,test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) demo-out build *.egg-info .pytest_cache
