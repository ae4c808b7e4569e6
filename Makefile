# prodrep: two commands on a fresh machine (Python 3.11 + JDK 17):
#   make demo   # whole pipeline on the embedded Online Retail dataset, lake in $(LAKE)
#   make test   # the test suite (real local Spark, Ray, Delta, tiny models)
# Both create .venv when missing (torch's CPU wheel first) and are safe to re-run.

PYTHON ?= python3
VENV   ?= .venv
LAKE   ?= ./lake
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prodrep-installed

export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN)/python)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test install bench clean dist

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the pinned CPU wheel; anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[eval,test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prodrep pipeline --dataset online-retail --lake $(LAKE)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# What a cluster user ships: a wheel (pip install it into executor / Ray images) and a zip of the
# packages for spark-submit --py-files. Built from the source tree, no network.
dist: $(STAMP)
	rm -rf dist build && mkdir -p dist
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist .
	$(BIN)/python -c "import zipfile, pathlib; z = zipfile.ZipFile('dist/prodrep-py-files.zip', 'w', zipfile.ZIP_DEFLATED); [z.write(p) for d in ('prodrep', 'common', 'spark_jobs', 'ray_train') for p in sorted(pathlib.Path(d).rglob('*.py'))]"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(LAKE) report .pytest_cache dist build
