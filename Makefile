# The two commands of the README. Each installs what it needs into the current Python environment.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch first, pinned, and only where none is installed: an unpinned requirement on a machine without torch pulls
# the CUDA build (several GB). Where torch exists (Colab, your GPU box) it is left alone.
TORCH_PIN ?= torch==2.13.0
# Idle OpenMP threads sleep instead of spinning: on a shared or 2-core machine, spinning threads slow small models many times over.
export OMP_WAIT_POLICY ?= PASSIVE
# ipywidgets 7 for its test, beside the installed ipywidgets 8 (build/ is git-ignored)
WIDGETS7 := build/ipywidgets7

.PHONY: train test install install-dev

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e .

install-dev:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	@# ipywidgets 7 (still in some Colab images) in a folder of its own, beside the environment's 8: tests/test_ui_widgets7.py
	@# builds the form with it in a subprocess (PYTHONPATH). Installed once; without it that test skips.
	@[ -d $(WIDGETS7)/ipywidgets ] || $(PIP) install -q --target $(WIDGETS7) --no-deps 'ipywidgets>=7.8,<8' 'ipython_genutils==0.2.0' \
		|| echo "could not install ipywidgets 7 into $(WIDGETS7): tests/test_ui_widgets7.py skips"

## train: the main job: the reference GPT on the embedded corpus with the default (tiny-cpu) config
train: install
	$(PYTHON) -m nbtrain.cli train

## test: package in sync with the notebooks, notebook tests, docs preprocessing, pytest
test: install-dev
	@# the browser test (tests/test_browser.py) drives Debian's Chromium: installed here where it is missing and we are root
	@if [ "$$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver for the browser test"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
		|| echo "could not install chromium chromium-driver: the browser test skips"; fi
	$(PYTHON) tools/check_sync.py
	$(PYTHON) tools/readme.py --check
	nbdev-test --n-workers 2 --flags slow
	nbdev-proc-nbs
	$(PYTHON) -m pytest -q --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc
