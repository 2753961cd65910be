# minillm: `make book` renders the PDF/HTML book, `make test` runs every test and re-executes every notebook cell.
# Both set up everything they need: the virtual environment (.venv), the library, and the corpus.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: all venv corpus models export book check-book test test-fast clean-nbs benchmarks help
all: book

help:
	@echo "make book    render book/minillm.pdf and book/index.html from the notebooks (no execution)"
	@echo "make book CHAPTER=04  render one chapter: book/04_*.html and book/04_*.pdf (for authors)"
	@echo "make check-book  load every page of book/ in headless Chromium and check it"
	@echo "make test    ruff, unit tests + every notebook cell re-executed and compared (nbval)"
	@echo "make export  regenerate minillm/ from nbs/ (nbdev-export)"
	@echo "make clean-nbs  strip notebook metadata (nbdev-clean) before committing"

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

# The corpus comes from the cache, Project Gutenberg or the Debian package r-cran-janeaustenr. The book's outputs
# are computed on the Debian text, so the build fetches that one (apt-get download needs no root; on a fresh
# machine the package lists may be empty, so as root we refresh them once).
corpus: $(STAMP)
	@$(PY) -c "from minillm.data import load_novels; load_novels('debian')" 2>/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1; $(PY) -c "from minillm.data import load_novels; load_novels('debian')"; }

# The trained austen-tiny model that the chapters from pretraining on load, and its instruction-tuned version that
# fine-tuning, alignment, evaluation and chat load (a few minutes each, once), both trained on one thread so that
# their weights, and so the stored outputs, do not depend on the core count; cached under ~/.cache/minillm/runs.
# Training them here keeps every notebook within its time budget.
models: corpus
	@$(PY) -c "from minillm.train import pretrained; pretrained('austen-tiny', progress=True)"
	@$(PY) -c "from minillm.finetune import instruction_tuned; instruction_tuned(progress=True)"

export: $(STAMP)
	$(VENV)/bin/nbdev-export

# CHAPTER=04 renders that chapter alone (its HTML page and a PDF of it) into book/, beside the rest.
# Every notebook's JSON is checked first: nbdev-export's traceback for a broken one never names it.
CHAPTER ?=
book: $(STAMP)
	@$(PY) tools/render_book.py --check-notebooks
	@$(MAKE) --no-print-directory export
	@if command -v quarto >/dev/null 2>&1 && [ -z "$(CHAPTER)" ]; then quarto render; \
	else $(PY) tools/render_book.py $(if $(CHAPTER),--chapter $(CHAPTER)); fi

# The HTML book in headless Chromium (Debian's `chromium`): console errors, failed requests, broken
# links and images, pages wider than a phone, search, the drawer, MathML (tools/check_book.py).
check-book: $(STAMP)
	$(PY) tools/check_book.py

# nbval: every code cell is re-executed in a fresh kernel and its outputs compared with the committed ones.
# Two notebooks run at once on two cores: one math thread each, since oversubscribed PyTorch threads spin and
# slow everything down many times over (outputs do not depend on the thread count).
test: $(STAMP)
	@set -e; t=$$SECONDS; $(MAKE) --no-print-directory models; \
	  echo "make test: corpus and models ready after $$((SECONDS - t)) s"; t=$$SECONDS; \
	  $(VENV)/bin/ruff check --quiet .; echo "make test: ruff clean ($$((SECONDS - t)) s)"; t=$$SECONDS; \
	  OMP_NUM_THREADS=$(if $(filter 1,$(JOBS)),2,1) $(PY) -m pytest -q -n $(JOBS) --dist loadscope tests nbs \
	    --nbval --nbval-current-env --nbval-sanitize-with nbs/sanitize.cfg; \
	  echo "make test: unit tests and notebooks took $$((SECONDS - t)) s"

# The unit tests without the notebooks and without the tests marked `models` (those that need the trained models of
# `make models`; tests/conftest.py marks them): a few minutes on a fresh clone, nothing trained.
test-fast: $(STAMP)
	@t=$$SECONDS; \
	  OMP_NUM_THREADS=$(if $(filter 1,$(JOBS)),2,1) $(PY) -m pytest -q -n $(JOBS) -m "not models" tests; \
	  s=$$?; echo "make test-fast: unit tests (without the trained models) took $$((SECONDS - t)) s"; exit $$s

clean-nbs: $(STAMP)
	$(VENV)/bin/nbdev-clean

benchmarks: $(STAMP) corpus
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
