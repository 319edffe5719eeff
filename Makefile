PYTHON ?= python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# `demo` and `test` install only when needed. The stamp records an install into this Python environment (one stamp
# per interpreter prefix, so a new virtualenv installs again); it is out of date once pyproject.toml or this Makefile
# (which pins torch) changes. The package is installed editable, so source edits need no reinstall.
# `make install` always installs.
ENV_ID := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])")
INSTALL_STAMP := build/.installed-$(ENV_ID)

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"
	@mkdir -p $(dir $(INSTALL_STAMP)) && touch $(INSTALL_STAMP)

$(INSTALL_STAMP): pyproject.toml Makefile
	$(MAKE) --no-print-directory install

# The main job: train one small model per solver on the embedded synthetic task and compare them.
demo: $(INSTALL_STAMP)
	$(PYTHON) -m energy_gpt compare --output_dir outputs/compare --overwrite

test: $(INSTALL_STAMP)
	$(PYTHON) -m pytest -q tests

bench:
	$(PYTHON) -m benchmarks.run
