# One-command set-up: every target below creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Dev/CI pins (users get whatever torch their platform has; see pyproject.toml).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# One BLAS thread per pytest worker: two workers on the 2-core CI machine.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1

.PHONY: install data test test-slow bench demo results decision zoo timm-model-tests bench-h200-estimate release-gpu-prepare release-gpu release-gpu-rehearsal clean

# Debian's Fashion-MNIST (full, lossless) for the data tests; needs root + apt.
FMNIST_DIR := /usr/share/datasets/fashion-mnist

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $@

install: $(BIN)/.installed

data:
	@test -d $(FMNIST_DIR) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist (needs root and apt); its tests will skip outside CI"

test: $(BIN)/.installed data
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 -q -p no:cacheprovider tests

test-slow: $(BIN)/.installed
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider -m slow tests

# Speed/memory ratios measured in one run (see benchmarks/README.md); tables go to stdout.
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run_all.py --out docs/performance.md

# The H200 estimate section of docs/performance.md (about 30 s; benchmarks/estimate_h200.py):
# written to docs/performance_h200.md and appended to docs/performance.md without re-running make bench.
bench-h200-estimate: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/estimate_h200.py --threads 1 --out docs/performance_h200.md
	$(BIN)/python benchmarks/run_all.py --includes-only --out docs/performance.md

# The main job: train + evaluate + export an EDLNet and its conv twin on the embedded
# Fashion-MNIST subset (a few minutes on 2 CPU cores), into a new runs/demo-<date>-<time>/.
# DEMO_ARGS passes options through.
demo: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/timm-edl demo $(DEMO_ARGS)

# The paper's claims at CPU scale (about 45 min on 2 cores): trains and evaluates every model
# with timm-edl's own commands, caches each job under runs/paper_claims/ and writes
# docs/results.md + docs/results/*.png (see experiments/README.md).
results: $(BIN)/.installed data
	$(BIN)/python experiments/paper_claims.py --jobs 2

# The elastic-regime decision (about 4 hours on 2 cores, resumable): one cached JSON per job
# in experiments/cache/elastic_decision/cpu/, the section 'elastic-decision' of docs/results.md.
decision: $(BIN)/.installed data
	$(BIN)/python experiments/elastic_decision.py --jobs 2

# The zoo (resumable; rerun until everything is shipped): trains, evaluates, exports and ships every
# pretrained model of the package (timm_edl/_zoo/), its card (hub_cards/) and docs/zoo.md + the README's
# zoo table. experiments/zoo.py: the edlnet_resnet8_in models (about 75 min on 2 cores; one cached JSON
# + final folder per job in experiments/cache/zoo/cpu/). experiments/zoo_pairs.py: the EDLNet / conv-twin
# pairs (edlnet_resnet20 fast AT, many CPU hours with AutoAttack; edlnet_resnet8_in smoothing, about
# 2 h), each step writing into its committed folder in experiments/cache/zoo/cpu/<pair>/ and stopping at
# ZOO_BUDGET_MIN minutes; experiments/zoo_ship.py ships the finished pairs. A shipped model's weights
# are stored once, in timm_edl/_zoo/.
ZOO_BUDGET_MIN ?= 170
zoo: $(BIN)/.installed data
	$(BIN)/python experiments/zoo.py --jobs 2
	$(BIN)/python experiments/zoo_pairs.py --jobs 2 --budget-min $(ZOO_BUDGET_MIN)
	$(BIN)/python experiments/zoo_ship.py

# timm's own tests/test_models.py (from the installed timm's sdist, fetched from the package registry)
# on every edlnet_* architecture; summary in experiments/cache/timm_model_tests/ (experiments/timm_model_tests.py).
timm-model-tests: $(BIN)/.installed
	$(BIN)/python experiments/timm_model_tests.py

# One CUDA GPU, a time budget: fast AT of edlnet_resnet18 + conv twin, evaluation, Hub-ready exports and
# runs/release-<date>-<time>/release.json (experiments/release_gpu.py). release-gpu-prepare (with
# network) puts the pyautoattack wheel in .whl/ and the CIFAR-10-JPEG archives in .data/; the GPU
# machine, given the checkout with both, runs `bash experiments/release_gpu.sh --budget-min 8 --pack OUT`.
# release-gpu-rehearsal: the same bootstrap end to end on this CPU at toy size.
RELEASE_ARGS ?= --device cuda --budget-min 8 $(if $(OUT),--pack $(OUT))
release-gpu-prepare: $(BIN)/.installed
	PYTHON=$(BIN)/python bash experiments/release_gpu.sh --prepare

release-gpu:
	bash experiments/release_gpu.sh $(RELEASE_ARGS)

release-gpu-rehearsal: release-gpu-prepare
	OMP_NUM_THREADS=1 PYTHON=$(BIN)/python RELEASE_SITE=/tmp/timm-edl-rehearsal bash experiments/release_gpu.sh --device cpu --toy

clean:
	rm -rf $(VENV) build *.egg-info
