# Two entry points, each installing what it needs into .venv first:
#   make demo   capture all-MiniLM-L6-v2's attention into a file and render its report (out/demo)
#   make test   the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/attnformat demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_format.py
	$(BIN)/python benchmarks/bench_capture.py
	$(BIN)/python benchmarks/bench_viewer.py
	$(BIN)/python benchmarks/bench_checksums.py
	$(BIN)/python benchmarks/bench_corruption.py
	$(BIN)/python benchmarks/bench_footprint.py
	$(BIN)/python benchmarks/bench_plot_startup.py
	$(BIN)/python benchmarks/bench_llm_capture.py
	$(BIN)/python benchmarks/bench_generation.py --threads 1 --repeats 3
	$(BIN)/python benchmarks/bench_export_many.py
	$(BIN)/python benchmarks/bench_scale.py --quick --scratch /tmp/attn-scale
	$(BIN)/python benchmarks/bench_collection.py --quick
	$(BIN)/python benchmarks/bench_compare.py --quick --scratch /tmp/attn-compare
	$(BIN)/python benchmarks/bench_explorer.py --quick

clean:
	rm -rf $(VENV) out
