# Two commands do everything on a fresh machine with Python 3.11:
#   make train   -> the main job (default experiment on the embedded data set)
#   make test    -> the test suite without the slow tests
#   make test-all -> everything, with the kill -9 loop at scale (50 random kills of one run, plus chosen points,
#                    a sweep and a 2-process DDP run)
#   make gpu-check -> the framework on a GPU, < 8 min: report.md + report.json in results/gpu/<date>-<gpu>/
#                     (ARGS="--device cpu --quick": every step tiny on the CPU, as the test suite runs it;
#                     ARGS="--out DIR" elsewhere; benchmarks/README.md, "GPU check")
#   make docker-lock -> docker/*.lock from this environment (the containers' pins; tests/test_docker.py compares)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-all lint bench gpu-check docker-lock clean

LOCKS := docker/requirements.lock docker/torch.lock docker/torch-cuda.lock

# the runtime packages install at the versions of docker/*.lock (the versions the suite ran with; the images use
# the same files), so a fresh clone tests what was tested; the dev tools resolve freely
$(STAMP): pyproject.toml requirements-nodeps.txt $(LOCKS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]" $(addprefix -c ,$(LOCKS))
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/ddpm-train experiment=default $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow" --durations=25 $(ARGS)

test-all: $(STAMP)
	WANDB_MODE=offline DDPM_KILLS=$${DDPM_KILLS:-50} $(PY) -m pytest -q -s -m "slow or not slow" $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.unet $(ARGS)
	$(PY) -m benchmarks.sampling $(ARGS)
	$(PY) -m benchmarks.fid_features $(ARGS)

gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check $(ARGS)

docker-lock: $(STAMP)
	$(PY) docker/lock.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ddpm_lightning tests benchmarks

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
