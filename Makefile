# make demo / make test / make bench each set up .venv on a fresh clone first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready

SAMPLES := sample_images/fashion-mnist
PHOTOS := sample_images/photos
LITE0_LAYERS := _blocks.10._expand_relu,_head_relu,fc
DEMO_IMAGES := $(addprefix $(SAMPLES)/,test00000_ankle-boot.png test00001_pullover.png test00008_sandal.png \
	test00023_ankle-boot.png)

.PHONY: demo test bench check-report clean

$(READY): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch and torchvision pinned to the pair that lies on this machine's disk (no large download)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(READY)

# the main job (top-9 grids of layer 5), then occlusion and deconv figures of four samples, the first
# layer's filter sheet, the features' evolution over training, invariance curves and whole-layer
# reconstructions of the same samples, and the shipped correspondence example on photos with
# efficientnet_lite0, and the shipped deconvolutional network's sparse codes of the four samples and its
# filters: one report over all of them
demo: $(READY)
	$(BIN)/vizdeconv project --layer 5
	$(BIN)/vizdeconv occlude $(DEMO_IMAGES)
	$(BIN)/vizdeconv deconv $(DEMO_IMAGES) --layer 5 --top 3
	$(BIN)/vizdeconv filters --images $(SAMPLES)
	$(BIN)/vizdeconv evolution
	$(BIN)/vizdeconv invariance $(DEMO_IMAGES)
	$(BIN)/vizdeconv reconstruct $(DEMO_IMAGES)
	$(BIN)/vizdeconv correspondence --model efficientnet_lite0 --parts $(PHOTOS)/parts.json --layers $(LITE0_LAYERS) \
		$(addprefix $(PHOTOS)/,astronaut.jpg chelsea-cat.jpg cameraman-grey.png)
	$(BIN)/vizdeconv sparse infer $(DEMO_IMAGES)
	$(BIN)/vizdeconv sparse filters

test: $(READY)
	$(BIN)/python -m pytest -q

bench: $(READY)
	$(BIN)/python benchmarks/bench_deconv.py
	$(BIN)/python benchmarks/bench_scan.py
	$(BIN)/python benchmarks/bench_occlusion.py
	$(BIN)/python benchmarks/bench_graph.py
	$(BIN)/python benchmarks/bench_ranks.py
	$(BIN)/python benchmarks/bench_sparse.py

# the demo's report, with a second layer to step to, in headless Chromium (Debian's chromium package):
# broken images, links, console errors, the channel view and its keys
check-report: demo
	$(BIN)/vizdeconv project --layer 2 --channels 0-15
	$(BIN)/python scripts/check_report.py vizdeconv-out --screenshots check-report

clean:
	rm -rf $(VENV) vizdeconv-out check-report
