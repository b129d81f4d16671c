# PanTS Label: two commands.
#   make serve   set up (if needed), make a demo dataset (if none), start the server on 127.0.0.1:8000
#   make test    set up (if needed), run the tests
# Other targets: make setup, make demo, make clean-venv.

PYTHON ?= python3
VENV ?= .venv
STUDIES ?= data/demo
HOST ?= 127.0.0.1
PORT ?= 8000
CONF ?=
PY := $(VENV)/bin/python
# The launcher runs training/scoring subprocesses with `python` from PATH: keep the venv first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup setup-gpu serve test demo clean-venv

# --no-deps: requirements*.txt is the complete pinned set; it keeps monailabel's heavy optional
# extras (CUDA torch, sam2, mlflow, openslide) out. Re-runs only when a requirements file changes.
# The app itself is installed in place (pip install -e): `lib`, `pants_tools` and the `pants-label`
# command then work from the venv's Python without activating it or touching sys.path.
$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# GPU machine: everything but torch pinned as usual, then torch with its CUDA libraries from PyPI.
setup-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	grep -v '^torch==' requirements.txt | $(PY) -m pip install --no-deps -r /dev/stdin -r requirements-test.txt
	$(PY) -m pip install "$$(grep '^torch==' requirements.txt)"
	$(PY) -m pip install --no-deps -e .
	touch $(VENV)/.installed

demo: setup
	@if [ "$(STUDIES)" = "data/demo" ] && [ ! -d data/demo/ImageTr ]; then \
		echo "making the demo dataset in data/demo (12 adult-size phantom CTs, 2 held out as a test split)"; \
		$(PY) scripts/make_phantoms.py --out data/demo --n 12 --n-test 2 --shape 224 224 160 --spacing 1.65 1.65 2.5; \
	fi
	@if [ "$(STUDIES)" = "data/demo" ] && [ -f $(DEMO_MODEL) ] && [ ! -f $(DEMO_MODEL_DIR)/segresnet_fast.pt ]; then \
		mkdir -p $(DEMO_MODEL_DIR) && cp $(DEMO_MODEL) $(DEMO_MODEL_DIR)/; \
	fi
	@if [ "$(STUDIES)" = "data/demo" ] && [ -f $(DEMO_STAGE2) ] && [ ! -f $(DEMO_MODEL_DIR)/segresnet_pancreas.pt ]; then \
		mkdir -p $(DEMO_MODEL_DIR) && cp $(DEMO_STAGE2) $(DEMO_MODEL_DIR)/; \
	fi
	@if [ "$(STUDIES)" = "data/demo" ] && [ -f $(DEMO_CLICKS) ] && [ ! -f $(DEMO_MODEL_DIR)/segresnet_clicks.pt ]; then \
		mkdir -p $(DEMO_MODEL_DIR) && cp $(DEMO_CLICKS) $(DEMO_MODEL_DIR)/; \
	fi

# The demo starts a fresh campaign: its phantom masks are hidden, so every scan is there to annotate.
# It serves the committed phantom models (scripts/train_demo_model.py: the whole-body model and,
# with --second-stage, infer's pancreas stage; scripts/train_click_model.py: the deepedit click
# model), copied once into the demo
# dataset's own model store (where the server records it as version v1), so that retraining from
# the client never touches the committed file.
DEMO_MODEL := apps/pants_label/demo_model/segresnet_fast.pt
DEMO_STAGE2 := apps/pants_label/demo_model/segresnet_pancreas.pt
DEMO_CLICKS := apps/pants_label/demo_model/segresnet_clicks.pt
DEMO_MODEL_DIR := data/demo/.pants_label/models
DEMO_CONF := $(if $(filter data/demo,$(STUDIES)),--conf hide_imported_labels true --conf preset fast,)

serve: demo
	$(PY) -m monailabel.main start_server --app apps/pants_label --studies $(STUDIES) \
		--host $(HOST) --port $(PORT) $(DEMO_CONF) $(CONF)

test: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
