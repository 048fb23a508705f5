# make demo / make test / make bench each set up .venv on a fresh clone first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: demo test bench clean

$(READY): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch and torchvision pinned to the pair that lies on this machine's disk (no large download)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(READY)

demo: $(READY)
	$(BIN)/vizdeconv project --layer 5

test: $(READY)
	$(BIN)/python -m pytest -q

bench: $(READY)
	$(BIN)/python benchmarks/bench_deconv.py
	$(BIN)/python benchmarks/bench_scan.py
	$(BIN)/python benchmarks/bench_occlusion.py
	$(BIN)/python benchmarks/bench_graph.py

clean:
	rm -rf $(VENV) vizdeconv-out
