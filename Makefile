PYTHON ?= python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

# The main job: train one small model per solver on the embedded synthetic task and compare them.
demo: install
	$(PYTHON) -m energy_gpt compare --output_dir outputs/compare --overwrite

test: install
	$(PYTHON) -m pytest -q tests

bench:
	$(PYTHON) -m benchmarks.run
