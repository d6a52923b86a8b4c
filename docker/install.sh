#!/bin/sh
# Builds the virtual environment the rerankd images run from. The install steps live here only: the builder
# stage of docker/Dockerfile and docker/Dockerfile.cuda runs this script, and tests/test_docker.py replays that
# stage (this script included) into a fresh directory, so a step that breaks here fails CI.
#
# Run from the build context root (pyproject.toml, README.md, LICENSE, src/). Inputs, from the environment
# (the Dockerfiles pass their build arguments):
#   VENV             where the environment goes (/opt/venv in the images)
#   TORCH_VERSION    the torch release, the one the Makefile pins
#   TORCH_INDEX_URL  the index torch comes from (PyTorch's CPU or CUDA wheel index); empty: pip's own index
#   EXTRAS           project extras to add, comma-separated (e.g. llamacpp; it compiles, so the builder
#                    stage then needs a C++ toolchain and cmake)
#   PIP_*            pip's own settings (a mirror, a proxy's CA bundle); an empty one counts as unset
set -eu

: "${VENV:?VENV must name the directory of the virtual environment}"
: "${TORCH_VERSION:?TORCH_VERSION must name the torch release to install}"

# The Dockerfiles' PIP_* build arguments default to empty strings, which pip would take as settings (an index
# at ""): drop every empty PIP_* variable, so that only the ones given reach pip.
for name in $(env | sed -n 's/^\(PIP_[A-Z_]*\)=$/\1/p'); do
    unset "$name"
done

python3 -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }

# torch first, from its own index: the CPU build is a fraction of the size of PyPI's CUDA build, and the CUDA
# build must match the image's CUDA. The project's `torch>=2.3` is then already satisfied and left alone.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
else
    pip install "torch==$TORCH_VERSION"
fi

# The project itself, as a regular (not editable) install: the image carries no source tree.
pip install ".${EXTRAS:+[$EXTRAS]}"

# The fused attention kernels, compiled here into the package (one build for every x86-64 CPU), so the runtime
# image needs no compiler. The slim bases have none: this stage borrows gcc from the distribution's packages.
# Without one the image still works, with attention in torch alone (slower on long documents).
if ! command -v cc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev || true
fi
"$VENV/bin/python" -c "from rerankd.modeling import fused_attention as f; print('fused attention kernel:', f.prebuild())" \
    || echo "no C compiler: the image computes attention with torch alone" >&2

# Fail the build here, not at `docker run`: the entry point must start and torch must be the pinned one.
"$VENV/bin/rerankd" serve --help >/dev/null
"$VENV/bin/python" - "$TORCH_VERSION" <<'EOF'
import sys

import torch

wanted = sys.argv[1]
if torch.__version__.split("+")[0] != wanted.split("+")[0]:
    sys.exit(f"torch {torch.__version__} was installed, {wanted} was asked for")
print(f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}")
EOF
