#!/usr/bin/env bash
# Builds the whole extension with CUDA (kernels, glue, link) against a CUDA build of torch on a
# machine without a GPU, imports it and runs the CPU test suite on that build: what
# `make check-cuda` (nvcc -c of each .cu alone) cannot show. Uses a copy of the tree.
#
#   scripts/cuda_build_check.sh PYTHON     PYTHON: an interpreter whose torch has CUDA, e.g.
#     python3 -m venv /tmp/v && /tmp/v/bin/pip install torch==2.11.0 ninja pybind11 pytest \
#       hypothesis numpy tqdm matplotlib && scripts/cuda_build_check.sh /tmp/v/bin/python
set -eu
PY=${1:?usage: $0 PYTHON-with-CUDA-torch}
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git -C "$SRC" archive HEAD | tar -x -C "$WORK"
cd "$WORK"
"$PY" -c "import torch; assert torch.version.cuda, 'this torch has no CUDA'; print('torch', torch.__version__)"
# The toolkit: CUDA_HOME, else /usr/local/cuda (nvcc on PATH may be a wrapper script elsewhere)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -f "$CUDA_HOME/include/cuda_runtime.h" ] || { echo "no CUDA toolkit at $CUDA_HOME"; exit 1; }
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" setup.py -q build_ext --inplace
"$PY" -c "import kdfast._C as C; assert C.built_with_cuda(); print('kdfast._C built with CUDA')"
"$PY" -m pytest -q -p no:cacheprovider -m "not triton_interpret" tests
